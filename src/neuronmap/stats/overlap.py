"""Units shared between relations' selected sets, per k."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from ..io import tables


def unit_overlap(selected: pl.DataFrame, top_k: Sequence[int]) -> pl.DataFrame:
    """Every ordered pair of relations (diagonal included, so it reads as a full matrix)."""
    relations = sorted(selected["relation"].unique().to_list())
    rows = []
    for k in sorted(top_k):
        sets = {r: set(selected.filter((pl.col("relation") == r) & (pl.col("rank") <= k))
                       .select("site", "layer", "unit").iter_rows())
                for r in relations}
        for a in relations:
            for b in relations:
                shared = len(sets[a] & sets[b])
                union = len(sets[a] | sets[b])
                rows.append({"k": k, "relation_a": a, "relation_b": b, "shared": shared,
                             "jaccard": shared / union if union else 0.0})
    return pl.DataFrame(rows, schema={"k": pl.Int64, "relation_a": pl.String, "relation_b": pl.String,
                                      "shared": pl.Int64, "jaccard": pl.Float64}) \
        .select(tables.OVERLAP.names)


def shared_units(selected: pl.DataFrame, top_k: Sequence[int]) -> pl.DataFrame:
    """The units themselves that each unordered pair of relations (a < b) shares, per k."""
    frames = []
    for k in sorted(top_k):
        top = selected.filter(pl.col("rank") <= k).select("relation", "site", "layer", "unit")
        pairs = top.join(top, on=["site", "layer", "unit"], suffix="_b") \
            .filter(pl.col("relation") < pl.col("relation_b"))
        frames.append(pairs.select(pl.lit(k, pl.Int64).alias("k"), pl.col("relation").alias("relation_a"),
                                   pl.col("relation_b"), "site", "layer", "unit"))
    return pl.concat(frames).sort("k", "relation_a", "relation_b", "site", "layer", "unit") \
        .select(tables.SHARED_UNITS.names)
