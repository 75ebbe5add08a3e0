import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test-fast` runs one worker per core: a worker's torch (and that of the processes it
    # starts) on one thread, or two workers' threads would contend for each core.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
RELATIONS = REPO / "data" / "relations"
# The venv's own Snakemake, by its path: a run finds the `neuronmap` of the environment that runs it.
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
# Options after which Snakemake starts no job: a test that passes one may stay in `make test-fast`.
STARTS_NO_JOB = {"-n", "--dry-run", "--dryrun", "--lint", "--summary", "--detailed-summary", "-D",
                 "--list-rules", "--unlock"}


def pytest_collection_modifyitems(items):
    """Every test that uses the end-to-end run is an `e2e` test (left out by `make test-fast`) and
    an `e2e_run` test (`make test` runs these in a session of their own, around the one run, beside
    a session of all the others); a test that starts workflow jobs otherwise, or a job's command as
    a process, carries the `e2e` marker itself."""
    for item in items:
        if "e2e_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.e2e_run)


_current_test: list = [None]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _current_test[0] = item


def snakemake_env(**overrides) -> dict:
    """The environment of a workflow run: the venv's tools first on PATH (jobs call `neuronmap`), offline."""
    return {**os.environ, "PATH": f"{SNAKEMAKE.parent}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
            **overrides}


def snakemake_command(config_path, *args, profile="profiles/local", cores=2, launcher=(str(SNAKEMAKE),)) -> list[str]:
    """The one way the tests start Snakemake: the venv's (or `launcher`, a command that runs its
    command line), a config file, a workflow profile, and `cores` (None for a cluster executor,
    whose profile says how many jobs run at once)."""
    command = [*launcher, "--configfile", str(config_path), "--workflow-profile", profile]
    if cores is not None:
        command += ["--cores", str(cores)]
    return [*command, *map(str, args)]


def run_snakemake(config_path, *args, timeout=1800, profile="profiles/local", cores=2, cwd=REPO,
                  env=None, kill_after=None, launcher=(str(SNAKEMAKE),)) -> subprocess.CompletedProcess:
    """Run the workflow of `cwd` (the repository) and wait; stdout and stderr are captured.
    `kill_after` seconds: SIGKILL then (`timeout -s KILL`), for a run that may hang and ignore
    SIGTERM (a SLURM run that never hears of its jobs).

    A test that starts jobs is slow: unless it is marked `e2e`, it fails here and says so, so
    that `make test-fast` stays fast. Dry runs and runs that stop while parsing are fine."""
    command = snakemake_command(config_path, *args, profile=profile, cores=cores, launcher=launcher)
    if kill_after is not None:
        command = ["timeout", "-s", "KILL", str(kill_after), *command]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env or snakemake_env(),
                            timeout=timeout)
    item = _current_test[0]
    if (item is not None and item.get_closest_marker("e2e") is None and not STARTS_NO_JOB & set(map(str, args))
            and "Finished jobid" in result.stdout + result.stderr):
        pytest.fail(f"{item.nodeid} ran workflow jobs: mark it @pytest.mark.e2e (make test-fast leaves those out)")
    return result


@pytest.fixture(scope="session")
def tiny_llama():
    """A randomly initialized Llama-architecture model: real code paths, no download."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The embedded SmolLM2-135M-Instruct, prepared once for the session (as the workflow does)."""
    from neuronmap.model.loading import prepare_model
    out = tmp_path_factory.mktemp("model") / "smollm2"
    prepare_model("builtin:smollm2-135m-instruct", out)
    return out


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from neuronmap.model.loading import load_model
    return load_model(smollm2_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def e2e_config(tmp_path_factory):
    """tests/data/tiny.yaml under the run name NEURONMAP_E2E_RUN (default e2e), so that
    concurrent test sessions can use distinct results/ folders."""
    import yaml
    config = yaml.safe_load((REPO / "tests" / "data" / "tiny.yaml").read_text())
    config["run"] = os.environ.get("NEURONMAP_E2E_RUN", "e2e")
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def e2e_run(e2e_config):
    """The end-to-end run of the real workflow on the embedded model, done once per session."""
    import shutil
    import yaml
    run_dir = REPO / "results" / yaml.safe_load(e2e_config.read_text())["run"]
    # NEURONMAP_E2E_KEEP=1 (while iterating on tests): keep the run, rerun only what changed.
    if os.environ.get("NEURONMAP_E2E_KEEP") != "1":
        shutil.rmtree(run_dir, ignore_errors=True)
    result = run_snakemake(e2e_config)
    assert result.returncode == 0, result.stderr[-5000:]
    return run_dir
