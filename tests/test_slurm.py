"""The end-to-end config on a real SLURM cluster, through profiles/slurm.

CI starts a one-node cluster with two stand-in GPUs (.ci/start-slurm). Elsewhere, or when that
cluster is busy, the test skips and says why; it never submits to a cluster other than this
machine's own, and every wait is bounded.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal

from conftest import REPO, run_snakemake

# Every test here reads the SLURM run, which compares itself with the local e2e run (a fixture
# that tests/conftest.py does not see: slurm_run asks for it only once SLURM is there).
pytestmark = [pytest.mark.e2e, pytest.mark.e2e_run]

# The tiny run (31 SLURM jobs) took 4 minutes on a 2-core AMD EPYC at load 2-3 (5 with the
# plugin's own status poll, 11 at load 10-13), where the local run takes about 3 (SLURM adds a
# Snakefile parse and a status poll to each job). Beyond this bound something hangs, and the run
# is killed.
RUN_TIMEOUT = 900
PROBE_TIMEOUT = 20
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.")


def _probe(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT)


def cluster_problem() -> str | None:
    """Why the SLURM test cannot run on this machine now, or None if it can."""
    for tool in ("sinfo", "sbatch", "squeue", "scancel"):
        if shutil.which(tool) is None:
            return f"{tool} not found: no SLURM here (CI starts a one-node cluster with .ci/start-slurm)"
    try:
        nodes = _probe("sinfo", "-h", "-N", "-o", "%N|%T|%G")
        if nodes.returncode != 0 or not nodes.stdout.strip():
            return f"no SLURM controller answers: {(nodes.stderr or nodes.stdout).strip()}"
        queue = _probe("squeue", "-h", "-o", "%i")
    except subprocess.TimeoutExpired:
        return f"the SLURM controller did not answer within {PROBE_TIMEOUT} s"
    rows = [line.split("|") for line in nodes.stdout.split()]
    host = socket.gethostname().split(".")[0]
    if [row[0] for row in rows] != [host]:
        return (f"SLURM nodes {[row[0] for row in rows]} are not this machine ({host}): "
                "the test only submits to the local one-node cluster of .ci/start-slurm")
    _, state, gres = rows[0]
    if state != "idle":
        return f"the node {host} is {state}, not idle"
    if "gpu:2" not in gres:
        return f"the node {host} offers {gres}, not the two stand-in GPUs of .ci/start-slurm"
    if queue.stdout.strip():
        return f"the cluster is busy: jobs {queue.stdout.split()} are queued or running"
    return None


def cancel_jobs_named(prefix: str) -> None:
    """Cancel this run's jobs that are still queued or running (after a timeout), and no other."""
    listing = _probe("squeue", "-h", "-o", "%i %j")
    ours = [job for job, name in (line.split(maxsplit=1) for line in listing.stdout.splitlines())
            if name.startswith(prefix)]
    if ours:
        subprocess.run(["scancel", *ours], timeout=PROBE_TIMEOUT)


def job_stats(log: str) -> dict[str, int]:
    """The "Job stats" table Snakemake prints before running: rule -> number of jobs."""
    table = log.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    counts = {}
    for line in table.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


@pytest.fixture(scope="module")
def slurm_run(request, e2e_config, tmp_path_factory):
    """The e2e config under its own run name, every job submitted with sbatch."""
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)
    # Only now the local run (a session fixture requested by a test would come before the skip).
    local_run = request.getfixturevalue("e2e_run")
    config = yaml.safe_load(e2e_config.read_text())
    config["run"] = f"{config['run']}-slurm"
    config.pop("corpus", None)  # the relation study's jobs on SLURM (the corpus jobs are the same kind): CI time
    config_path = tmp_path_factory.mktemp("slurm") / "slurm.yaml"
    config_path.write_text(yaml.safe_dump(config))
    run_dir = REPO / "results" / config["run"]
    shutil.rmtree(run_dir, ignore_errors=True)
    prefix = f"neuronmap-test-{os.getpid()}"
    try:
        result = run_snakemake(
            config_path,
            # This cluster has no accounting database: no sacct answers, no accounts.
            "--slurm-status-command", "squeue", "--slurm-no-account",
            "--slurm-init-seconds-before-status-checks", "2",
            "--slurm-keep-successful-logs", "--slurm-logdir", run_dir / "slurm_logs",
            "--slurm-jobname-prefix", prefix,
            profile="profiles/slurm", cores=None, kill_after=RUN_TIMEOUT, timeout=RUN_TIMEOUT + 60,
            # Snakemake with the status poll every 2 s, not 10 s later after each poll that found
            # no job finished: the run's time is its jobs', not the waits (steady_poll_snakemake.py).
            launcher=(sys.executable, str(REPO / "tests" / "steady_poll_snakemake.py")))
    finally:
        cancel_jobs_named(prefix)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"exit {result.returncode} (-9/137: killed after {RUN_TIMEOUT} s)\n{output[-6000:]}"
    return run_dir, output, local_run


def test_every_job_is_a_slurm_job(slurm_run):
    run_dir, output, _ = slurm_run
    planned = job_stats(output)
    submitted = [(int(job), int(slurm_id), Path(log)) for job, slurm_id, log in SUBMITTED.findall(output)]
    by_rule: dict[str, int] = {}
    for _, slurm_id, log in submitted:
        # The plugin names each job's SLURM log <logdir>/rule_<rule>/<wildcards>/<SLURM job id>.log.
        assert log.is_file() and log.stem == str(slurm_id), log
        rule = next(part[len("rule_"):] for part in log.parts if part.startswith("rule_"))
        by_rule[rule] = by_rule.get(rule, 0) + 1
        text = log.read_text()
        assert f"rule {rule}:" in text or f"localrule {rule}:" in text, (log, text[-2000:])
    assert len({slurm_id for _, slurm_id, _ in submitted}) == len(submitted)
    # Every job but the target rule `all` (no command, nothing to submit) went through sbatch.
    assert by_rule == {rule: n for rule, n in planned.items() if rule != "all"}
    assert by_rule.get("extract", 0) >= 2


def test_each_extraction_job_sees_its_gpu(slurm_run):
    run_dir, _, e2e_run = slurm_run
    logs = sorted((run_dir / "logs" / "extract").glob("*.log"))
    assert logs
    for log in logs:
        devices = re.findall(r"CUDA_VISIBLE_DEVICES=(\S+)", log.read_text())
        # --gpus=1 on a node with gpu:2: SLURM hands each job one of the two devices.
        assert devices and devices[0] in ("0", "1"), (log, devices)
    if "CUDA_VISIBLE_DEVICES" not in os.environ:  # and outside SLURM, nobody assigns one
        local = [re.findall(r"CUDA_VISIBLE_DEVICES=(\S+)", log.read_text())
                 for log in (e2e_run / "logs" / "extract").glob("*.log")]
        assert local and not {"0", "1"} & {value for values in local for value in values}


def test_outputs_equal_the_local_run(slurm_run):
    run_dir, _, e2e_run = slurm_run
    # The SLURM run is the relation study alone: no corpus pass, no labels stage, and no atlas
    # index (which the atlas tests build in the local run).
    local = sorted(p.relative_to(e2e_run) for p in e2e_run.rglob("*.parquet")
                   if not {"corpus", "labels", "atlas"} & set(p.relative_to(e2e_run).parts))
    on_slurm = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*.parquet"))
    assert on_slurm == local and local
    # What the jobs measured of themselves (seconds and rates) differs from run to run; what they
    # forwarded does not.
    timings = ["seconds", "tokens_per_s", "bare_tokens_per_s", "ratio_to_bare", "peak_rss_mib"]
    for relative in local:
        slurm, here = pl.read_parquet(run_dir / relative), pl.read_parquet(e2e_run / relative)
        if relative.parts[0] == "cost" or relative.name == "cost.parquet":
            slurm, here = slurm.drop(timings, strict=False), here.drop(timings, strict=False)
        assert_frame_equal(slurm, here, rel_tol=1e-4, abs_tol=1e-6)
