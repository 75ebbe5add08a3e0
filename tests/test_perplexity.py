"""Perplexity of a text under ablation configurations sharing forward passes."""

import math

import pytest
import torch

from neuronmap.ablate import perplexity
from neuronmap.model.architectures import MlpSites
from neuronmap.model.deactivation import Deactivation, deactivated
from neuronmap.errors import NeuronmapError

# (units, value): each as a RowDeactivation configuration and as a single `deactivated` context.
SETTINGS = [({}, 0.0), ({("gate", 0): [2, 3], ("act", 2): [11]}, 0.0), ({("down", 1): [5]}, 3.0)]


def hf_loss(model, input_ids):
    """Hugging Face's own causal-LM loss: mean NLL of every token given the ones before it."""
    with torch.inference_mode():
        return model(input_ids, labels=input_ids).loss.item()


def test_mean_nll_equals_the_models_own_loss_per_configuration(tiny_llama, monkeypatch):
    torch.manual_seed(4)
    input_ids = torch.randint(1, 97, (1, 40))
    # A logit budget of two rows: three configurations take two passes, so grouping is exercised too.
    monkeypatch.setattr(perplexity, "LOGIT_BUDGET", 2 * 40 * 97 * 4)
    nll = perplexity.mean_nll(tiny_llama, input_ids, [Deactivation.constant(u, v) for u, v in SETTINGS])
    for (units, value), got in zip(SETTINGS, nll):
        with deactivated(MlpSites(tiny_llama), units, value):
            assert got == pytest.approx(hf_loss(tiny_llama, input_ids), rel=1e-5)
    assert nll[1] != pytest.approx(nll[0])
    assert perplexity.perplexity(nll[0]) == pytest.approx(math.exp(nll[0]))


def test_shipped_neutral_text_is_a_few_hundred_tokens(smollm2):
    from conftest import REPO
    _, tokenizer = smollm2
    ids = perplexity.read_text(REPO / "data" / "neutral_text.txt", tokenizer, max_tokens=10_000)
    assert 250 <= ids.shape[1] <= 600


def test_missing_text_is_named(tmp_path):
    with pytest.raises(NeuronmapError, match="perplexity.text: .*nothing.txt not found"):
        perplexity.read_text(tmp_path / "nothing.txt", None, 10)
