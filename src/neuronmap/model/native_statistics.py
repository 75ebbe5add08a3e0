"""The per-token statistics of `hooks.site_reductions` on the CPU, by statistics_kernel.c: one
pass over each site's activations on torch's own threads, no compilation per job. For gate, up
and act of a gated MLP, one call reads all three."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .native import compile_kernel

SOURCE = Path(__file__).with_name("statistics_kernel.c")


def available() -> bool:
    return _kernel() is not None


def _declare(library: ctypes.CDLL) -> None:
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    library.site_statistics.argtypes = [i64, pointer, i64, i64, i64, pointer, pointer, ctypes.c_float] + [pointer] * 7
    library.site_statistics.restype = None
    library.merge_top.argtypes = [i64, i64, i64] + [pointer] * 3 + [i64] + [pointer] * 3
    library.merge_top.restype = None


def _kernel() -> ctypes.CDLL | None:
    return compile_kernel(SOURCE, _declare)


def row_bounds(valid: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[start, end) of each row's valid tokens, for a TokenMask's right-padded `valid` [B, T]
    whose first column may be excluded."""
    return (~valid[:, 0]).to(torch.int64).contiguous(), lengths.to(torch.int64).contiguous()


def site_statistics(xs: list[torch.Tensor], bounds: tuple[torch.Tensor, torch.Tensor], active_threshold: float,
                    out: list[tuple[torch.Tensor, ...]] | None = None):
    """For each [B, T, n] CPU tensor of xs, what `site_reductions` returns, in its order: sums
    [B, n] float32, total_sq [n] float64, positive and active [n] int32, maxima [B, n] float32,
    peaks [B, n] int32, minimum [n] float32. With `out`, one such tuple of contiguous tensors per
    x, they are written there; by default into new tensors."""
    xs = [x.detach().to(torch.float32).contiguous() for x in xs]
    B, T, n = xs[0].shape
    if out is None:
        kinds = ((torch.float32, B), (torch.float64,), (torch.int32,), (torch.int32,), (torch.float32, B),
                 (torch.int32, B), (torch.float32,))
        out = [tuple(torch.empty(*shape, n, dtype=dtype) for dtype, *shape in kinds) for _ in xs]
    sums, total_sq, positive, active, maxima, peaks, minimum = (list(kind) for kind in zip(*out))
    pointers = lambda tensors: (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))
    starts, ends = bounds
    _kernel().site_statistics(len(xs), pointers(xs), B, T, n, starts.data_ptr(), ends.data_ptr(),
                              ctypes.c_float(active_threshold),
                              *(pointers(o) for o in (sums, maxima, peaks, total_sq, positive, active, minimum)))
    return out


def merge_top(values: torch.Tensor, prompts: torch.Tensor, positions: torch.Tensor, filled: int,
              peaks: torch.Tensor, peak_positions: torch.Tensor, row_prompts: torch.Tensor) -> int:
    """Merge a batch's peaks [B, n] (float32, positions int32, row_prompts [B] int64) into a
    running top of k rows, in place: values [k, n] float32 highest first, prompts int64 and
    positions int32 beside them, the first `filled` rows in use. Returns the rows in use after."""
    k, n = values.shape
    peaks, peak_positions = peaks.contiguous(), peak_positions.contiguous()
    row_prompts = row_prompts.to(torch.int64).contiguous()
    _kernel().merge_top(n, k, filled, values.data_ptr(), prompts.data_ptr(), positions.data_ptr(),
                        peaks.shape[0], peaks.data_ptr(), peak_positions.data_ptr(), row_prompts.data_ptr())
    return min(k, filled + peaks.shape[0])
