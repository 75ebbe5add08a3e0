"""A bad config stops the workflow before any job, with a message naming the offending key."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO


def dry_run(tmp_path, config):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["snakemake", "-n", "--configfile", str(path), "--cores", "1"], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("config, key", [
    ({"top_kk": [10]}, "top_kk"),
    ({"top_k": "ten"}, "top_k"),
    ({"pooling": "median"}, "pooling"),
    ({"split": {"test_facts": 0}}, "test_facts"),
    ({"evaluation": {"match_rule": "prefix"}}, "match_rule"),
    ({"ablation": {"configs_per_batch": 0}}, "configs_per_batch"),
    ({"ablation": {"configs_per_batch": "many"}}, "configs_per_batch"),
])
def test_config_error_names_the_key(tmp_path, config, key):
    result = dry_run(tmp_path, {"run": "config-test", **config})
    assert result.returncode != 0
    assert key in result.stderr + result.stdout
    assert not (REPO / "results" / "config-test").exists()


def test_default_config_is_valid(tmp_path):
    result = dry_run(tmp_path, {"run": "config-test"})
    assert result.returncode == 0, result.stderr
