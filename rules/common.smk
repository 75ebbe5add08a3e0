# Input functions, and what the rules ask the package (neuronmap.workflow): the validated
# config, each command's settings and code fingerprint, and the files a rule reads.
import json
import os
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

# This checkout's package, whatever else is installed: its code is what the fingerprints describe.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from neuronmap import workflow as package
from neuronmap.errors import NeuronmapError
from neuronmap.report.inputs import (
    INPUTS as REPORT_INPUTS,
    options as report_file_options,
)

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

# The prepared model (prepare_model's output), which the checks below read where it exists while
# the workflow is parsed, before any rule is defined.
MODEL_DIR = f"{RUN}/model"

# Bad input stops the run here, before any job starts (main process only: jobs re-parse).
if workflow.is_main_process:
    try:
        package.check_config(config, prepared=MODEL_DIR)
    except NeuronmapError as exc:
        raise WorkflowError(str(exc)) from None

# GPUs each model-running job asks for: resources gpu=N, which SLURM turns into --gpus=N.
try:
    GPUS = package.gpus_per_job(config, prepared=MODEL_DIR)
except NeuronmapError as exc:
    raise WorkflowError(str(exc)) from None
GPUS_HERE = package.gpus_here(config, GPUS)


def gpus(wildcards):
    # A local run that computes on the CPU holds no GPU (package.gpus_here). Snakemake knows its
    # executor only once it runs the workflow, after this file is read: hence a function.
    return GPUS_HERE if workflow.local_exec else GPUS


# The labels stage runs for a labelled corpus (neuronmap.workflow.labels_active).
try:
    LABELS = package.labels_active(config)
except NeuronmapError as exc:
    raise WorkflowError(str(exc)) from None
LABEL_RESPONSES = LABELS and config["labels"]["ap"]

# The explain stage runs with explain.enabled (workflow/checks.py checks what it needs).
EXPLAIN = config["explain"]["enabled"]
EXPLAIN_SHARDS = list(range(config["explain"]["shards"]))

# The parts of a run (neuronmap.report.inputs.PARTS) this config runs.
PARTS = {
    "model": True,
    "study": config["relation_study"],
    "corpus": bool(config["corpus"]["path"]),
    "labels": LABELS,
    "explain": EXPLAIN,
}


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


def corpus_files(wildcards):
    return package.corpus_files(config)


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


# Expanding a rule's output (rules.<name>.output) over the relations, and over their shards.
def per_relation(pattern):
    return expand(pattern, relation=RELATIONS)


def per_shard(pattern):
    return expand(pattern, relation=RELATIONS, shard=SHARDS)


# The functions below name other rules' outputs (rules.<name>.output): the input functions run
# once every rule is defined, all_outputs once the Snakefile has included them.
def model_job_costs(wildcards):
    """The cost file of every model-running job."""
    return (
        per_shard(rules.extract.output.cost)
        + [rules.baseline.output.cost]
        + per_relation(rules.ablate.output.cost)
    )


def corpus_shards(name):
    """Output `name` of every records job (rule corpus_records), e.g. corpus_shards("units")."""

    def outputs(wildcards):
        pattern = getattr(rules.corpus_records.output, name)
        return expand(pattern, shard=range(config["corpus"]["shards"]))

    return outputs


def report_inputs(wildcards):
    """What the report reads (neuronmap.report.inputs), by name: the outputs of the rules that
    write it, of the parts of the run this config runs."""
    outputs = {
        "model_dir": rules.prepare_model.output[0],
        "prompts": rules.merge_prompts.output[0],
        "baseline": rules.baseline.output.source,
        "units": per_relation(rules.stats.output.units),
        "expertise": per_relation(rules.stats.output.expertise),
        "overlap": rules.overlap.output[0],
        "significance": rules.ablation_summary.output.significance,
        "sweep": rules.ablation_summary.output.sweep,
        "verdicts": rules.verdicts.output[0],
        "versatility": rules.versatility.output[0],
        "stability": rules.stability.output[0],
        "neuron_stats": rules.neuron_stats.output.stats,
        "top_activations": rules.neuron_stats.output.top,
        "decoded": rules.decode.output[0],
        "perplexity": rules.ablation_summary.output.perplexity,
        "sparsity": rules.sparsity.output.layers,
        "languages": rules.ablation_summary.output.languages,
        "cost": rules.cost.output[0],
        "calibration": rules.calibrate.output[0],
        "plan": rules.plan.output[0],
        "contexts": rules.corpus_contexts.output[0],
        "corpus_units": rules.corpus_merge.output.units,
        "label_records": rules.label_select.output.records,
        "label_units": rules.label_select.output.units,
        "label_perplexity": rules.label_perplexity.output.summary,
        "label_overlap": rules.label_select.output.overlap,
        "explanations": rules.explain_merge.output.explanations,
        "explain_scores": rules.explain_merge.output.scores,
    }
    declared = {i.name for i in REPORT_INPUTS}
    if declared != set(outputs):
        raise WorkflowError(
            "the report's inputs declared in neuronmap.report.inputs and those report_inputs "
            f"names an output for differ: {', '.join(sorted(declared ^ set(outputs)))}"
        )
    return {i.name: outputs[i.name] for i in REPORT_INPUTS if PARTS[i.part]}


def report_options(wildcards, input):
    """The report's options for the files report_inputs names: --<name> <file(s)>."""
    files = {name: files for name, files in input.items() if name != "assets"}
    return " ".join(map(shlex.quote, report_file_options(files)))


def all_outputs():
    """The report, whichever parts run; the relation study's tables the report does
    not show; the corpus records where the config names a corpus."""
    outputs = [rules.report.output.html]
    if PARTS["study"]:
        outputs += [rules.shared_units.output[0], rules.sparsity.output.dead]
    if PARTS["corpus"]:
        merged = rules.corpus_merge.output
        outputs += [merged.units, merged.examples, merged.peak_tokens]
    if PARTS["labels"]:
        outputs += [rules.label_perplexity.output.summary]
    if PARTS["explain"]:
        outputs += list(rules.explain_merge.output)
    return outputs


def atlas_sources(wildcards):
    """What the atlas index reads: the files of every stage this config runs (each list empty
    where its stage does not run)."""

    def where(part, *files):
        return list(files) if PARTS[part] else []

    merged, labels = rules.corpus_merge.output, rules.label_select.output
    return {
        "units": where("corpus", merged.units),
        "examples": where("corpus", merged.examples),
        "peak_tokens": where("corpus", merged.peak_tokens),
        "neuron_stats": where("study", rules.neuron_stats.output.stats),
        "decoded": where("study", rules.decode.output[0]),
        "expertise": where("study", *per_relation(rules.stats.output.expertise)),
        "label_records": where("labels", labels.records),
        "label_units": where("labels", labels.units),
        "label_expertise": where("labels", labels.expertise),
        "explanations": where("explain", rules.explain_merge.output.explanations),
        "explain_scores": where("explain", rules.explain_merge.output.scores),
    }


def explain_sources(wildcards):
    """What the explain stage's unit selection reads (explain.units)."""
    kind = config["explain"]["units"]
    if kind.startswith("labels"):
        return {"label_units": rules.label_select.output.units}
    if kind == "relations":
        return {"relation_units": per_relation(rules.stats.output.units)}
    return {"corpus_units": rules.corpus_merge.output.units}


def explain_source_options(wildcards, input):
    """The selection's options for those files: --<name> <file(s)>."""
    words = []
    for name, files in input.items():
        words += [
            f"--{name.replace('_', '-')}",
            *([files] if isinstance(files, str) else files),
        ]
    return " ".join(map(shlex.quote, words))


def explain_shards(name):
    """Output `name` of every explain job (rule explain)."""

    def outputs(wildcards):
        return expand(getattr(rules.explain.output, name), shard=EXPLAIN_SHARDS)

    return outputs
