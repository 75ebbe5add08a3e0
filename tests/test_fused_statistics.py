"""The fused (torch.compile'd) per-token statistics equal the pass-by-pass ones."""

import torch

from neuronmap import hooks
from neuronmap.hooks import TokenMask, observe


def _batch(lengths, width, seed=0):
    torch.manual_seed(seed)
    tokens = max(lengths)
    attention = (torch.arange(tokens)[None] < torch.tensor(lengths)[:, None]).long()
    x = torch.randn(len(lengths), tokens, width)
    x[0, 0, :3] = 0.0  # exact zeros count neither as positive nor as active
    return x, attention


def test_fused_statistics_equal_the_pass_by_pass_ones():
    for lengths, width, exclude_first in (([7, 5, 3], 16, False), ([9, 9], 8, True), ([4, 2, 2, 1], 12, False)):
        x, attention = _batch(lengths, width)
        mask = TokenMask.from_attention_mask(attention, exclude_first)
        eager = observe(x, mask, ("mean", "max", "last"), 2, 0.5, None, fused=False)
        fused = observe(x, mask, ("mean", "max", "last"), 2, 0.5, None, fused=True)
        assert not hooks._fusion_failed, "torch.compile was not available"
        for field in ("total", "total_sq", "minimum", "maximum"):
            torch.testing.assert_close(getattr(fused, field), getattr(eager, field), rtol=1e-5, atol=1e-5)
        for field in ("positive", "active", "top_values", "top_rows", "top_positions"):
            assert torch.equal(getattr(fused, field), getattr(eager, field)), field
        for pooling in ("mean", "max", "last"):
            torch.testing.assert_close(fused.pooled[pooling], eager.pooled[pooling])
        valid = mask.valid.unsqueeze(-1)
        assert torch.equal(fused.positive, ((x > 0) & valid).sum((0, 1)).float())


def test_a_failed_compilation_falls_back_to_the_eager_path(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(hooks, "_compiled_statistics", broken)
    monkeypatch.setattr(hooks, "_fusion_failed", False)
    x, attention = _batch([5, 3], 6)
    mask = TokenMask.from_attention_mask(attention)
    seen = observe(x, mask, ("mean",), 1, 0.1, None, fused=True)
    assert hooks._fusion_failed
    expected = observe(x, mask, ("mean",), 1, 0.1, None, fused=False)
    torch.testing.assert_close(seen.total, expected.total)
