"""The numbers of the report's explanations section, from the explain stage's two tables
(docs/parquet.md, "Explanations"). Like report.data: frames in, frames out."""

from __future__ import annotations

import polars as pl

from ..maths.explain_scores import score_summary

EXPLAINERS = {"model": "text model", "baseline": "baseline (peak tokens)", "shuffled": "shuffled (another unit's)"}


def summary_table(scores: pl.DataFrame, resamples: int, confidence: float, seed: int) -> pl.DataFrame:
    """Balanced accuracy and AUC side by side (`score` says which)."""
    return pl.concat([
        score_summary(scores, resamples, confidence, seed, metric).select(
            pl.lit(name).alias("score"), pl.all()).rename({"ci_low": "low", "ci_high": "high"})
        for metric, name in (("balanced_accuracy", "balanced accuracy"), ("auc", "AUC"))])


def distribution(scores: pl.DataFrame) -> pl.DataFrame:
    """Units per explainer and balanced accuracy (scores take few distinct values)."""
    return scores.filter(pl.col("balanced_accuracy").is_not_nan()).with_columns(
        pl.col("explainer").replace(EXPLAINERS), pl.col("balanced_accuracy").round(3)
    ).group_by("explainer", "balanced_accuracy").len("units").sort("explainer", "balanced_accuracy")


def unit_table(explanations: pl.DataFrame, scores: pl.DataFrame, rows: int) -> pl.DataFrame:
    """Per unit: each explainer's description and score, the best text-model scores first."""
    key = ["site", "layer", "unit"]
    ba = scores.pivot(on="explainer", index=key, values="balanced_accuracy")
    ba = ba.rename({c: f"{c} score" for c in ba.columns if c not in key})
    text = explanations.pivot(on="explainer", index=key, values="explanation")
    wide = text.join(ba, on=key, how="left")
    order = "model score" if "model score" in wide.columns else "baseline score"
    return wide.sort(order, descending=True, nulls_last=True).head(rows)
