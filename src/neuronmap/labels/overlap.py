"""How many units LAPE's and the AP selection share per label, against what two random sets of
the same sizes would share (hypergeometric: expected a x b / population, one-sided p-value)."""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from ..io import tables
from ..maths.significance import hypergeometric_tail

KEY = ["site", "layer", "unit"]


def selection_overlap(units: pl.DataFrame, labels: list[str], population: int) -> pl.DataFrame:
    rows = []
    for label in labels:
        lape = units.filter((pl.col("method") == "lape") & (pl.col("label") == label)).select(KEY)
        ap = units.filter((pl.col("method") == "ap") & (pl.col("label") == label)).select(KEY)
        shared = lape.join(ap, on=KEY).height
        rows.append({"label": label, "lape_units": lape.height, "ap_units": ap.height, "shared": shared,
                     "population": population, "expected": lape.height * ap.height / population,
                     "p_value": hypergeometric_tail(shared, population, lape.height, ap.height)})
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=tables.LABEL_OVERLAP))
