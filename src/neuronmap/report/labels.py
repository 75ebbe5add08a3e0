"""The numbers of the report's corpus and labelled-corpora sections, from the corpus pass's and the
labels stage's files (docs/parquet.md, "Corpus records" and "Labelled corpora").

Like report.data: every function takes frames and returns a frame, nothing draws or writes HTML,
so each figure and table can be checked against the files it comes from.
"""

from __future__ import annotations

import polars as pl

METHODS = {"lape": "LAPE", "ap": "AP"}
PERPLEXITY_RULE = "* the sign-flip test of per-context differences finds the excess significant (Benjamini-Hochberg)"


def corpus_summary(contexts: pl.DataFrame) -> pl.DataFrame:
    """Per label (one row "" for an unlabelled corpus): documents, contexts, tokens, and the
    contexts held out of the records for the perplexity check."""
    return contexts.group_by("label").agg(
        documents=pl.col("document").n_unique().cast(pl.Int64), contexts=pl.len().cast(pl.Int64),
        tokens=pl.col("n_tokens").cast(pl.Int64).sum(),
        heldout_contexts=pl.col("heldout").sum().cast(pl.Int64)).sort("label")


def corpus_units(units: pl.DataFrame) -> pl.DataFrame:
    """Units recorded per site, from corpus/units.parquet's key columns."""
    return units.group_by("site").agg(layers=pl.col("layer").n_unique().cast(pl.Int64),
                                      units=pl.len().cast(pl.Int64)).sort("site")


def label_placement(label_units: pl.DataFrame) -> pl.DataFrame:
    """Selected units per method, label, layer and site."""
    return label_units.group_by("method", "label", "layer", "site").len("units") \
        .with_columns(pl.col("units").cast(pl.Int64)).sort("method", "label", "layer", "site")


def label_selections(label_units: pl.DataFrame, records: pl.DataFrame) -> pl.DataFrame:
    """One row per label and method: units selected, the layers they span, and their mean firing
    rate on the label's own tokens beside their mean over the other labels' tokens (a selection
    specific to its label fires more on it). `records` are label_records.parquet's site, layer,
    unit, label and firing_rate (any superset of the selected units)."""
    key = ["site", "layer", "unit"]
    rates = label_units.select("method", "label", *key).join(
        records.select(*key, pl.col("label").alias("on_label"), "firing_rate"), on=key, how="left")
    own = pl.col("on_label") == pl.col("label")
    fired = rates.group_by("method", "label").agg(
        firing_rate_own=pl.col("firing_rate").filter(own).mean(),
        firing_rate_others=pl.col("firing_rate").filter(~own).mean())
    return label_units.group_by("method", "label").agg(
        units=pl.len().cast(pl.Int64), layer_min=pl.col("layer").min(), layer_median=pl.col("layer").median(),
        layer_max=pl.col("layer").max(),
    ).join(fired, on=["method", "label"], how="left").sort("label", "method")


def label_summary(records: pl.DataFrame, selections: pl.DataFrame) -> pl.DataFrame:
    """One row per label: its records' contexts and tokens, then per method (LAPE, AP) the units
    selected and their mean firing rate on the label and on the other labels (label_selections)."""
    summary = label_tokens(records)
    for method, name in METHODS.items():
        summary = summary.join(selections.filter(pl.col("method") == method).select(
            "label", pl.col("units").alias(f"{name} units"),
            pl.col("firing_rate_own").alias(f"{name} firing rate on the label"),
            pl.col("firing_rate_others").alias(f"{name} on the other labels")), on="label", how="left")
    return summary.sort("label")


def label_tokens(records: pl.DataFrame) -> pl.DataFrame:
    """Per label, the tokens and contexts the records were taken over (the same for every unit)."""
    return records.group_by("label").agg(contexts=pl.col("contexts").max(), tokens=pl.col("tokens").max()) \
        .sort("label")


def label_overlap(overlap: pl.DataFrame) -> pl.DataFrame:
    """overlap.parquet as the section shows it, with the Jaccard index of the two selections."""
    union = pl.col("lape_units") + pl.col("ap_units") - pl.col("shared")
    return overlap.select(
        "label", "lape_units", "ap_units", "shared",
        pl.when(union > 0).then(pl.col("shared") / union).otherwise(None).alias("jaccard"),
        "population", pl.col("expected").alias("expected by chance"), "p_value").sort("label")


def perplexity_cells(perplexity: pl.DataFrame) -> pl.DataFrame:
    """perplexity.parquet as the matrix shows it: per method, ablated label and evaluated label,
    the selection's perplexity ratio against the random units', the excess (mean per-context NLL
    difference, nats per token) with its interval, "*" where significant (PERPLEXITY_RULE).
    NaN (no units, no contexts) reads as missing."""
    mark = pl.when(pl.col("significant")).then(pl.lit("*")).otherwise(pl.lit(""))

    def two_digits(column: str) -> pl.Expr:
        return pl.col(column).map_elements(lambda x: f"{x:.2f}", return_dtype=pl.String)
    text = pl.when(pl.col("selected_ratio").is_null() | pl.col("random_ratio").is_null()).then(pl.lit("n/a")) \
        .otherwise(pl.format("{}/{}", two_digits("selected_ratio"), two_digits("random_ratio"))) + pl.col("mark")
    return perplexity.with_columns(pl.col(pl.Float64).fill_nan(None)).select(
        "method", "ablated_label", "eval_label", "units", "contexts", "tokens", "baseline_perplexity",
        "selected_ratio", "random_ratio", "excess", "ci_low", "ci_high", "excess_per_unit", "p_value", "q_value",
        "significant", mark.alias("mark"),
    ).with_columns(text=text).sort("method", "ablated_label", "eval_label")


def perplexity_table(cells: pl.DataFrame) -> pl.DataFrame:
    """The matrix's cells as a table, with readable names."""
    return cells.select(
        pl.col("method").replace(METHODS), pl.col("ablated_label").alias("ablated"),
        pl.col("eval_label").alias("evaluated"), "units", "contexts", "baseline_perplexity",
        pl.col("selected_ratio").alias("selected ×"), pl.col("random_ratio").alias("random ×"), "excess",
        "ci_low", "ci_high", "excess_per_unit", "q_value", pl.col("mark").alias("significant"))
