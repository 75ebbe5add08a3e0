import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
RELATIONS = REPO / "data" / "relations"


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


def run_snakemake(config_path, *args, timeout=1800, profile="profiles/local"):
    """Run the real workflow from the repository, with the venv's tools on PATH."""
    import subprocess
    import sys
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run(["snakemake", "--configfile", str(config_path), "--cores", "2",
                           "--workflow-profile", profile, *args],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout)


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
