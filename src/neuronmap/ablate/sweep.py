"""Run-level tables of the ablation sweep: paired significance of every configuration against
the baseline, the top-k against the random controls per k (the cumulativity curves and the
drop matrix), and the perplexity of neutral text under each configuration."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import polars as pl

from ..errors import NeuronmapError
from ..io import tables
from ..maths.significance import benjamini_hochberg, paired_difference

CONFIG_KEY = ["ablated_relation", "k", "control", "seed"]


def paired_table(predictions: pl.DataFrame, baseline: pl.DataFrame, *, by: Sequence[str] = ("eval_relation",),
                 n_resamples: int = 2000, confidence: float = 0.95, alpha: float = 0.05,
                 seed: int = 0) -> pl.DataFrame:
    """One row per (configuration, evaluated group): accuracy, relative drop and the paired
    comparison with the baseline on the same prompts. q_value is the Benjamini-Hochberg
    adjustment within each control type (the top-k cells form one family, the random ones
    another); `significant` is p_value < alpha."""
    base = baseline.select("prompt_id", pl.col("correct").alias("baseline_correct"))
    joined = predictions.join(base, on="prompt_id", how="left")
    missing = joined.filter(pl.col("baseline_correct").is_null())
    if missing.height:
        raise NeuronmapError(f"baseline predictions lack {missing['prompt_id'].n_unique()} evaluated prompts "
                             f"(e.g. {missing['prompt_id'][0]}): rerun the baseline on the same prompts")
    keys = CONFIG_KEY + list(by)
    rows = []
    for key, group in joined.sort("prompt_id").group_by(keys, maintain_order=True):
        # Each cell has its own seeded stream, so adding a cell leaves the others' intervals as they were.
        rng = np.random.default_rng([seed, zlib.crc32(repr(key).encode())])
        paired = paired_difference(group["baseline_correct"].to_numpy(), group["correct"].to_numpy(),
                                   n_resamples, confidence, rng)
        baseline_accuracy = float(group["baseline_correct"].mean())
        accuracy = float(group["correct"].mean())
        rows.append({**dict(zip(keys, key)), "n": paired.n, "correct": int(group["correct"].sum()),
                     "accuracy": accuracy, "baseline_accuracy": baseline_accuracy,
                     "relative_drop": (baseline_accuracy - accuracy) / baseline_accuracy if baseline_accuracy > 0
                     else None,
                     "lost": paired.lost, "gained": paired.gained, "difference": paired.difference,
                     "ci_low": paired.ci_low, "ci_high": paired.ci_high, "p_value": paired.p_value})
    schema = tables.LANGUAGE_ABLATION if "language" in by else tables.SIGNIFICANCE
    if not rows:
        return pl.from_arrow(schema.empty_table())
    table = pl.DataFrame(rows, infer_schema_length=None)
    q = np.full(table.height, np.nan)
    for control in table["control"].unique().to_list():
        index = np.flatnonzero((table["control"] == control).to_numpy())
        q[index] = benjamini_hochberg(table["p_value"].to_numpy()[index])
    table = table.with_columns(q_value=pl.Series(q), significant=pl.col("p_value") < alpha)
    return table.sort(keys, nulls_last=False).select(schema.names)


def sweep_table(significance: pl.DataFrame) -> pl.DataFrame:
    """Per (ablated relation, evaluated relation, k): the top-k ablation against the spread of
    its random controls over seeds. Rows with ablated == evaluated are the cumulativity curves;
    a fixed k across all pairs is the drop matrix."""
    cell = ["ablated_relation", "eval_relation", "k"]
    top = significance.filter(pl.col("control") == "top_k").select(
        *cell, "n", "baseline_accuracy",
        pl.col("accuracy").alias("top_accuracy"), pl.col("relative_drop").alias("top_relative_drop"),
        pl.col("difference").alias("top_difference"), pl.col("ci_low").alias("top_ci_low"),
        pl.col("ci_high").alias("top_ci_high"), pl.col("p_value").alias("top_p_value"),
        pl.col("q_value").alias("top_q_value"), pl.col("significant").alias("top_significant"))
    random = significance.filter(pl.col("control") == "random").group_by(cell).agg(
        random_seeds=pl.len().cast(pl.Int64),
        random_accuracy_mean=pl.col("accuracy").mean(),
        random_accuracy_sd=pl.col("accuracy").std(ddof=1),
        random_accuracy_min=pl.col("accuracy").min(),
        random_accuracy_max=pl.col("accuracy").max(),
        random_relative_drop_mean=pl.col("relative_drop").mean(),
        random_significant_seeds=pl.col("significant").sum().cast(pl.Int64))
    table = top.join(random, on=cell, how="left").with_columns(pl.col("random_seeds").fill_null(0),
                                                               pl.col("random_significant_seeds").fill_null(0))
    return table.sort(cell).select(tables.SWEEP.names)


def perplexity_table(per_relation: Sequence[pl.DataFrame]) -> pl.DataFrame:
    """The per-relation perplexity files as one table: the baseline row once, then every
    configuration of every relation."""
    if not per_relation:
        return pl.from_arrow(tables.PERPLEXITY.empty_table())
    frames = pl.concat(per_relation)
    baseline = frames.filter(pl.col("control") == "none")
    if baseline.height and baseline["perplexity"].max() > baseline["perplexity"].min() * (1 + 1e-4):
        raise NeuronmapError("perplexity files disagree on the baseline perplexity (different texts or models?)")
    return pl.concat([baseline.head(1), frames.filter(pl.col("control") != "none")]) \
        .sort("ablated_relation", "k", "control", "seed", nulls_last=False) \
        .select(tables.PERPLEXITY.names)
