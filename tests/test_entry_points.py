"""Any way of starting the workflow finds the `neuronmap` of the environment that runs Snakemake:
the README's `.venv/bin/snakemake ...` works without the venv on PATH."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO


def test_snakemake_of_the_venv_runs_jobs_without_an_activated_venv(tmp_path):
    run = "entry-points"
    config = tmp_path / "my.yaml"
    config.write_text(yaml.safe_dump({"run": run}))
    target = f"results/{run}/prompts.parquet"
    snakemake = Path(sys.executable).parent / "snakemake"
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PATH="/usr/bin:/bin", HF_HUB_OFFLINE="1")
    shutil.rmtree(REPO / "results" / run, ignore_errors=True)
    try:
        result = subprocess.run([str(snakemake), target, "--cores", "2", "--workflow-profile", "profiles/local",
                                 "--configfile", str(config)], cwd=REPO, capture_output=True, text=True,
                                env=env, timeout=600)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        assert (REPO / target).is_file()
    finally:
        shutil.rmtree(REPO / "results" / run, ignore_errors=True)
