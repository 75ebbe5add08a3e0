"""Pooled responses and deactivation, checked against computations that bypass neuronmap's hooks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neuronmap.model.architectures import MlpSites
from neuronmap.model.batching import encode
from neuronmap.model.deactivation import deactivated
from neuronmap.model.hooks import SiteRecorder, TokenMask, pooled_responses

TEXTS = ["The capital city of France is", "Paris", "The past tense of run is ran and the past tense of go is"]


def mlp_inputs(model, input_ids):
    """The MLP input of every layer from one unpadded forward, read by a plain torch hook."""
    captured, handles = [], []
    for layer in model.model.layers:
        handles.append(layer.mlp.register_forward_hook(
            lambda module, args, output: captured.append((args[0][0], output[0]))))
    try:
        with torch.inference_mode():
            model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@torch.no_grad()
def reference(model, tokenizer, text, pooling):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    out = {}
    for layer, (x, mlp_out) in enumerate(mlp_inputs(model, ids)):
        x, mlp_out = x.clone(), mlp_out.clone()
        mlp = model.model.layers[layer].mlp
        gate = x @ mlp.gate_proj.weight.T
        up = x @ mlp.up_proj.weight.T
        act = F.silu(gate) * up
        down = act @ mlp.down_proj.weight.T
        torch.testing.assert_close(down, mlp_out, rtol=1e-4, atol=1e-5)  # the decomposition is the MLP
        for site, value in (("gate", gate), ("up", up), ("act", act), ("down", down)):
            pooled = {"mean": value.mean(0), "max": value.max(0).values, "last": value[-1]}[pooling]
            out[(site, layer)] = pooled.double().numpy()
    return out


@pytest.mark.parametrize("pooling", ["mean", "max", "last"])
def test_pooled_response_matches_manual_computation(smollm2, pooling):
    model, tokenizer = smollm2
    batch = encode(tokenizer, TEXTS, torch.device("cpu"), padding_side="right")
    assert batch["attention_mask"].sum(1).unique().numel() == len(TEXTS)  # padding really happens
    pooled = pooled_responses(model, MlpSites(model), ["gate", "up", "act", "down"], pooling, batch)
    for i, text in enumerate(TEXTS):
        expected = reference(model, tokenizer, text, pooling)
        for (site, layer), value in expected.items():
            np.testing.assert_allclose(pooled[site][layer, i].numpy(), value, rtol=2e-3, atol=2e-4,
                                       err_msg=f"{site} layer {layer} prompt {i}")


def test_hooks_leave_logits_unchanged_and_are_removed(smollm2):
    model, tokenizer = smollm2
    batch = encode(tokenizer, TEXTS, torch.device("cpu"), padding_side="right")
    recorder = SiteRecorder(MlpSites(model), ["gate", "up", "act", "down"], ("mean", "max", "last"), 0.05)
    with torch.inference_mode():
        plain = model(**batch).logits
        with recorder.installed():
            recorder.start_batch(TokenMask.from_attention_mask(batch["attention_mask"]))
            hooked = model(**batch).logits
    assert torch.equal(plain, hooked)
    assert len(recorder.observations) == 4 * 30
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def raw_site_values(model, sites, site, layer, input_ids):
    point = sites.point(site, layer)
    seen = []

    def probe(module, args, output=None):
        seen.append((args[0] if point.is_input else output).clone())
    handle = (point.module.register_forward_pre_hook(probe) if point.is_input
              else point.module.register_forward_hook(probe))
    return seen, handle


@pytest.mark.parametrize("site", ["gate", "up", "act", "down"])
def test_deactivated_unit_is_exactly_zero_at_every_position(tiny_llama, site):
    sites = MlpSites(tiny_llama)
    units = [1, 5, 17]
    input_ids = torch.randint(1, 97, (2, 9))
    with deactivated(sites, {(site, 1): units}):
        seen, handle = raw_site_values(tiny_llama, sites, site, 1, input_ids)
        try:
            with torch.inference_mode():
                tiny_llama.generate(input_ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        finally:
            handle.remove()
    assert len(seen) == 3  # the prompt and every generated token went through the hook
    for values in seen:
        assert torch.all(values[..., units] == 0)
        others = [u for u in range(values.shape[-1]) if u not in units]
        assert torch.all(values[..., others] != 0)
    if site == "gate":  # SiLU(0) = 0: a deactivated gate silences the neuron's output too
        seen, handle = raw_site_values(tiny_llama, sites, "act", 1, input_ids)
        with deactivated(sites, {("gate", 1): units}), torch.inference_mode():
            tiny_llama(input_ids)
        handle.remove()
        assert torch.all(seen[0][..., units] == 0)


def test_empty_deactivation_changes_no_logit(tiny_llama):
    sites = MlpSites(tiny_llama)
    input_ids = torch.randint(1, 97, (3, 11))
    with torch.inference_mode():
        plain = tiny_llama(input_ids).logits
        with deactivated(sites, {("gate", 0): [], ("down", 2): []}):
            ablated = tiny_llama(input_ids).logits
        with deactivated(sites, {("up", 1): [3]}):
            changed = tiny_llama(input_ids).logits
    assert torch.equal(plain, ablated)
    assert not torch.equal(plain, changed)


def test_out_of_range_unit_is_rejected(tiny_llama):
    with pytest.raises(ValueError, match="out of range"):
        with deactivated(MlpSites(tiny_llama), {("down", 0): [32]}):
            pass
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny_llama.modules())


def test_a_mask_from_host_lengths_is_the_mask_from_the_attention_mask():
    lengths = [5, 2, 7, 1]
    attention = (torch.arange(7)[None] < torch.tensor(lengths)[:, None]).long()
    for exclude_first in (False, True):
        expected = TokenMask.from_attention_mask(attention, exclude_first)
        got = TokenMask.from_lengths(lengths, 7, exclude_first)
        assert got.count == expected.count
        for field in ("valid", "lengths", "counts"):
            assert torch.equal(getattr(got, field), getattr(expected, field)), field


def test_a_stack_of_layers_reduces_as_each_layer_does():
    """site_reductions on [L, B, T, n] gives, per layer, exactly what it gives that layer alone."""
    from neuronmap.model.hooks import site_reductions
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, 10)
    valid = TokenMask.from_lengths([6, 3, 1, 4], 6, exclude_first=True).valid.unsqueeze(-1)
    stacked = site_reductions(x, valid, 0.5)
    for layer in range(3):
        for whole, alone in zip(stacked, site_reductions(x[layer], valid, 0.5)):
            assert torch.equal(whole[layer], alone)


def test_the_torch_path_keeps_layers_apart_in_groups(smollm2, monkeypatch):
    """Layers reduced in several groups (a small GROUP_BYTES) give what one stack of all gives."""
    from neuronmap.model import hooks
    model, tokenizer = smollm2
    batch = encode(tokenizer, TEXTS, torch.device("cpu"), padding_side="right")
    whole = pooled_responses(model, MlpSites(model), ["gate", "down"], "last", batch)
    monkeypatch.setattr(hooks, "GROUP_BYTES", 1)  # every layer its own group
    grouped = pooled_responses(model, MlpSites(model), ["gate", "down"], "last", batch)
    for site in whole:
        assert torch.equal(whole[site], grouped[site]), site
