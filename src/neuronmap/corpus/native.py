"""The records kernel (records_kernel.c), compiled by model.native. Its threads split the units,
so they never write the same memory. Where it does not compile, `load()` returns None and the
records are computed by the torch code in reductions.py: the same numbers to float rounding."""

from __future__ import annotations

import ctypes
import functools
import logging
import time
from pathlib import Path

import numpy as np

from ..io.histogram import BINS
from ..model.native import compile_kernel

SOURCE = Path(__file__).with_name("records_kernel.c")

log = logging.getLogger(__name__)


def _declare(library: ctypes.CDLL) -> None:
    pointer, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    library.records_reduce.argtypes = ([pointer, i64, i64, i64, pointer, i64, f32] + [pointer] * 10
                                        + [i64, pointer, pointer, pointer, i64, pointer, pointer, pointer, i64]
                                        + [pointer, pointer, ctypes.c_int])
    library.records_reduce.restype = ctypes.c_int
    library.records_can_scatter.argtypes = []
    library.records_can_scatter.restype = ctypes.c_int


def load() -> ctypes.CDLL | None:
    return compile_kernel(SOURCE, _declare)


@functools.cache
def scatter_histogram(library: ctypes.CDLL) -> bool:
    """Whether this CPU counts the histograms faster with AVX-512's gather and scatter than with
    scalar increments: it depends on the chip (records_kernel.c), so both are timed once per
    process on a synthetic batch (about 35 ms on 2 cores) and the faster is used. The counts are the same."""
    if not library.records_can_scatter():
        return False
    seconds = {mode: [] for mode in (True, False)}
    batch = _SyntheticBatch()
    for round_ in range(6):
        for mode in seconds:
            start = time.perf_counter()
            batch.reduce(library, mode)
            if round_:  # the first round pays for the pages
                seconds[mode].append(time.perf_counter() - start)
    chosen = min(seconds, key=lambda mode: float(np.median(seconds[mode])))
    log.info("records kernel: histograms by %s (gather and scatter %.2f ms, increments %.2f ms per batch)",
             "gather and scatter" if chosen else "scalar increments",
             1e3 * float(np.median(seconds[True])), 1e3 * float(np.median(seconds[False])))
    return chosen


class _SyntheticBatch:
    """Activations shaped like a model's (units of unlike scales, signs a coin toss) and the
    running records they go into: what the kernel's two ways of counting are timed on."""

    def __init__(self, rows: int = 8, tokens: int = 64, width: int = 512, cap: int = 16):
        rng = np.random.default_rng(0)
        scale = np.exp(rng.normal(-1.0, 1.0, width)).astype(np.float32)
        self.x = rng.standard_normal((rows, tokens, width), dtype=np.float32) * scale
        self.shape, self.cap = (rows, tokens, width), cap
        self.lengths = np.full(rows, tokens, np.int64)
        self.contexts = np.arange(rows, dtype=np.int64)
        self.doubles = [np.zeros(width) for _ in range(4)]
        self.counts = [np.zeros(width, np.int64) for _ in range(2)]
        self.extremes = [np.full(width, np.inf, np.float32), np.full(width, -np.inf, np.float32)]
        self.hist = np.zeros((width, BINS), np.int32)
        self.heaps = [(np.zeros((width, cap), np.int64), np.zeros((width, cap), np.int32), np.zeros(width, np.int64))
                      for _ in range(2)]

    def reduce(self, library: ctypes.CDLL, scatter: bool) -> None:
        def p(array):
            return array.ctypes.data
        rows, tokens, width = self.shape
        heaps = [value for keys, positions, roots in self.heaps for value in (p(keys), p(positions), p(roots), self.cap)]
        library.records_reduce(p(self.x), rows, tokens, width, p(self.lengths), 0, ctypes.c_float(0.05),
                               *(p(a) for a in self.doubles), *(p(a) for a in self.counts),
                               *(p(a) for a in self.extremes), p(self.hist), p(self.contexts), 0, *heaps,
                               None, None, int(scatter))
