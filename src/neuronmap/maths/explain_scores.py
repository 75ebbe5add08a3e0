"""How far each explainer beats the control and the baseline: per explainer the mean balanced
accuracy (or AUC) over units with a bootstrap interval, and the paired differences (units resampled, the
pairs kept together) model - shuffled, model - baseline, baseline - shuffled.

Here on the ground floor, not in the explain stage, because the explain stage's log and the
report's section both state it (a stage does not import another)."""

from __future__ import annotations

import numpy as np
import polars as pl

from .significance import bootstrap_interval

PAIRS = (("model", "shuffled"), ("model", "baseline"), ("baseline", "shuffled"))


def score_summary(scores: pl.DataFrame, resamples: int = 2000, confidence: float = 0.95,
                  seed: int = 0, metric: str = "balanced_accuracy") -> pl.DataFrame:
    """One row per explainer (`comparison` = its name) and per pair present (`a - b`): units,
    mean `metric` (or mean difference) and its interval. Units whose score is NaN (no
    activating or no non-activating held-out context) are left out."""
    wide = scores.filter(pl.col(metric).is_not_nan()).pivot(
        on="explainer", index=["site", "layer", "unit"], values=metric)
    rows = []
    rng = np.random.default_rng(seed)
    explainers = [e for e in ("baseline", "model", "shuffled") if e in wide.columns]
    for name in explainers:
        values = wide[name].drop_nulls().to_numpy()
        rows.append(_row(name, values, resamples, confidence, rng))
    for a, b in PAIRS:
        if a in wide.columns and b in wide.columns:
            both = wide.select(a, b).drop_nulls()
            rows.append(_row(f"{a} - {b}", (both[a] - both[b]).to_numpy(), resamples, confidence, rng))
    return pl.DataFrame(rows, schema={"comparison": pl.String, "units": pl.Int64, "mean": pl.Float64,
                                      "ci_low": pl.Float64, "ci_high": pl.Float64})


def _row(name: str, values: np.ndarray, resamples: int, confidence: float, rng) -> dict:
    low, high = bootstrap_interval(values.astype(float), resamples, confidence, rng)
    return {"comparison": name, "units": int(values.size), "mean": float(values.mean()) if values.size else np.nan,
            "ci_low": low, "ci_high": high}
