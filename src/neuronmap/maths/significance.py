"""Paired statistics of an ablation against the baseline, prompt by prompt.

Both runs answer the same test prompts, so the comparison is paired: what matters is how many
prompts flipped from right to wrong (lost) and from wrong to right (gained). The exact McNemar
test asks whether lost and gained are more unequal than a fair coin would make them; the paired
bootstrap gives an interval for the accuracy difference. An "improvement" under another
relation's ablation (interference) counts only when it is significant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairedDifference:
    n: int
    lost: int       # right at baseline, wrong when ablated
    gained: int     # wrong at baseline, right when ablated
    difference: float  # ablated accuracy - baseline accuracy
    ci_low: float
    ci_high: float
    p_value: float  # exact two-sided McNemar


def mcnemar_exact(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs against Binomial(lost + gained, 1/2).

    Exact integer arithmetic, so small p-values are not lost to rounding in the sum.
    """
    n = lost + gained
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(lost, gained) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def bootstrap_interval(differences: np.ndarray, n_resamples: int, confidence: float,
                       rng: np.random.Generator) -> tuple[float, float]:
    """Percentile interval of the mean of per-prompt differences, prompts resampled with
    replacement (the pairs stay together)."""
    n = differences.size
    if n == 0:
        return math.nan, math.nan
    tail = (1 - confidence) / 2
    means = np.empty(n_resamples)
    # Chunks keep memory bounded by chunk x n whatever the resample count.
    chunk = max(1, 2 ** 20 // n)
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        means[start:stop] = differences[rng.integers(0, n, size=(stop - start, n))].mean(1)
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def paired_difference(baseline: np.ndarray, ablated: np.ndarray, n_resamples: int = 2000,
                      confidence: float = 0.95, rng: np.random.Generator | None = None) -> PairedDifference:
    """Compare per-prompt correctness (booleans, same prompts in the same order)."""
    baseline = np.asarray(baseline, dtype=bool)
    ablated = np.asarray(ablated, dtype=bool)
    if baseline.shape != ablated.shape:
        raise ValueError(f"paired_difference: {baseline.shape} baseline vs {ablated.shape} ablated answers")
    rng = rng if rng is not None else np.random.default_rng(0)
    differences = ablated.astype(np.float64) - baseline.astype(np.float64)
    lost = int((baseline & ~ablated).sum())
    gained = int((~baseline & ablated).sum())
    low, high = bootstrap_interval(differences, n_resamples, confidence, rng)
    return PairedDifference(n=int(baseline.size), lost=lost, gained=gained,
                            difference=float(differences.mean()) if baseline.size else math.nan,
                            ci_low=low, ci_high=high, p_value=mcnemar_exact(lost, gained))


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """q-values (Benjamini-Hochberg adjusted p-values) for a family of tests; NaN stays NaN."""
    p = np.asarray(p_values, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    if valid.size == 0:
        return q
    order = valid[np.argsort(p[valid], kind="stable")]
    m = valid.size
    ranked = p[order] * m / np.arange(1, m + 1)
    # The adjusted value is the smallest ranked value at or after each position.
    q[order] = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    return q


def hypergeometric_tail(shared: int, population: int, a: int, b: int) -> float:
    """P(X >= shared) for the units two random sets of a and b units out of `population` share."""
    def log_choose(n: int, k: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
    top = min(a, b)
    if shared <= 0:
        return 1.0
    terms = [log_choose(b, x) + log_choose(population - b, a - x) for x in range(shared, top + 1)
             if a - x <= population - b]
    if not terms:
        return 0.0
    peak = max(terms)
    return min(1.0, math.exp(peak + math.log(sum(math.exp(t - peak) for t in terms)) - log_choose(population, a)))
