"""LM-head decoding of every neuron's vectors, against a direct matmul on tiny models."""

import polars as pl
import pytest
import torch

from neuronmap.stats.decode import decode_neurons, final_norm_gain


class CharTokenizer:
    """Token i decodes to "<i>": enough to check the token strings line up with the ids."""

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def batch_decode(self, ids):
        return [f"<{i[0]}>" for i in ids]


@pytest.fixture(scope="module")
def llama_with_gain():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(2)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 2.0)  # a gain that is not all ones, so it shows
    return model


def direct(model, site, layer, unit, norm_gain, gain=None):
    mlp = model.model.layers[layer].mlp
    vector = {"up": mlp.up_proj.weight[unit], "gate": mlp.gate_proj.weight[unit],
              "act": mlp.down_proj.weight[:, unit]}[site]
    if norm_gain:
        vector = vector * (model.model.norm.weight if gain is None else gain)
    return model.lm_head.weight @ vector


@pytest.mark.parametrize("search", ["float32", "bfloat16"])
def test_top_tokens_and_scores_equal_a_direct_matmul(llama_with_gain, search):
    """float32: one exact matmul; bfloat16: candidates found in bfloat16, then rescored exactly."""
    model = llama_with_gain
    table = pl.from_arrow(decode_neurons(model, CharTokenizer(97), top_n=5, chunk_size=7, search=search))
    assert table.height == 2 * 48 * 3 * 2  # layers x units x sites x norm variants
    assert table.select("site", "layer", "unit", "norm_gain").n_unique() == table.height
    for row in table.sample(40, seed=0).iter_rows(named=True):
        with torch.no_grad():
            scores = direct(model, row["site"], row["layer"], row["unit"], row["norm_gain"])
        top = torch.topk(scores, 5)
        assert row["token_ids"] == top.indices.tolist(), row
        torch.testing.assert_close(torch.tensor(row["scores"]), top.values, rtol=1e-5, atol=1e-6)
        assert row["tokens"] == [f"<{i}>" for i in top.indices.tolist()]


def test_norm_gain_changes_the_ranking(llama_with_gain):
    table = pl.from_arrow(decode_neurons(llama_with_gain, CharTokenizer(97), site_names=["up"], top_n=3))
    with_gain = table.filter(pl.col("norm_gain")).sort("layer", "unit")["token_ids"]
    without = table.filter(~pl.col("norm_gain")).sort("layer", "unit")["token_ids"]
    assert (with_gain != without).any()


def test_gemma_gain_is_one_plus_weight():
    from transformers import GemmaConfig, GemmaForCausalLM
    torch.manual_seed(0)
    model = GemmaForCausalLM(GemmaConfig(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)).eval()
    with torch.no_grad():
        model.model.norm.weight.uniform_(-0.5, 0.5)
    gain = final_norm_gain(model)
    torch.testing.assert_close(gain, 1 + model.model.norm.weight)
    # Gemma's norm multiplies by (1 + weight): check against the module itself on a unit-RMS input.
    x = torch.ones(1, 16)
    torch.testing.assert_close(model.model.norm(x)[0], gain, rtol=1e-4, atol=1e-4)
    table = pl.from_arrow(decode_neurons(model, CharTokenizer(61), site_names=["act"], norm_variants=[True],
                                         top_n=4))
    row = table.row(3, named=True)
    with torch.no_grad():
        scores = direct(model, "act", 0, row["unit"], True, gain=gain)
    assert row["token_ids"] == torch.topk(scores, 4).indices.tolist()


@pytest.mark.parametrize("columns", [49_152, 49_152 + 37])
def test_grouped_top_k_equals_torch_topk(columns):
    from neuronmap.stats.decode import top_k_rows
    scores = torch.randn(64, columns, generator=torch.Generator().manual_seed(columns))
    scores[3] = 0.0  # a row of ties: values still exact
    scores[5, -1] = 100.0  # the largest in the padded last group
    ids, values = top_k_rows(scores, 10)
    top = torch.topk(scores, 10, dim=1)
    assert torch.equal(values, top.values)
    assert torch.equal(torch.cat([ids[:3], ids[4:]]), torch.cat([top.indices[:3], top.indices[4:]]))
    assert torch.equal(scores.gather(1, ids), values)
