import ast
import functools
import json
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate


def validate_config():
    """Validate and fill defaults; on error, one line naming the key instead of the schema dump."""
    try:
        validate(config, schema="../schemas/config.schema.yaml", set_default=True)
    except WorkflowError as exc:
        problem = exc.__context__  # jsonschema's ValidationError
        if not hasattr(problem, "absolute_path"):
            raise
        key = ".".join(str(part) for part in problem.absolute_path)
        where = f"{key}: " if key else ""
        raise WorkflowError(f"config: {where}{problem.message}") from None
    # Snakemake compares params by repr(), so a dict param (e.g. split) would count as changed
    # when only the key order of a config file differs: fix one order.
    for key, value in config.items():
        config[key] = sorted_keys(value)


def sorted_keys(value):
    if isinstance(value, dict):
        return {key: sorted_keys(value[key]) for key in sorted(value)}
    return value


validate_config()

RUN = f"results/{config['run']}"
RELATIONS = config["relations"]["names"]
SHARDS = list(range(config["shards"]))
STATS_BLOCKS = list(range(config["stats_blocks"]))
PACKAGE = Path(workflow.basedir) / "src" / "neuronmap"


def package_files(*modules):
    """Package modules as inputs, with every package module they import in turn, so that
    editing one reruns exactly the stages that use it."""
    shared = {"__init__", "cli", "errors", "parquet_io", "schemas"}
    needed, todo = set(), [*modules, *shared]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += package_imports(name)
    # Relative to the working directory, so that a moved checkout is not a change of input.
    return sorted(os.path.relpath(PACKAGE / f"{name}.py") for name in needed)


@functools.cache
def package_imports(name):
    """Modules of the package that `name` imports. Of the command-line modules, only the
    imports every `neuronmap` call runs: following those of each subcommand (cmd_* and its
    _helpers) would make every rule depend on every module."""
    path = PACKAGE / f"{name}.py"
    if not path.is_file():
        return []  # a misspelt module: Snakemake reports the missing input file
    body = ast.parse(path.read_text()).body
    if name in command_modules():
        body = [node for node in body if not is_subcommand_code(node)]
    found = relative_imports(ast.Module(body, []))
    return [module for module in found if (PACKAGE / f"{module}.py").is_file()]


@functools.cache
def command_modules():
    """cli and the modules its build_parser imports to register more subcommands."""
    body = ast.parse((PACKAGE / "cli.py").read_text()).body
    parser = [node for node in body if getattr(node, "name", "") == "build_parser"]
    return {"cli", *relative_imports(ast.Module(parser, []))}


def is_subcommand_code(node):
    name = getattr(node, "name", "")
    return isinstance(node, ast.FunctionDef) and name.startswith(("cmd_", "_"))


def relative_imports(tree):
    """`from .x import ...` and `from . import x` anywhere in the tree."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found += [node.module] if node.module else [a.name for a in node.names]
    return found


def relation_file(wildcards):
    return sorted(
        str(path)
        for path in Path(config["relations"]["dir"]).rglob(f"{wildcards.relation}.json")
    )


def shard_outputs(suffix):
    """One extraction output of every shard of every relation, e.g. shard_outputs("parquet")."""
    return expand(
        f"{RUN}/responses/{{relation}}/shard-{{shard}}.{suffix}",
        relation=RELATIONS,
        shard=SHARDS,
    )


def trust_flag():
    return "--trust-remote-code" if config["trust_remote_code"] else ""


def language_files(wildcards):
    """Translated relation files of the configured relations that exist (a relation need not be
    translated into every language; a language without a folder fails in the job, by name).
    """
    folder = Path(config["languages"]["dir"])
    return sorted(
        str(folder / language / f"{name}.json")
        for language in config["languages"]["evaluate"]
        for name in RELATIONS
        if (folder / language / f"{name}.json").is_file()
    )


# Run-level analyses of issue 4 (rules/ablate.smk and the end of rules/stats.smk).
ANALYSES = [
    "significance",
    "sweep",
    "languages",
    "perplexity",
    "shared_units",
    "decoded",
    "sparsity",
    "dead_units",
]


def all_outputs():
    return [
        f"{RUN}/report.html",
        f"{RUN}/neuron_stats.parquet",
        *(f"{RUN}/{name}.parquet" for name in ANALYSES),
    ]


def check_model(spec):
    """The model exists, and a local directory holds a supported architecture."""
    from neuronmap.errors import NeuronmapError

    if spec.startswith("builtin:"):
        return  # prepare_model checks the name against the packaged models
    path = Path(spec).expanduser()
    if not path.exists():
        # Mirrors model_loading.resolve_source: "org/name" is a hub id, anything else a path.
        if path.is_absolute() or spec.startswith(".") or spec.count("/") != 1:
            raise NeuronmapError(
                f"model: {spec} does not exist (expected a local Hugging Face directory, "
                f"a .gguf file or a hub id already in the local cache)"
            )
        return
    if path.is_dir():
        config_json = path / "config.json"
        if not config_json.is_file():
            raise NeuronmapError(
                f"model: {path} is a directory without config.json, not a Hugging Face model"
            )
        # Imports torch (seconds): done for local models only.
        from neuronmap.architectures import adapter_for

        adapter_for(json.loads(config_json.read_text()).get("model_type"))


def preflight():
    """Reject input that a job would reject minutes later, before any job starts, with
    the job's own message naming the key or file. Main process only (jobs re-parse)."""
    if not (PACKAGE.parent / "neuronmap").is_dir():
        return
    sys.path.insert(0, str(PACKAGE.parent))  # works without `pip install -e .` too
    try:
        from neuronmap.errors import NeuronmapError
        from neuronmap.prompts import PromptSettings, relation_prompts
        from neuronmap.relations import find_relation_file, load_relation
    except ImportError as exc:
        logger.warning(f"no input checks before the first job ({exc})")
        return
    split = config["split"]
    settings = PromptSettings(
        templates=tuple(config["templates"]),
        few_shot=config["few_shot"],
        max_facts=config["relations"]["max_facts"],
        test_facts=split["test_facts"],
        max_test_fraction=split["max_test_fraction"],
        seed=split["seed"],
        shards=config["shards"],
    )
    try:
        for name in RELATIONS:
            path = find_relation_file(config["relations"]["dir"], name)
            relation_prompts(load_relation(path, name), settings)
        check_model(config["model"])
    except NeuronmapError as exc:
        raise WorkflowError(str(exc)) from None


if workflow.is_main_process:
    preflight()


# Analyses the report shows when this workflow writes them: `neuronmap report` option -> file.
# A file is requested only when a rule of the workflow produces it, so each analysis enters the
# report as soon as its stage exists; until then the report says "not yet run" in its place.
REPORT_ANALYSES = {
    "neuron-stats": f"{RUN}/neuron_stats.parquet",
    "top-activations": f"{RUN}/top_activations.parquet",
    "decoded": f"{RUN}/decoded.parquet",
    "significance": f"{RUN}/significance.parquet",
    "perplexity": f"{RUN}/perplexity.parquet",
    "sweep": f"{RUN}/sweep.parquet",
    "sparsity": f"{RUN}/sparsity.parquet",
    "languages": f"{RUN}/languages.parquet",
}
REPORT_ASSETS = sorted(
    os.path.relpath(path) for path in (PACKAGE / "report_assets").iterdir()
)


def report_analyses(wildcards):
    return {
        option.replace("-", "_"): path
        for option, path in REPORT_ANALYSES.items()
        if any(rule.is_producer(path) for rule in workflow.rules)
    }


def report_analysis_options(wildcards, input):
    return " ".join(
        f"--{option} {input[option.replace('-', '_')]}"
        for option in REPORT_ANALYSES
        if option.replace("-", "_") in input.keys()
    )
