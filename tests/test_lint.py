"""Workflow hygiene, as CI checks it: `snakemake --lint` finds nothing and snakefmt would
change nothing (format with `.venv/bin/snakefmt Snakefile rules`)."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def _run(*command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)


def test_snakemake_lint_finds_nothing():
    result = _run("snakemake", "--lint")
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Lints for" not in output, output[-4000:]


def test_snakefmt_would_change_nothing():
    result = _run("snakefmt", "--check", "--diff", "Snakefile", "rules")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
