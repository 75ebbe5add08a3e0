"""What a change reruns: dry runs on a private copy of the workflow and of the end-to-end run.

The copy (workflow files, package sources, relation data and the e2e outputs) lets a test edit
a module or touch files without disturbing anyone. `snakemake --touch --forceall` adopts the
copied outputs, recording the same metadata a real run records (code, params, input list and
input checksums); the matrix then asks `--detailed-summary` which outputs a change would
regenerate, and compares with what depends on the change.
"""

import csv
import io
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_snakemake

PACKAGE = Path("src") / "neuronmap"


class Workdir:
    def __init__(self, root: Path, config: dict):
        self.root = root
        self.config = config
        self.run = f"results/{config['run']}"

    def snakemake(self, *args: str, config: dict | None = None) -> str:
        path = self.root / "config.test.yaml"
        path.write_text(yaml.safe_dump(config or self.config))
        result = run_snakemake(path, *args, cwd=self.root, timeout=300)
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
    for name in ("rules", "envs", "profiles", "data"):
        shutil.copytree(REPO / name, root / name)
    shutil.copytree(REPO / PACKAGE, root / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    config = yaml.safe_load(e2e_config.read_text())
    config.pop("corpus", None)  # the relation study's reruns; the corpus pass reads tests/data, not copied here
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
    # The plan sizes every job from the settings, top_k included; only the report reads it. The
    # selection checks' map step keeps each labeling's max(top_k) best units.
    assert "stats" in readers and readers - {"plan", "labeling_block"} <= rules_of(
        baseline, downstream(baseline, changed_rules={"stats"}))
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
    # the others (docs/workflow.md, "Rerunning after a change").
    assert {job["wildcards"].get("relation") for job in planned if job["rule"] == "stats"} == {*names, added}


MODEL_RUNNING = {"prepare_model", "extract", "decode", "baseline", "ablate"}
UPSTREAM_OF_STATS = {"prepare_model", "prepare_prompts", "merge_prompts", "prepare_language_prompts", "extract",
                     "neuron_stats"}


def edited(workdir: Workdir, module: str, edit) -> set[str]:
    """Outputs a run would regenerate after `edit` (text -> text) of one package module."""
    path = workdir.root / PACKAGE / module
    original = path.read_text()
    path.write_text(edit(original))
    try:
        return workdir.pending()
    finally:
        path.write_text(original)


def test_comments_docstrings_and_formatting_rerun_nothing(workdir, baseline):
    modules = sorted((workdir.root / PACKAGE).rglob("*.py"))
    originals = {path: path.read_text() for path in modules}
    try:
        for path, text in originals.items():
            # A comment, a reworded module docstring (or a new one), and blank lines.
            if text.startswith('"""'):
                text = '"""Reworded. ' + text[3:]
            else:
                text = '"""A new docstring."""\n' + text
            path.write_text(text + "\n\n# a comment at the end\n")
        assert workdir.pending() == set()
    finally:
        for path, text in originals.items():
            path.write_text(text)


# (module, a real edit, the rules whose jobs it must rerun directly)
REAL_CHANGES = [
    ("report/build.py", lambda text: text + "\nCHANGED = 1\n", {"report"}),
    ("ablate/ablation.py", lambda text: text + "\nCHANGED = 1\n", {"baseline", "ablate"}),
    ("ablate/commands.py",
     lambda text: text.replace("    s = args.settings\n", "    s = args.settings\n    assert s\n"),
     {"ablation_summary"}),
    ("stats/expertise.py", lambda text: text + "\nCHANGED = 1\n", {"stats_block", "stats", "labeling_block"}),
    ("extract/engine.py", lambda text: text + "\nCHANGED = 1\n", {"extract"}),
    ("model/architectures.py", lambda text: text + "\nCHANGED = 1\n", MODEL_RUNNING | {"plan"}),
]


@pytest.mark.parametrize("module, edit, direct", REAL_CHANGES, ids=[m for m, _, _ in REAL_CHANGES])
def test_a_real_change_reruns_its_commands_and_what_reads_them(workdir, baseline, module, edit, direct):
    pending = edited(workdir, module, edit)
    assert pending == downstream(baseline, changed_rules=direct)
    rules = rules_of(baseline, pending)
    if module.startswith(("report/", "ablate/", "stats/")):
        assert not rules & UPSTREAM_OF_STATS, rules  # never extraction for a change downstream of it
    if module == "report/build.py":
        assert rules == {"report"}


def test_changing_the_model_reruns_everything_that_uses_it(workdir, baseline):
    from neuronmap.model.source import builtin_gguf
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
    model_dir = results / "model"  # a directory: Snakemake has no checksum for it (docs/workflow.md)
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
