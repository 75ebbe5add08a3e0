"""Bad input: one clear message naming the key or file, a non-zero exit, nothing written.

Most problems are caught while Snakemake parses the workflow (rules/common.smk), before any
job starts, so the run's folder is never created. `top_k` larger than the number of units can
only be known once the model is loaded; the stats job rejects it, writing none of its outputs.
Every case reuses the e2e run's prepared model (a local directory), so nothing is converted.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO


def run_workflow(config: dict, tmp_path: Path, *targets: str) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run(["snakemake", "--configfile", str(path), "--cores", "2", "--workflow-profile",
                           "profiles/local", *targets], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=900)


@pytest.fixture(scope="module")
def base_config(e2e_run, e2e_config) -> dict:
    config = yaml.safe_load(e2e_config.read_text())
    config["model"] = str(e2e_run / "model")
    return config


@pytest.fixture
def run_name(base_config, request):
    name = f"{base_config['run']}-bad-{request.node.callspec.id if hasattr(request.node, 'callspec') else 'top-k'}"
    shutil.rmtree(REPO / "results" / name, ignore_errors=True)
    yield name
    shutil.rmtree(REPO / "results" / name, ignore_errors=True)


def relation_file(directory: Path, name: str, templates, samples) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps({"prompt_templates": templates, "samples": samples}))
    return path


def custom_relation(tmp_path, templates, samples) -> dict:
    directory = tmp_path / "relations"
    relation_file(directory, "broken", templates, samples)
    return {"relations": {"dir": str(directory), "names": ["broken"]}}


def unsupported_model(tmp_path) -> dict:
    model = tmp_path / "bert-like"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    return {"model": str(model)}


FACTS = [{"subject": f"subject {i}", "object": f"object {i}"} for i in range(40)]

# (case, change to the e2e config, what the one message must say)
PARSE_TIME = [
    ("unknown-key", lambda tmp: {"top_kk": [10]}, "config: Additional properties are not allowed ('top_kk' was unexpected)"),
    ("wrong-type", lambda tmp: {"top_k": "ten"}, "config: top_k: 'ten' is not of type 'array'"),
    ("missing-relation-file", lambda tmp: {"relations": {"names": ["no_such_relation"]}},
     "relations.names: no file no_such_relation.json under data/relations"),
    ("template-without-braces", lambda tmp: custom_relation(tmp, ["The capital of France is"], FACTS),
     "prompt_templates[0] 'The capital of France is' must contain exactly one {} for the subject"),
    ("relation-without-samples", lambda tmp: custom_relation(tmp, ["The capital of {} is"], []),
     "samples is empty, the relation has no facts"),
    ("more-shards-than-prompts", lambda tmp: {"shards": 500}, "shards 500"),
    ("missing-model-path", lambda tmp: {"model": str(tmp / "no" / "such" / "model")}, "does not exist"),
    ("unsupported-architecture", unsupported_model, "model: unsupported architecture 'bert'"),
]


def merged(config: dict, change: dict) -> dict:
    out = dict(config)
    for key, value in change.items():
        out[key] = {**config.get(key, {}), **value} if isinstance(value, dict) and key in config else value
    return out


@pytest.mark.parametrize("case, change, message", PARSE_TIME, ids=[case for case, _, _ in PARSE_TIME])
def test_bad_input_stops_before_any_job(base_config, run_name, tmp_path, case, change, message):
    config = merged({**base_config, "run": run_name}, change(tmp_path))
    result = run_workflow(config, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in output, output[-3000:]
    assert output.count(message) == 1 and "Traceback" not in output, output[-3000:]
    assert "rule " not in output  # no job was started
    assert not (REPO / "results" / run_name).exists()


def test_top_k_larger_than_the_units_fails_in_stats_writing_nothing(base_config, run_name, tmp_path):
    # The down site of SmolLM2-135M has 30 layers x 576 units = 17280 units.
    config = {**base_config, "run": run_name, "sites": ["down"], "top_k": [20000], "shards": 1,
              "relations": {**base_config["relations"], "max_facts": 12},
              "split": {**base_config["split"], "test_facts": 4}}
    relation = config["relations"]["names"][0]
    run_dir = REPO / "results" / run_name
    result = run_workflow(config, tmp_path, str(run_dir.relative_to(REPO) / "units" / f"{relation}.parquet"))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "top_k: 20000 is larger than the 17280 units ranked" in output, output[-3000:]
    assert "Traceback" not in output
    assert not list((run_dir / "units").glob("*")) and not list((run_dir / "expertise").glob("*.parquet"))
    assert not list(run_dir.rglob("*.tmp"))
