"""The fused per-token statistics (the C kernel on the CPU, torch.compile'd on a GPU, or where
the kernel does not compile) equal the pass-by-pass ones."""

import pytest
import torch

from neuronmap.model import hooks, native_statistics
from neuronmap.model.architectures import MlpSites
from neuronmap.model.hooks import SiteRecorder, TokenMask, observe
from neuronmap.model.native import compile_kernel


def _batch(lengths, width, seed=0):
    torch.manual_seed(seed)
    tokens = max(lengths)
    attention = (torch.arange(tokens)[None] < torch.tensor(lengths)[:, None]).long()
    x = torch.randn(len(lengths), tokens, width)
    x[0, 0, :3] = 0.0  # exact zeros count neither as positive nor as active
    return x, attention


@pytest.fixture(params=["native", 4, 16, "compiled"],
                ids=["C kernel", "C kernel, 4 lanes", "C kernel, 16 lanes", "compiled"])
def fused_path(request, monkeypatch):
    """Runs a test on each fused path; the compiled one is what a GPU runs. The kernel is built
    for this CPU's vector width and, besides, for 4 and 16 lanes (SSE/NEON, AVX-512: on a CPU
    with narrower registers the compiler splits the vectors, so the numbers are the same)."""
    if request.param == "compiled":
        monkeypatch.setattr(hooks, "runs_natively", lambda x: False)
        return request.param
    if request.param != "native":
        kernel = compile_kernel(native_statistics.SOURCE, native_statistics._declare, (f"-DLANES={request.param}",))
        monkeypatch.setattr(native_statistics, "_kernel", lambda: kernel)
    assert native_statistics.available(), "the statistics kernel did not compile"
    return request.param


# Widths that fill whole cache lines of 16 units, end in a partial one, or are smaller than one
# (and so whole and partial vectors of each width); rows
# of one token with the first excluded have no valid token at all.
CASES = (([7, 5, 3], 16, False), ([9, 9], 8, True), ([4, 2, 2, 1], 12, False), ([6, 1, 3], 40, True),
         ([5, 5, 2], 37, False))


def test_fused_statistics_equal_the_pass_by_pass_ones(fused_path):
    for lengths, width, exclude_first in CASES:
        x, attention = _batch(lengths, width)
        mask = TokenMask.from_attention_mask(attention, exclude_first)
        eager = observe(x, mask, ("mean", "max", "last"), 0.5, fused=False)
        fused = observe(x, mask, ("mean", "max", "last"), 0.5, fused=True)
        assert not hooks._fusion_failed, "torch.compile was not available"
        for field in ("total", "total_sq", "minimum", "maximum"):
            torch.testing.assert_close(getattr(fused, field), getattr(eager, field), rtol=1e-5, atol=1e-5)
        for field in ("positive", "active", "peaks", "peak_positions"):
            assert torch.equal(getattr(fused, field), getattr(eager, field)), field
        for pooling in ("mean", "max", "last"):
            torch.testing.assert_close(fused.pooled[pooling], eager.pooled[pooling])
        valid = mask.valid.unsqueeze(-1)
        assert torch.equal(fused.positive, ((x > 0) & valid).sum((0, 1)).to(torch.int32))


def test_a_failed_compilation_falls_back_to_the_eager_path(monkeypatch):
    monkeypatch.setattr(hooks, "runs_natively", lambda x: False)

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(hooks, "_compiled", {hooks.site_reductions: broken})
    monkeypatch.setattr(hooks, "_fusion_failed", False)
    x, attention = _batch([5, 3], 6)
    mask = TokenMask.from_attention_mask(attention)
    seen = observe(x, mask, ("mean",), 0.1, fused=True)
    assert hooks._fusion_failed
    expected = observe(x, mask, ("mean",), 0.1, fused=False)
    torch.testing.assert_close(seen.total, expected.total)


def test_the_fused_mlp_forward_reads_what_the_hooks_read_and_is_removed(tiny_llama, fused_path):
    """Gate, up and act from the fused MLP forward against per-site hooks on the same batch;
    the model's output is unchanged to float rounding and its MLPs get their forward back."""
    sites = MlpSites(tiny_llama)
    input_ids = torch.randint(3, 97, (3, 9))
    attention = torch.ones_like(input_ids)
    attention[1, 6:] = 0
    attention[2, 2:] = 0
    mask = TokenMask.from_attention_mask(attention)
    seen = {}
    for fused in (False, True):
        recorder = SiteRecorder(sites, ["gate", "up", "act", "down"], ("mean", "max", "last"), 0.05, fused)
        with torch.inference_mode(), recorder.installed():
            recorder.start_batch(mask)
            logits = tiny_llama(input_ids=input_ids, attention_mask=attention).logits
            assert fused == ("forward" in vars(sites.mlp(0))), "the fused path replaces the MLP forward"
        seen[fused] = recorder.observations, logits
    assert not any("forward" in vars(sites.mlp(layer)) for layer in range(sites.n_layers))
    (hooked, plain_logits), (fused, fused_logits) = seen[False], seen[True]
    torch.testing.assert_close(fused_logits, plain_logits, rtol=1e-5, atol=1e-5)
    assert hooked.keys() == fused.keys()
    for key, expected in hooked.items():
        got = fused[key]
        for field in ("total", "total_sq", "minimum", "maximum", "peaks"):
            torch.testing.assert_close(getattr(got, field), getattr(expected, field), rtol=1e-4, atol=1e-5,
                                       msg=f"{key} {field}")
        for field in ("positive", "peak_positions"):
            assert torch.equal(getattr(got, field), getattr(expected, field)), (key, field)
        for pooling in ("mean", "max", "last"):
            torch.testing.assert_close(got.pooled[pooling], expected.pooled[pooling], rtol=1e-4, atol=1e-5)


def test_an_mlp_whose_forward_is_already_wrapped_is_read_by_hooks_and_left_alone(tiny_llama):
    sites = MlpSites(tiny_llama)
    mlp = sites.mlp(1)
    wrapper = mlp.forward  # what accelerate's device hooks do: an instance-level forward
    mlp.forward = wrapper
    try:
        recorder = SiteRecorder(sites, ["gate", "up", "act", "down"], ("mean",), 0.05, fused=True)
        input_ids = torch.randint(3, 97, (2, 5))
        with torch.inference_mode(), recorder.installed():
            recorder.start_batch(TokenMask.from_attention_mask(torch.ones_like(input_ids)))
            tiny_llama(input_ids=input_ids)
            assert vars(mlp)["forward"] is wrapper and "forward" not in vars(sites.mlp(0))
        assert len(recorder.observations) == 4 * sites.n_layers
        assert vars(mlp)["forward"] is wrapper
    finally:
        del mlp.forward


def test_auto_compiles_only_shards_large_enough_to_repay_it(monkeypatch):
    from neuronmap.extract.engine import FUSED_MIN_TOKENS, fuse_statistics, statistics_path
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert not fuse_statistics("auto", FUSED_MIN_TOKENS - 1, gpu)
    assert fuse_statistics("auto", FUSED_MIN_TOKENS, gpu)
    assert fuse_statistics(True, 1, gpu) and not fuse_statistics(False, 10 * FUSED_MIN_TOKENS, gpu)
    # On the CPU the C kernel costs no compilation: auto always fuses, unless it did not compile.
    assert fuse_statistics("auto", 1, cpu) and statistics_path(True, cpu) == "C kernel"
    assert not fuse_statistics(False, 1, cpu) and statistics_path(False, cpu) == "eager"
    monkeypatch.setattr(native_statistics, "available", lambda: False)
    assert not fuse_statistics("auto", FUSED_MIN_TOKENS - 1, cpu) and statistics_path(True, cpu) == "compiled"


def test_batch_buffers_are_kept_from_batch_to_batch():
    """A batch's observations land in blocks allocated once for the largest batch: the next
    batch writes the same memory, and a (pooling, site) is its [layers, rows, units] block."""
    buffers = hooks.BatchBuffers(3, {"gate": 5}, ("mean",), torch.float16)
    buffers.reserve(4)
    buffers.start(4)
    first = buffers.outputs("gate", 2)
    buffers.start(2)
    second = buffers.outputs("gate", 2)
    assert second.sums.shape == (2, 5) and second.sums.is_contiguous() and second.total.shape == (5,)
    assert second.sums.data_ptr() == first.sums.data_ptr() and second.total.data_ptr() == first.total.data_ptr()
    second.pooled["mean"].fill_(1.5)
    stacked = buffers.stacked("mean", "gate")
    assert stacked.shape == (3, 2, 5) and stacked.dtype == torch.float16 and bool((stacked[2] == 1.5).all())
