"""Any way of starting the workflow finds the `neuronmap` of the environment that runs Snakemake:
the README's `.venv/bin/snakemake ...` works without the venv on PATH."""

import os
import shutil

import pytest
import yaml

from conftest import REPO, run_snakemake

pytestmark = pytest.mark.e2e  # it runs a job


def test_snakemake_of_the_venv_runs_jobs_without_an_activated_venv(tmp_path):
    run = "entry-points"
    config = tmp_path / "my.yaml"
    config.write_text(yaml.safe_dump({"run": run}))
    target = f"results/{run}/prompts.parquet"
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PATH="/usr/bin:/bin", HF_HUB_OFFLINE="1")
    shutil.rmtree(REPO / "results" / run, ignore_errors=True)
    try:
        # run_snakemake starts the venv's snakemake by its path; the PATH here has no venv.
        result = run_snakemake(config, target, env=env, timeout=600)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        assert (REPO / target).is_file()
    finally:
        shutil.rmtree(REPO / "results" / run, ignore_errors=True)
