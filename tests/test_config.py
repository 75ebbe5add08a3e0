"""A bad config stops the workflow before any job, with a message naming the offending key.

The schema's check is `neuronmap.config.schema.validated`, which rules/common.smk calls first
while Snakemake parses the workflow, and whose error stops the run there: tests/test_bad_input.py
shows that through Snakemake (unknown-key, wrong-type). Here each kind of bad value, in-process."""

import copy

import pytest
import yaml
from snakemake.utils import update_config

from neuronmap.config.schema import validated
from neuronmap.errors import NeuronmapError

from conftest import REPO, run_snakemake

# What Snakemake hands the workflow: config.yaml, with the user's --configfile merged over it.
DEFAULT = yaml.safe_load((REPO / "config.yaml").read_text())


@pytest.mark.parametrize("config, key", [
    ({"top_kk": [10]}, "top_kk"),
    ({"top_k": "ten"}, "top_k"),
    ({"pooling": "median"}, "pooling"),
    ({"split": {"test_facts": 0}}, "test_facts"),
    ({"evaluation": {"match_rule": "prefix"}}, "match_rule"),
    ({"ablation": {"configs_per_batch": 0}}, "configs_per_batch"),
    ({"ablation": {"configs_per_batch": "many"}}, "configs_per_batch"),
])
def test_config_error_names_the_key(config, key):
    merged = copy.deepcopy(DEFAULT)
    update_config(merged, {"run": "config-test", **config})
    with pytest.raises(NeuronmapError, match=key):
        validated(merged)


def test_default_config_is_valid(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"run": "config-test"}))
    result = run_snakemake(path, "-n", timeout=120)
    assert result.returncode == 0, result.stderr
    assert not (REPO / "results" / "config-test").exists()
