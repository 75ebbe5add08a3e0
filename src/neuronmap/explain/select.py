"""Which units the stage explains (`explain.units`): one label's or relation's selection, the top
units by a column of the corpus records (the atlas's statistics; not the atlas itself, which shows
the explanations), or every unit; `explain.max_units` caps each group."""

from __future__ import annotations

import numpy as np
import polars as pl

from ..errors import NeuronmapError

KEY = ["site", "layer", "unit"]


def from_groups(rows: pl.DataFrame, group: str, rank: str, max_units: int | None) -> pl.DataFrame:
    """The best `max_units` of each group by rank; a unit in several groups keeps its first
    (groups by name), so no unit is explained twice."""
    rows = rows.sort([group, rank, *KEY])
    if max_units is not None:
        rows = rows.filter(pl.int_range(pl.len()).over(group) < max_units)
    rows = rows.unique(KEY, keep="first", maintain_order=True)
    return rows.select(*KEY, pl.col(group).cast(pl.String).alias("selected_for"))


def select_units(kind: str, max_units: int | None, seed: int, sites: tuple[str, ...], *, label_units=None,
                 relation_units=(), corpus_units=None) -> pl.DataFrame:
    """site, layer, unit, selected_for (the label, relation or column), sorted by unit: the
    explain jobs take ranges of these rows."""
    if kind.startswith("labels"):
        method = kind.partition(":")[2] or "lape"
        rows = label_units.filter(pl.col("method") == method)
        chosen = from_groups(rows, "label", "rank", max_units)
    elif kind == "relations":
        rows = pl.concat([pl.read_parquet(path, columns=["relation", *KEY, "rank"]) for path in relation_units])
        chosen = from_groups(rows, "relation", "rank", max_units)
    elif kind.startswith("top:"):
        column = kind[4:]
        frame = pl.read_parquet(corpus_units)
        numeric = [c for c, t in frame.schema.items() if t.is_numeric() and c not in KEY]
        if column not in numeric:
            raise NeuronmapError(f"explain.units: {kind!r}: corpus/units.parquet has no numeric column {column!r} "
                                 f"(its columns: {', '.join(numeric)})")
        rows = frame.filter(pl.col(column).is_not_null() & pl.col("site").is_in(list(sites)))
        rows = rows.sort([column, *KEY], descending=[True, False, False, False])
        chosen = rows.head(max_units if max_units is not None else rows.height).select(
            *KEY, pl.lit(column).alias("selected_for"))
    elif kind == "all":
        rows = pl.read_parquet(corpus_units, columns=KEY).filter(pl.col("site").is_in(list(sites)))
        if max_units is not None and max_units < rows.height:
            picked = np.sort(np.random.default_rng(seed).choice(rows.height, max_units, replace=False))
            rows = rows[picked]
        chosen = rows.with_columns(pl.lit("all").alias("selected_for"))
    else:
        raise NeuronmapError(f"explain.units: {kind!r} is none of labels, labels:ap, relations, top:<column>, all")
    chosen = chosen.sort(KEY)
    if chosen.is_empty():
        raise NeuronmapError(f"explain.units: {kind!r} selects no unit")
    return chosen


def shard_rows(units: pl.DataFrame, shard: int, shards: int) -> pl.DataFrame:
    """The contiguous range of the selected units that job `shard` of `shards` explains."""
    start, stop = units.height * shard // shards, units.height * (shard + 1) // shards
    return units.slice(start, stop - start)
