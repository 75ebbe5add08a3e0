"""LAPE (Tang et al. 2024, "Language-Specific Neurons"): the units whose firing rates are most
concentrated on few labels.

For each unit the firing rates across labels are normalized to a distribution and its entropy
taken. A unit none of whose rates is above the `filter_rate` quantile of all (unit, label)
rates is dropped (entropy set to +inf); the `top_rate` fraction of units of lowest entropy is
kept; a kept unit belongs to every label whose rate is above the `activation_bar_ratio`
quantile of all rates (so a unit may belong to several labels, or to none). Quantiles are
torch.kthvalue's, at rank round(n x ratio), as in the authors' code; ties in entropy fall to
the unit order (site as listed, layer, unit), so the selection is deterministic.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from ..io import tables


def kth_value(values: np.ndarray, ratio: float) -> float:
    """torch.kthvalue(values, round(n x ratio)): the k-th smallest, k counted from 1."""
    k = min(max(1, round(values.size * ratio)), values.size)
    return float(np.partition(values, k - 1)[k - 1])


def entropy(rates: np.ndarray) -> np.ndarray:
    """Per row, the entropy (nats) of the rates normalized to sum to 1 (0 for an all-zero row)."""
    totals = rates.sum(1, keepdims=True)
    normed = np.divide(rates, totals, out=np.zeros_like(rates), where=totals > 0)
    logs = np.log(normed, out=np.zeros_like(normed), where=normed > 0)
    return -(normed * logs).sum(1)


def lape_selection(units: pl.DataFrame, rates: np.ndarray, labels: list[str], top_rate: float,
                   filter_rate: float, activation_bar_ratio: float) -> pl.DataFrame:
    """tables.LABEL_UNITS rows of method "lape": `units` (site, layer, unit) in the rows' order of
    `rates` [units, labels]; score = the entropy, rank 1 = lowest within the label."""
    flat = rates.ravel()
    scores = entropy(rates)
    filtered = np.where((rates > kth_value(flat, filter_rate)).sum(1) == 0, np.inf, scores)
    keep = round(rates.shape[0] * top_rate)
    kept = np.argsort(filtered, kind="stable")[:keep]
    bar = kth_value(flat, activation_bar_ratio)
    rows = []
    for column, label in enumerate(labels):
        members = kept[rates[kept, column] > bar]
        frame = units[members.tolist()].with_columns(
            method=pl.lit("lape"), label=pl.lit(label), score=pl.Series(scores[members], dtype=pl.Float64),
            rank=pl.int_range(1, members.size + 1, dtype=pl.Int32))
        rows.append(frame)
    return pl.concat(rows).select(tables.LABEL_UNITS.names)
