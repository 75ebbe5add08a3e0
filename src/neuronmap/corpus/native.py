"""The records kernel (records_kernel.c), compiled by model.native. Its threads split the units,
so they never write the same memory. Where it does not compile, `load()` returns None and the
records are computed by the torch code in reductions.py: the same numbers to float rounding."""

from __future__ import annotations

import ctypes
from pathlib import Path

from ..model.native import compile_kernel

SOURCE = Path(__file__).with_name("records_kernel.c")


def _declare(library: ctypes.CDLL) -> None:
    pointer, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    library.records_reduce.argtypes = ([pointer, i64, i64, i64, pointer, i64, f32] + [pointer] * 10
                                        + [i64, pointer, pointer, pointer, i64, pointer, pointer, pointer, i64]
                                        + [pointer, pointer])
    library.records_reduce.restype = ctypes.c_int


def load() -> ctypes.CDLL | None:
    return compile_kernel(SOURCE, _declare)
