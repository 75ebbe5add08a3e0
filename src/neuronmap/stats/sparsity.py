"""Activation sparsity (Li et al. 2023, "The lazy neuron phenomenon"; docs/methods.md §3) from
the per-token statistics of extraction (neuron_stats.parquet).

A unit fires on a token when its value is > 0 (for a SiLU/GELU-gated MLP read the `gate` site:
gate > 0 is where the activation function passes the neuron) or, for `frac_active`, when
|value| exceeds extraction's active_threshold (read the `act` site for the neuron's output).
A unit is dead when it never fired on any token seen.
"""

from __future__ import annotations

import polars as pl

from ..errors import NeuronmapError
from ..io import tables

NEEDED = ("site", "layer", "unit", "count", "max", "frac_positive", "frac_active")


def check_columns(stats: pl.DataFrame, path: str) -> None:
    missing = [c for c in NEEDED if c not in stats.columns]
    if missing:
        raise NeuronmapError(f"{path}: neuron statistics lack the columns {', '.join(missing)}")


def per_layer(stats: pl.DataFrame, rare_rate: float) -> pl.DataFrame:
    """Per (site, layer): firing rates over units (mean and median), dead, never-active and rare
    units (firing on fewer than `rare_rate` of tokens). The mean over units of the per-unit rate
    is also the mean per-token fraction of firing units, as every unit sees the same tokens."""
    table = stats.group_by("site", "layer").agg(
        units=pl.len().cast(pl.Int64),
        tokens=pl.col("count").max().cast(pl.Int64),
        firing_rate_mean=pl.col("frac_positive").mean(),
        firing_rate_median=pl.col("frac_positive").median(),
        active_rate_mean=pl.col("frac_active").mean(),
        active_rate_median=pl.col("frac_active").median(),
        dead=(pl.col("frac_positive") == 0).sum().cast(pl.Int64),
        never_active=(pl.col("frac_active") == 0).sum().cast(pl.Int64),
        rare=(pl.col("frac_positive") < rare_rate).sum().cast(pl.Int64),
    )
    return table.sort("site", "layer").select(tables.SPARSITY.names)


def dead_units(stats: pl.DataFrame) -> pl.DataFrame:
    """Every unit that never fired (value > 0) or was never active (|value| > threshold)."""
    return stats.filter((pl.col("frac_positive") == 0) | (pl.col("frac_active") == 0)).with_columns(
        dead=pl.col("frac_positive") == 0, never_active=pl.col("frac_active") == 0,
    ).sort("site", "layer", "unit").select(tables.DEAD_UNITS.names)
