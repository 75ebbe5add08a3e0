"""What a change reruns: dry runs on a private copy of the workflow and of the end-to-end run.

The copy (workflow files, package sources, relation data and the e2e outputs) lets a test edit
a module or touch files without disturbing anyone. `snakemake --touch --forceall` adopts the
copied outputs, recording the same metadata a real run records (code, params, input list and
input checksums); the matrix then asks `--detailed-summary` which outputs a change would
regenerate, and compares with what depends on the change.
"""

import argparse
import ast
import csv
import functools
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PACKAGE = Path("src") / "neuronmap"
# Modules every rule lists (rules/common.smk package_files), whether it imports them or not.
SHARED_MODULES = {"__init__", "cli", "errors", "parquet_io", "schemas"}


class Workdir:
    def __init__(self, root: Path, config: dict):
        self.root = root
        self.config = config
        self.run = f"results/{config['run']}"

    def snakemake(self, *args: str, config: dict | None = None) -> str:
        path = self.root / "config.test.yaml"
        path.write_text(yaml.safe_dump(config or self.config))
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               "HF_HUB_OFFLINE": "1"}
        result = subprocess.run(["snakemake", "--configfile", str(path), "--cores", "2",
                                 "--workflow-profile", "profiles/local", *args],
                                cwd=self.root, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    def summary(self, config: dict | None = None) -> list[dict]:
        rows = csv.DictReader(io.StringIO(self.snakemake("--detailed-summary", config=config)), delimiter="\t")
        return [row for row in rows if row.get("output_file")]

    def pending(self, config: dict | None = None) -> set[str]:
        """Outputs a run would (re)generate."""
        return {row["output_file"] for row in self.summary(config) if row["plan"] == "update pending"}


def jobs(summary: list[dict]) -> dict[str, dict]:
    """One entry per job (keyed by its command): rule, outputs, inputs."""
    by_command: dict[str, dict] = {}
    for row in summary:
        job = by_command.setdefault(row["shellcmd"], {"rule": row["rule"], "command": row["shellcmd"], "outputs": set(),
                                                      "inputs": set(filter(None, row["input-file(s)"].split(",")))})
        job["outputs"].add(row["output_file"])
    return by_command


def downstream(summary: list[dict], changed_files=(), changed_rules=()) -> set[str]:
    """Outputs of the jobs that read a changed file or belong to a changed rule, and of every
    job that reads their outputs in turn."""
    changed, result = set(changed_files), set()
    grew = True
    while grew:
        grew = False
        for job in jobs(summary).values():
            if not job["outputs"] <= result and (job["rule"] in changed_rules or job["inputs"] & changed):
                result |= job["outputs"]
                changed |= job["outputs"]
                grew = True
    return result


def rules_of(summary: list[dict], outputs: set[str]) -> set[str]:
    return {row["rule"] for row in summary if row["output_file"] in outputs}


@pytest.fixture(scope="module")
def workdir(e2e_run, e2e_config, tmp_path_factory) -> Workdir:
    root = tmp_path_factory.mktemp("rerun")
    for name in ("Snakefile", "config.yaml"):
        shutil.copy2(REPO / name, root / name)
    for name in ("rules", "schemas", "envs", "profiles", "data"):
        shutil.copytree(REPO / name, root / name)
    shutil.copytree(REPO / PACKAGE, root / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    config = yaml.safe_load(e2e_config.read_text())
    shutil.copytree(e2e_run, root / "results" / config["run"], ignore=shutil.ignore_patterns("logs", "benchmarks"))
    work = Workdir(root, config)
    work.snakemake("--touch", "--forceall")
    return work


@pytest.fixture(scope="module")
def baseline(workdir) -> list[dict]:
    summary = workdir.summary()
    assert summary and not {row["output_file"] for row in summary if row["plan"] == "update pending"}
    return summary


def dry_run(workdir: Workdir, config: dict) -> list[dict]:
    """The jobs a run would start: rule, wildcards, and the first reason Snakemake gives."""
    planned = []
    for line in workdir.snakemake("-n", config=config).splitlines():
        if line.startswith(("rule ", "localrule ")):
            planned.append({"rule": line.split()[1].rstrip(":"), "wildcards": {}, "reason": ""})
        elif planned and line.strip().startswith("wildcards:"):
            pairs = line.split(":", 1)[1].split(",")
            planned[-1]["wildcards"] = dict(pair.strip().split("=", 1) for pair in pairs)
        elif planned and line.strip().startswith("reason:"):
            planned[-1]["reason"] = line.strip()
    return planned


def params_changed(workdir: Workdir, config: dict) -> set[str]:
    """Rules with a job whose own params changed; a job downstream of one that reruns gives
    that as its reason instead."""
    return {job["rule"] for job in dry_run(workdir, config) if "Params have changed" in job["reason"]}


def test_changing_top_k_reruns_stats_onward_only(workdir, baseline):
    config = {**workdir.config, "top_k": [20, 100]}
    pending = workdir.pending(config)
    readers = params_changed(workdir, config)
    assert "stats" in readers and readers <= rules_of(baseline, downstream(baseline, changed_rules={"stats"}))
    assert pending == downstream(baseline, changed_rules=readers)
    assert rules_of(baseline, pending) >= {"stats", "overlap", "ablate", "report"}
    assert not rules_of(baseline, pending) & {"prepare_model", "prepare_prompts", "merge_prompts", "extract",
                                              "stats_block", "neuron_stats", "baseline"}


def test_adding_a_relation_extracts_only_that_relation(workdir, baseline):
    names = workdir.config["relations"]["names"]
    added = "adj_comparative"
    config = {**workdir.config, "relations": {**workdir.config["relations"], "names": [*names, added]}}
    planned = dry_run(workdir, config)
    extract = [job["wildcards"] for job in planned if job["rule"] == "extract"]
    prepare = [job["wildcards"] for job in planned if job["rule"] == "prepare_prompts"]
    shards = [str(shard) for shard in range(workdir.config["shards"])]
    assert sorted((e["relation"], e["shard"]) for e in extract) == [(added, shard) for shard in shards]
    assert prepare == [{"relation": added}]
    assert "prepare_model" not in {job["rule"] for job in planned}
    # Expertise of every relation is recomputed: the new relation's prompts are negatives for
    # the others (README, "Rerunning after a change").
    assert {job["wildcards"].get("relation") for job in planned if job["rule"] == "stats"} == {*names, added}


def test_editing_the_ablation_module_reruns_only_what_imports_it(workdir, baseline):
    module = workdir.root / PACKAGE / "ablation.py"
    original = module.read_text()
    module.write_text(original + "\n# an edit\n")
    try:
        pending = workdir.pending()
    finally:
        module.write_text(original)
    assert pending == downstream(baseline, changed_files={str(PACKAGE / "ablation.py")})
    assert rules_of(baseline, pending) >= {"baseline", "ablate", "report"}
    assert not rules_of(baseline, pending) & {"prepare_model", "prepare_prompts", "merge_prompts", "extract",
                                              "stats_block", "stats", "neuron_stats", "overlap"}


def test_changing_the_model_reruns_everything_that_uses_it(workdir, baseline):
    from neuronmap.model_loading import builtin_gguf
    gguf = builtin_gguf("smollm2-135m-instruct")  # the same weights, named another way
    config = {**workdir.config, "model": str(gguf)}
    pending = workdir.pending(config)
    assert params_changed(workdir, config) == {"prepare_model"}
    assert pending == downstream(baseline, changed_rules={"prepare_model"})
    rules = rules_of(baseline, pending)
    assert rules >= {"prepare_model", "extract", "stats", "baseline", "ablate", "report"}
    assert not rules & {"prepare_prompts", "merge_prompts"}  # prompts do not depend on the model


def test_touching_files_without_changing_them_reruns_nothing(workdir, baseline):
    """Every input made newer than every output that reads it: the checksums decide."""
    results = workdir.root / workdir.run
    model_dir = results / "model"  # a directory: Snakemake has no checksum for it (README)
    produced = sorted((p for p in results.rglob("*") if p.is_file() and model_dir not in p.parents),
                      key=lambda p: p.stat().st_mtime_ns)
    sources = [*(workdir.root / PACKAGE).rglob("*.*"), *(workdir.root / "data").rglob("*.json")]
    now = time.time()
    # Reverse production order: the first file written becomes the newest.
    for rank, path in enumerate(produced):
        os.utime(path, (now + len(produced) - rank, now + len(produced) - rank))
    for path in sources:
        os.utime(path, (now + len(produced) + 10, now + len(produced) + 10))
    assert workdir.pending() == set()


def _imports(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
    return found


def _module_level(tree: ast.Module) -> ast.Module:
    return ast.Module([n for n in tree.body if not isinstance(n, ast.FunctionDef)], [])


def _function_imports(parse, dispatch: set[str], module: str, function: str) -> tuple[set[str], set[str]]:
    """(command-line modules, other modules) that `function` of `module` imports: in its
    body, in the functions it calls (in its module, or helpers it imports from cli), and at
    the level of those modules."""
    commands, others, todo, seen = {module}, set(), [(module, function)], set()
    while todo:
        module, function = todo.pop()
        if (module, function) in seen:
            continue
        seen.add((module, function))
        tree = parse(module)
        functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
        others |= _imports(_module_level(tree))
        for node in ast.walk(functions[function]):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module in dispatch:
                commands.add(node.module)
                todo += [(node.module, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 1:
                others |= {node.module} if node.module else {alias.name for alias in node.names}
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in functions:
                todo.append((module, node.func.id))
    return commands, others - dispatch


def _closure(package: Path, modules: set[str]) -> set[str]:
    """The modules and everything they import, anywhere in them, transitively."""
    todo, found = list(modules), set()
    while todo:
        module = todo.pop()
        if module in found or not (package / f"{module}.py").is_file():
            continue
        found.add(module)
        todo += _imports(ast.parse((package / f"{module}.py").read_text()))
    return found


def _subcommand_function(subcommand: str) -> tuple[str, str]:
    """(module, function) that `neuronmap <subcommand>` runs."""
    from neuronmap.cli import build_parser
    parser = build_parser()
    choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    function = choices[subcommand].get_default("func")
    return function.__module__.rsplit(".", 1)[1], function.__name__


def test_rules_list_exactly_the_modules_their_command_imports(workdir, baseline):
    """Code inputs (rules/common.smk package_files) against the imports of each rule's
    `neuronmap` subcommand, followed through the package: a module missing from the list
    means an edit that reruns nothing; an extra one, reruns for nothing."""
    package = workdir.root / PACKAGE
    parse = functools.cache(lambda module: ast.parse((package / f"{module}.py").read_text()))
    cli = parse("cli")
    build_parser = ast.Module([n for n in cli.body if getattr(n, "name", "") == "build_parser"], [])
    # What every call runs: cli, the modules that register subcommands, their module-level imports.
    dispatch = {"cli", *_imports(build_parser)}
    every_call = dispatch | _closure(package, set().union(*(_imports(_module_level(parse(m))) for m in dispatch)))
    allowed_extra = _closure(package, SHARED_MODULES - {"cli"})
    problems = set()
    for job in jobs(baseline).values():
        module, function = _subcommand_function(job["command"].split("neuronmap ", 1)[1].split()[0])
        commands, others = _function_imports(parse, dispatch, module, function)
        needed = every_call | {"__init__"} | commands | _closure(package, others)
        listed = {Path(p).stem for p in job["inputs"] if p.startswith(str(PACKAGE)) and p.endswith(".py")}
        if needed - listed:
            problems.add(f"rule {job['rule']}: imports {sorted(needed - listed)} but does not list them")
        if listed - needed - allowed_extra:
            problems.add(f"rule {job['rule']}: lists {sorted(listed - needed - allowed_extra)} but never imports them")
    assert not problems, "\n".join(sorted(problems))
