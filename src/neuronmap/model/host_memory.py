"""Host memory: keep the peak RSS of long jobs bounded by the batch."""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses more on 64-bit (half its 64 MiB heap size)


def return_large_buffers_to_the_os(threshold: int = 1 << 20) -> None:
    """Make glibc serve every host buffer of `threshold` bytes or more by mmap, so it goes back
    to the OS when freed. By default glibc raises that threshold each time a large buffer is
    freed, after which the per-batch activations (tens of MB, a new shape each batch) stay on
    its heap: on the default model that doubled the extraction's peak RSS (3.0 GB against
    1.6 GB) and made it drift with the number of batches. The price is a page-faulted fresh
    mapping per large buffer: the ablation's generation loop ran 40% slower with it, and
    extraction's whole-prompt batches 50% (bench/extract.py's floor, 2 cores: 13.5 s against
    8.8 s), so only decoding asks for it, whose top-k buffers a heap of decoded rows would pin.
    A user's MALLOC_MMAP_THRESHOLD_ wins; other C libraries are left alone."""
    _mallopt({_M_MMAP_THRESHOLD: threshold}, "MALLOC_MMAP_THRESHOLD_")


def reuse_freed_buffers(keep: int = 1 << 30) -> None:
    """Make glibc keep freed host buffers (up to 32 MiB each) on its heap for the next batch,
    and return at most `keep` bytes of free heap to the OS. For a job whose batches all have one
    shape (the corpus pass) the next batch needs the same buffers again; by default, glibc's
    moving thresholds had the records pass fault in about 900 MB of fresh pages per batch on the
    default model (0.3 s a batch, 12% of the forward) where the bare forward faulted in none.
    Peak RSS stays what one batch needs: the same shapes fit the same freed blocks. Extraction's
    length-sorted batches change shape, yet its peak stayed put too: 1404 MB at 512 prompts
    against 1386 MB with a fresh mapping per buffer (bench/extract.py's prompts, 2 cores). A user's
    MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ wins; other C libraries are left alone."""
    _mallopt({_M_MMAP_THRESHOLD: _MMAP_THRESHOLD_MAX, _M_TRIM_THRESHOLD: keep},
             "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _mallopt(values: dict[int, int], *user_variables: str) -> None:
    """glibc's mallopt(parameter, value) for each; nothing where a user set one of
    `user_variables` or the C library is not glibc."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in user_variables):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        for parameter, value in values.items():
            libc.mallopt(parameter, value)
    except (OSError, AttributeError):
        pass
