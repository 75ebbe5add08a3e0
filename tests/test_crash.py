"""A run killed with SIGKILL during extraction costs only the unfinished shards; a corrupt or
truncated Parquet input is reported as such, naming the file."""

import base64
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import REPO, run_snakemake, snakemake_command, snakemake_env

KILL_DEADLINE = 900   # s to wait for the first finished shard (a few seconds on an idle machine)
RUN_TIMEOUT = 900


# Extraction only (--until): the crash is about it, the rest of the run would add nothing.
UNTIL_EXTRACT = ("--until", "extract")


def _incomplete(path: Path) -> bool:
    """Snakemake's mark for an output whose job started and has not been recorded as finished."""
    key = base64.urlsafe_b64encode(str(path.relative_to(REPO)).encode()).decode()
    return (REPO / ".snakemake" / "incomplete" / key).exists()


def _finished_shards(run_dir: Path) -> list[Path]:
    """Response shards whose job finished: all of the job's outputs in place and recorded."""
    done = []
    for responses in sorted(run_dir.glob("responses/*/shard-*.parquet")):
        if responses.name.count(".") != 1:
            continue  # shard-N.stats.parquet and the like: other outputs of the same job
        outputs = [responses, *responses.parent.glob(f"{responses.stem}.*.parquet")]
        if not any(_incomplete(path) for path in outputs):
            done.append(responses)
    return done


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the run's process group, and any job process that left it."""
    descendants = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGKILL)
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=60)


def _remove_locks_of(run_dir: Path) -> None:
    """What `snakemake --unlock` does after a kill, for this run's locks only: other sessions
    may be running in the same working directory."""
    prefix = f"{run_dir.relative_to(REPO)}/"
    for lock in (REPO / ".snakemake" / "locks").glob("*.lock"):
        try:
            if any(line.startswith(prefix) for line in lock.read_text().splitlines()):
                lock.unlink()
        except FileNotFoundError:
            pass


def _snapshot(paths):
    return {path: (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()) for path in paths}


@pytest.fixture(scope="module")
def crash_config(e2e_run, e2e_config, tmp_path_factory):
    """The e2e config under its own run name, on the e2e run's prepared model (no conversion)."""
    config = yaml.safe_load(e2e_config.read_text())
    config["run"] = f"{config['run']}-crash"
    config.pop("corpus", None)  # killed during extraction: the relation study's jobs are what it counts
    config["model"] = str(e2e_run / "model")
    path = tmp_path_factory.mktemp("crash") / "crash.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = REPO / "results" / config["run"]
    shutil.rmtree(run_dir, ignore_errors=True)
    yield path, run_dir
    shutil.rmtree(run_dir, ignore_errors=True)


def test_sigkill_during_extraction_costs_only_the_unfinished_shards(crash_config):
    config_path, run_dir = crash_config
    process = subprocess.Popen(snakemake_command(config_path, *UNTIL_EXTRACT), cwd=REPO, env=snakemake_env(),
                               start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + KILL_DEADLINE
    try:
        while not _finished_shards(run_dir):
            assert process.poll() is None, "the run ended before any shard finished:\n" + process.stdout.read()[-3000:]
            assert time.monotonic() < deadline, f"no shard finished within {KILL_DEADLINE} s"
            time.sleep(0.2)
    finally:
        _kill_tree(process)
    process.stdout.close()

    all_shards = sorted(p for p in run_dir.glob("responses/*/shard-*.parquet") if p.name.count(".") == 1)
    finished = _finished_shards(run_dir)
    finished_outputs = [path for shard in finished
                        for path in [shard, *shard.parent.glob(f"{shard.stem}.*.parquet")]]
    before = _snapshot(finished_outputs)
    expected_jobs = 2 * yaml.safe_load(config_path.read_text())["shards"]  # two relations
    assert len(finished) < expected_jobs, "the kill came too late: every shard had finished"

    _remove_locks_of(run_dir)
    rerun = run_snakemake(config_path, *UNTIL_EXTRACT, timeout=RUN_TIMEOUT)
    assert rerun.returncode == 0, rerun.stderr[-5000:]
    log = rerun.stdout + rerun.stderr
    assert "rule prepare_model:" not in log and "rule prepare_prompts:" not in log
    rerun_shards = {(line.split("relation=")[1].split(",")[0], line.split("shard=")[1].split(",")[0].strip())
                    for line in log.splitlines() if "wildcards:" in line and "shard=" in line}
    finished_keys = {(shard.parent.name, shard.stem.split("-")[1]) for shard in finished}
    assert rerun_shards and not rerun_shards & finished_keys, (rerun_shards, finished_keys)
    assert len(rerun_shards) == expected_jobs - len(finished)
    assert _snapshot(finished_outputs) == before  # not rewritten, not even touched
    now_done = sorted(p for p in run_dir.glob("responses/*/shard-*.parquet") if p.name.count(".") == 1)
    assert len(now_done) == expected_jobs and set(all_shards) <= set(now_done)
    assert not list(run_dir.rglob("*.tmp")), "a killed job's temporary file was left behind"


def _neuronmap(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neuronmap", *args], capture_output=True, text=True,
                          env=snakemake_env(), timeout=300)


@pytest.mark.parametrize("damage", ["truncated", "not_parquet"])
def test_a_damaged_parquet_input_is_named(e2e_run, tmp_path, damage):
    source = e2e_run / "prompts.parquet"
    bad = tmp_path / f"{damage}.parquet"
    data = source.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"relation,prompt\nx,y\n" * 50)
    out = tmp_path / "out.parquet"
    result = _neuronmap("merge-prompts", "--inputs", str(source), str(bad), "--out", str(out))
    assert result.returncode == 2
    assert f"{bad}: not a readable Parquet file (corrupt or truncated?)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))
