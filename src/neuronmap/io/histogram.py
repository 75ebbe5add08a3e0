"""The mergeable histogram of every unit's values over the corpus (the hist_bins and hist_counts
columns of the corpus tables), and quantiles read from it.

Bins follow the float's own bits: a value's sign, its binary exponent and the top SUB_BITS bits
of its mantissa. So each octave [2^e, 2^(e+1)) of |x| is cut into 2^SUB_BITS equal bins, for
e from MIN_EXPONENT to MIN_EXPONENT + OCTAVES - 1; |x| < 2^MIN_EXPONENT falls in one zero bin,
and the outermost bins on each side take everything beyond. Bin i (0..BINS-1) runs from the most
negative values to the most positive; HALF is the zero bin. Counts are integers, so histograms
add exactly across batches, shards and resumed jobs.

Error bound of a quantile (`quantiles`): the estimate is the middle of the bin that holds the
requested order statistic, clamped to the unit's exact [min, max], so it is within
|q| / 2^(SUB_BITS+1) (6.25%) of the true quantile q for |q| >= 2^MIN_EXPONENT (1/256), and
within 2^MIN_EXPONENT of it below that; beyond 2^(MIN_EXPONENT+OCTAVES) (4096) in magnitude the
outermost bin gives only the bound [4096, max]. The true quantile is the lower order statistic:
the ceil(q·count)-th smallest value (numpy's method="inverted_cdf").
"""

from __future__ import annotations

import numpy as np
import torch

# Kept in step with the macros of corpus/records_kernel.c.
SUB_BITS = 3
MIN_EXPONENT = -8
OCTAVES = 20
HALF = OCTAVES << SUB_BITS
BINS = 2 * HALF + 1
RELATIVE_ERROR = 2.0 ** -(SUB_BITS + 1)
ABSOLUTE_FLOOR = 2.0 ** MIN_EXPONENT

QUANTILES = {"p1": 0.01, "p10": 0.10, "p50": 0.50, "p90": 0.90, "p99": 0.99, "p99_9": 0.999, "p99_99": 0.9999}


def bins_of(x: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """The bin of each float32 value, as records_kernel.c computes it (any device). Computed in
    int32 (every code fits), so that `dtype=torch.int32` costs no widening pass over a batch."""
    bits = x.float().contiguous().view(torch.int32)
    magnitude = bits & 0x7FFFFFFF
    code = (magnitude >> (23 - SUB_BITS)) - ((127 + MIN_EXPONENT) << SUB_BITS)
    code = code.clamp(max=HALF - 1)
    signed = torch.where(bits < 0, HALF - 1 - code, HALF + 1 + code)
    return torch.where(code < 0, HALF, signed).to(dtype)


def _magnitude_edges() -> tuple[np.ndarray, np.ndarray]:
    code = np.arange(HALF)
    step = 2.0 ** (MIN_EXPONENT + code // (1 << SUB_BITS))
    lower = step * (1 + (code % (1 << SUB_BITS)) / (1 << SUB_BITS))
    upper = lower + step / (1 << SUB_BITS)
    upper[-1] = np.inf
    return lower, upper


def bin_edges() -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper edge of each bin ([BINS] each; the outermost are infinite)."""
    lower, upper = _magnitude_edges()
    low = np.concatenate([-upper[::-1], [-ABSOLUTE_FLOOR], lower])
    high = np.concatenate([-lower[::-1], [ABSOLUTE_FLOOR], upper])
    return low, high


def bin_middles() -> np.ndarray:
    low, high = bin_edges()
    middle = (low + high) / 2
    middle[HALF] = 0.0
    return middle


def quantiles(counts: np.ndarray, minimum: np.ndarray, maximum: np.ndarray, qs) -> np.ndarray:
    """[units, len(qs)] quantile estimates from dense [units, BINS] counts (see the bound above)."""
    cumulative = np.cumsum(counts, axis=1)
    total = cumulative[:, -1]
    low, high = bin_edges()
    middle = bin_middles()
    out = np.empty((counts.shape[0], len(qs)))
    for column, q in enumerate(qs):
        rank = np.clip(np.ceil(q * total), 1, np.maximum(total, 1))
        index = (cumulative >= rank[:, None]).argmax(axis=1)
        estimate = middle[index]
        # The outermost bins are unbounded: the exact extreme is the best estimate there.
        estimate = np.where(index == BINS - 1, np.maximum(maximum, low[-1]), estimate)
        estimate = np.where(index == 0, np.minimum(minimum, high[0]), estimate)
        out[:, column] = np.clip(estimate, minimum, maximum)
    out[total == 0] = np.nan
    return out


def to_lists(counts: np.ndarray):
    """Dense [units, BINS] counts as two Arrow list arrays: each unit's non-empty bins and their
    counts (tables.RECORDS_PARTIAL's hist_bins and hist_counts)."""
    import pyarrow as pa
    counts = np.ascontiguousarray(counts)
    # One pass over a flat mask: 2-D np.nonzero took 0.26 s of a records job's 120 calls.
    flat = np.flatnonzero(counts.ravel() != 0)
    unit, index = np.divmod(flat, counts.shape[1])
    offsets = np.zeros(counts.shape[0] + 1, np.int32)
    np.cumsum(np.bincount(unit, minlength=counts.shape[0]), out=offsets[1:])
    return (pa.ListArray.from_arrays(offsets, pa.array(index.astype(np.int16))),
            pa.ListArray.from_arrays(offsets, pa.array(counts.ravel()[flat].astype(np.int64, copy=False))))


def to_runs(counts: np.ndarray):
    """Dense [units, BINS] counts as each unit's first non-empty bin (int16) and an Arrow list of
    the int32 counts from there to its last non-empty bin (tables.RECORDS_PARTIAL's hist_first and
    hist_run; a unit with no values: 0 and an empty run). Counts must fit int32 (a shard's do)."""
    import pyarrow as pa
    counts = np.ascontiguousarray(counts)
    filled = counts != 0
    first = filled.argmax(axis=1)  # 0 for a unit without values
    last = np.where(filled.any(axis=1), counts.shape[1] - 1 - filled[:, ::-1].argmax(axis=1), -1)
    offsets = np.zeros(counts.shape[0] + 1, np.int32)
    np.cumsum(last - first + 1, out=offsets[1:])
    column = np.arange(counts.shape[1])
    inside = (column >= first[:, None]) & (column <= last[:, None])
    return (first.astype(np.int16),
            pa.ListArray.from_arrays(offsets, pa.array(counts[inside].astype(np.int32, copy=False))))


def from_runs(first, runs) -> np.ndarray:
    """The dense [units, BINS] int64 counts of a hist_first and a hist_run column (Arrow or polars)."""
    first = np.asarray(first.to_numpy() if hasattr(first, "to_numpy") else first, np.int64)
    runs = _list_array(runs)
    offsets = np.asarray(runs.offsets, np.int64)
    lengths = np.diff(offsets)
    unit = np.repeat(np.arange(len(runs)), lengths)
    column = first[unit] + np.arange(offsets[-1] - offsets[0]) - (offsets[unit] - offsets[0])
    out = np.zeros((len(runs), BINS), np.int64)
    out[unit, column] = np.asarray(runs.flatten(), np.int64)
    return out


def from_lists(bins, counts) -> np.ndarray:
    """The dense [units, BINS] int64 counts of two Arrow (or polars) list columns."""
    bins, counts = _list_array(bins), _list_array(counts)
    lengths = np.diff(np.asarray(bins.offsets))
    unit = np.repeat(np.arange(len(bins)), lengths)
    # Each (unit, bin) appears once per list, so a plain assignment places every count.
    out = np.zeros((len(bins), BINS), np.int64)
    out[unit, np.asarray(bins.flatten(), np.int64)] = np.asarray(counts.flatten(), np.int64)
    return out


def _list_array(column):
    """An Arrow or polars list column as one Arrow ListArray."""
    import pyarrow as pa
    array = pa.array(column.to_arrow() if hasattr(column, "to_arrow") else column)
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
