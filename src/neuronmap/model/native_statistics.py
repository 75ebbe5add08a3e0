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


def _kernel() -> ctypes.CDLL | None:
    return compile_kernel(SOURCE, _declare)


def row_bounds(valid: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[start, end) of each row's valid tokens, for a TokenMask's right-padded `valid` [B, T]
    whose first column may be excluded."""
    return (~valid[:, 0]).to(torch.int64).contiguous(), lengths.to(torch.int64).contiguous()


def site_statistics(xs: list[torch.Tensor], bounds: tuple[torch.Tensor, torch.Tensor], active_threshold: float):
    """For each [B, T, n] CPU tensor of xs, what `site_reductions` returns: sums, maxima [B, n]
    float32 and peaks [B, n] int32 per row; total_sq [n] float64, positive and active [n] int32,
    minimum [n] float32 per unit."""
    xs = [x.detach().to(torch.float32).contiguous() for x in xs]
    B, T, n = xs[0].shape
    new = lambda dtype, *shape: [torch.empty(*shape, n, dtype=dtype) for _ in xs]
    sums, maxima, peaks = new(torch.float32, B), new(torch.float32, B), new(torch.int32, B)
    total_sq, positive, active, minimum = new(torch.float64), new(torch.int32), new(torch.int32), new(torch.float32)
    pointers = lambda tensors: (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))
    starts, ends = bounds
    _kernel().site_statistics(len(xs), pointers(xs), B, T, n, starts.data_ptr(), ends.data_ptr(),
                              ctypes.c_float(active_threshold),
                              *(pointers(out) for out in (sums, maxima, peaks, total_sq, positive, active, minimum)))
    return [(s, q, p, a, m, k, lo) for s, q, p, a, m, k, lo in zip(sums, total_sq, positive, active, maxima, peaks,
                                                                     minimum)]
