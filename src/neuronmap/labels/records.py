"""Per label and unit: the firing rate (the fraction of the label's tokens with a value > 0)
and the mean, merged from the records jobs' partials. Counts are integers and add exactly; the
sums are float64 and add in shard order, so 1, 2 or 5 shards agree to rounding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl

from ..errors import NeuronmapError
from ..io import tables
from ..io.parquet import read_table

KEY = ["site", "layer", "unit", "label"]


def label_records(partials: Sequence[str | Path]) -> pl.DataFrame:
    """tables.LABEL_RECORDS from every shard's tables.LABEL_RECORDS_PARTIAL."""
    frames = [read_table(path) for path in sorted(partials, key=str)]
    if not frames:
        raise NeuronmapError("labels: no per-label records to merge")
    merged = pl.concat(frames).group_by(KEY, maintain_order=True).agg(
        pl.col("tokens").sum(), pl.col("contexts").sum(), pl.col("sum").sum(), pl.col("n_positive").sum())
    empty = merged.filter(pl.col("tokens") == 0)["label"].unique().to_list()
    if empty:
        raise NeuronmapError(f"labels {empty} have no tokens outside the held-out documents (too few documents, "
                             "or corpus.heldout_fraction too high)")
    return merged.with_columns(mean=pl.col("sum") / pl.col("tokens"),
                               firing_rate=pl.col("n_positive") / pl.col("tokens")) \
        .sort(["layer", "site", "unit", "label"]).select(tables.LABEL_RECORDS.names)


def rate_matrix(records: pl.DataFrame, sites: Sequence[str], labels: Sequence[str]):
    """The units of `sites` in a fixed order (site as listed, then layer, then unit) and their
    firing rates as a [units, labels] float64 array."""
    import numpy as np
    chosen = records.filter(pl.col("site").is_in(list(sites)))
    if chosen.is_empty():
        raise NeuronmapError(f"labels.sites {list(sites)}: no records at these sites (corpus pass sites?)")
    order = {site: i for i, site in enumerate(sites)}
    wide = chosen.pivot(on="label", index=["site", "layer", "unit"], values="firing_rate") \
        .with_columns(site_order=pl.col("site").replace_strict(order, return_dtype=pl.Int32)) \
        .sort(["site_order", "layer", "unit"])
    return wide.select(["site", "layer", "unit"]), np.column_stack([wide[label].to_numpy() for label in labels])
