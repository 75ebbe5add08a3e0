"""Workflow hygiene, as CI checks it: `snakemake --lint` finds nothing and snakefmt would
change nothing (format with `.venv/bin/snakefmt Snakefile rules`)."""

import subprocess

from conftest import REPO, SNAKEMAKE, run_snakemake


def test_snakemake_lint_finds_nothing():
    result = run_snakemake(REPO / "config.yaml", "--lint", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Lints for" not in output, output[-4000:]


def test_snakefmt_would_change_nothing():
    result = subprocess.run([str(SNAKEMAKE.parent / "snakefmt"), "--check", "--diff", "Snakefile", "rules"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
