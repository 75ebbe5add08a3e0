# Input functions, and what the rules ask the package (neuronmap.config.workflow): the validated
# config, each command's settings and code fingerprint, and the files a rule reads.
import json
import os
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

# This checkout's package, whatever else is installed: its code is what the fingerprints describe.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from neuronmap.config import workflow as package
from neuronmap.errors import NeuronmapError

try:
    config.update(package.validated(config))
except NeuronmapError as exc:
    raise WorkflowError(str(exc)) from None

shell.prefix(package.shell_prefix())

RUN = f"results/{config['run']}"
RELATIONS = config["relations"]["names"]
SHARDS = list(range(config["shards"]))
STATS_BLOCKS = list(range(config["stats_blocks"]))
# CPU threads of each job that computes (the rules' threads: torch's threads, sbatch --cpus-per-task).
THREADS = config["job_threads"]
# Relative to the working directory, like every other input.
REPORT_ASSETS = sorted(
    os.path.relpath(path)
    for path in (Path(workflow.basedir) / "src/neuronmap/report/assets").iterdir()
)

# Bad input stops the run here, before any job starts (main process only: jobs re-parse).
if workflow.is_main_process:
    try:
        package.check_config(config, prepared=f"{RUN}/model")
    except NeuronmapError as exc:
        raise WorkflowError(str(exc)) from None

# GPUs each model-running job asks for: resources gpu=N, which SLURM turns into --gpus=N.
try:
    GPUS = package.gpus_per_job(config, prepared=f"{RUN}/model")
except NeuronmapError as exc:
    raise WorkflowError(str(exc)) from None
GPUS_HERE = package.gpus_here(config, GPUS)


def gpus(wildcards):
    # A local run that computes on the CPU holds no GPU (package.gpus_here). Snakemake knows its
    # executor only once it runs the workflow, after this file is read: hence a function.
    return GPUS_HERE if workflow.local_exec else GPUS


# The labels stage runs for a labelled corpus (neuronmap.config.workflow.labels_active).
try:
    LABELS = package.labels_active(config)
except NeuronmapError as exc:
    raise WorkflowError(str(exc)) from None
LABEL_RESPONSES = LABELS and config["labels"]["ap"]


def settings(command):
    """The config values `command` reads, as one JSON param: a job reruns when one changes."""
    return package.settings_json(command, config)


def code(command):
    """The fingerprint of the code `command` runs: a job reruns when its code really changes."""
    return package.code_fingerprint(command, Path(workflow.basedir) / "src")


def relation_file(wildcards):
    return package.relation_file(config, wildcards.relation)


def relation_files(wildcards):
    return [package.relation_file(config, name) for name in RELATIONS]


def language_files(wildcards):
    return package.translation_files(config)


# Scheduling, longest work first so that no long job runs alone at the end: decoding (it needs
# only the model) as soon as the model is ready, then the jobs on the way to the ablation sweeps
# (the token statistics, the baseline and calibration fill free cores meanwhile), and among the
# sweeps those of relations with translations, which evaluate the most prompts.
STUDY_PRIORITY = 1
DECODE_PRIORITY = 2


def ablate_priority(wildcards):
    translated = package.translation_files(config)
    return STUDY_PRIORITY + sum(
        Path(path).stem == wildcards.relation for path in translated
    )


def per_relation(pattern):
    return expand(pattern, relation=RELATIONS)


def shard_outputs(suffix):
    """One extraction output of every shard of every relation, e.g. shard_outputs("parquet")."""
    return expand(
        f"{RUN}/responses/{{relation}}/shard-{{shard}}.{suffix}",
        relation=RELATIONS,
        shard=SHARDS,
    )


def model_job_costs():
    """The cost file of every model-running job."""
    return (
        shard_outputs_of(f"{RUN}/cost/extract/{{relation}}-{{shard}}.parquet")
        + [f"{RUN}/cost/baseline.parquet"]
        + per_relation(f"{RUN}/cost/ablate/{{relation}}.parquet")
    )


def shard_outputs_of(pattern):
    return expand(pattern, relation=RELATIONS, shard=SHARDS)


def corpus_files(wildcards):
    return package.corpus_files(config)


def corpus_shards(kind):
    """One partial of every records job, e.g. corpus_shards("units")."""
    return expand(
        f"{RUN}/corpus/shards/shard-{{shard}}.{kind}.parquet",
        shard=range(config["corpus"]["shards"]),
    )


def corpus_label_outputs():
    """What a records job writes for the labels stage, where it runs."""
    outputs = {}
    if LABELS:
        outputs["labels"] = f"{RUN}/corpus/shards/shard-{{shard}}.labels.parquet"
    if LABEL_RESPONSES:
        outputs["responses"] = f"{RUN}/corpus/shards/shard-{{shard}}.responses.parquet"
    return outputs


def corpus_label_options():
    """The records job's options for those outputs."""
    return "".join(
        f" --out-{kind} {{output.{kind}}}" for kind in corpus_label_outputs()
    )


def report_inputs(wildcards):
    """What the report reads, by its option names (report_options): the relation study's files
    where it runs, the corpus pass's and the labels stage's where they run."""
    inputs = {"model_dir": f"{RUN}/model"}
    if config["relation_study"]:
        inputs.update(
            prompts=f"{RUN}/prompts.parquet",
            baseline=f"{RUN}/evaluation/baseline.parquet",
            units=per_relation(f"{RUN}/units/{{relation}}.parquet"),
            expertise=per_relation(f"{RUN}/expertise/{{relation}}.parquet"),
            **{
                name: f"{RUN}/{name}.parquet"
                for name in (
                    "overlap",
                    "significance",
                    "sweep",
                    "neuron_stats",
                    "top_activations",
                    "decoded",
                    "perplexity",
                    "sparsity",
                    "languages",
                    "cost",
                )
            },
            plan=f"{RUN}/plan.json",
        )
    if config["corpus"]["path"]:
        inputs.update(
            contexts=f"{RUN}/corpus/contexts.parquet",
            corpus_units=f"{RUN}/corpus/units.parquet",
        )
    if LABELS:
        inputs.update(
            label_records=f"{RUN}/labels/label_records.parquet",
            label_units=f"{RUN}/labels/label_units.parquet",
            label_perplexity=f"{RUN}/labels/perplexity.parquet",
            label_overlap=f"{RUN}/labels/overlap.parquet",
        )
    return inputs


def report_options(wildcards, input):
    """The report's options for the files report_inputs names: --<name> <file(s)>."""
    options = []
    for name, files in input.items():
        if name != "assets":
            files = [files] if isinstance(files, str) else list(files)
            options += [f"--{name.replace('_', '-')}", *map(shlex.quote, files)]
    return " ".join(options)


def all_outputs():
    """The report, whichever parts run; the relation study's tables the report does
    not show; the corpus records where the config names a corpus."""
    outputs = [f"{RUN}/report.html"]
    if config["relation_study"]:
        outputs += [
            f"{RUN}/shared_units.parquet",
            f"{RUN}/dead_units.parquet",
        ]
    if config["corpus"]["path"]:
        outputs += [
            f"{RUN}/corpus/units.parquet",
            f"{RUN}/corpus/examples.parquet",
            f"{RUN}/corpus/peak_tokens.parquet",
        ]
    if LABELS:
        outputs += [f"{RUN}/labels/perplexity.parquet"]
    return outputs


def atlas_sources(wildcards):
    """What the atlas index reads: the files of every stage this config runs (each list empty
    where its stage does not run)."""
    corpus = bool(config["corpus"]["path"])
    study = config["relation_study"]

    def labels(name):
        return [f"{RUN}/labels/label_{name}.parquet"] if LABELS else []

    return {
        "units": [f"{RUN}/corpus/units.parquet"] if corpus else [],
        "examples": [f"{RUN}/corpus/examples.parquet"] if corpus else [],
        "peak_tokens": [f"{RUN}/corpus/peak_tokens.parquet"] if corpus else [],
        "neuron_stats": [f"{RUN}/neuron_stats.parquet"] if study else [],
        "decoded": [f"{RUN}/decoded.parquet"] if study else [],
        "expertise": (
            per_relation(f"{RUN}/expertise/{{relation}}.parquet") if study else []
        ),
        "label_records": labels("records"),
        "label_units": labels("units"),
        "label_expertise": labels("expertise"),
    }
