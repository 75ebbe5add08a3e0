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
    from neuronmap.model_loading import prepare_model
    out = tmp_path_factory.mktemp("model") / "smollm2"
    prepare_model("builtin:smollm2-135m-instruct", out)
    return out


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from neuronmap.model_loading import load_model
    return load_model(smollm2_dir, device="cpu", dtype="float32")
