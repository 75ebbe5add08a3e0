"""Shared units between relations and activation sparsity, on small known tables."""

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from neuronmap.io import tables
from neuronmap.cli import main
from neuronmap.stats.settings import SparsitySettings
from neuronmap.stats.overlap import shared_units, unit_overlap


def selected(relation, units):
    return pl.DataFrame({"relation": relation, "site": [u[0] for u in units], "layer": [u[1] for u in units],
                         "unit": [u[2] for u in units], "rank": range(1, len(units) + 1), "ap": 1.0},
                        schema_overrides={"layer": pl.Int32, "unit": pl.Int32, "rank": pl.Int64})


def test_shared_units_are_the_intersections_and_agree_with_overlap_counts():
    rng = np.random.default_rng(0)
    pool = [(site, layer, unit) for site in ("gate", "act") for layer in range(3) for unit in range(20)]
    frames = []
    for relation in ("a", "b", "c"):
        order = rng.permutation(len(pool))
        frames.append(selected(relation, [pool[i] for i in order[:40]]))
    table = pl.concat(frames)
    shared = shared_units(table, [10, 40])
    counts = unit_overlap(table, [10, 40])
    for k in (10, 40):
        sets = {r: set(table.filter((pl.col("relation") == r) & (pl.col("rank") <= k))
                       .select("site", "layer", "unit").iter_rows()) for r in ("a", "b", "c")}
        for a, b in (("a", "b"), ("a", "c"), ("b", "c")):
            rows = shared.filter((pl.col("k") == k) & (pl.col("relation_a") == a) & (pl.col("relation_b") == b))
            assert set(rows.select("site", "layer", "unit").iter_rows()) == sets[a] & sets[b]
            count = counts.filter((pl.col("k") == k) & (pl.col("relation_a") == a) & (pl.col("relation_b") == b))
            assert count["shared"][0] == rows.height
    assert (shared["relation_a"] < shared["relation_b"]).all()


SPARSITY = ["--settings", SparsitySettings(rare_rate=0.01).to_json()]


def test_sparsity_of_a_synthetic_statistics_file(tmp_path):
    """Three gate units of layer 0 (one dead, one rare), two act units of layer 1 (one never active)."""
    stats = pl.DataFrame({
        "site": ["gate", "gate", "gate", "act", "act"], "layer": [0, 0, 0, 1, 1], "unit": [0, 1, 2, 0, 1],
        "count": [1000] * 5, "mean": [0.0] * 5, "var": [1.0] * 5,
        "min": [-3.0, -2.0, -1.0, -0.01, -1.0], "max": [-0.5, 0.3, 2.0, 0.01, 1.0],
        "frac_positive": [0.0, 0.005, 0.4, 0.5, 0.3], "frac_active": [0.9, 0.5, 0.6, 0.0, 0.2]})
    source = tmp_path / "neuron_stats.parquet"
    stats.write_parquet(source)
    out, dead = tmp_path / "sparsity.parquet", tmp_path / "dead.parquet"
    assert main(["sparsity", *SPARSITY, "--neuron-stats", str(source), "--out", str(out),
                 "--out-dead", str(dead)]) == 0
    assert pq.read_schema(out).remove_metadata().equals(tables.SPARSITY)
    layers = pl.read_parquet(out)
    gate = layers.filter(pl.col("site") == "gate").row(0, named=True)
    assert (gate["units"], gate["tokens"], gate["dead"], gate["rare"], gate["never_active"]) == (3, 1000, 1, 2, 0)
    assert gate["firing_rate_mean"] == np.mean([0.0, 0.005, 0.4])
    assert gate["firing_rate_median"] == 0.005
    act = layers.filter(pl.col("site") == "act").row(0, named=True)
    assert (act["dead"], act["never_active"], act["active_rate_mean"]) == (0, 1, 0.1)
    dead_units = pl.read_parquet(dead)
    assert dead_units.select("site", "layer", "unit", "dead", "never_active").rows() == [
        ("act", 1, 0, False, True), ("gate", 0, 0, True, False)]


def test_sparsity_names_missing_columns(tmp_path, capsys):
    source = tmp_path / "stats.parquet"
    pl.DataFrame({"site": ["gate"], "layer": [0], "unit": [0]}).write_parquet(source)
    assert main(["sparsity", *SPARSITY, "--neuron-stats", str(source), "--out", str(tmp_path / "o.parquet"),
                 "--out-dead", str(tmp_path / "d.parquet")]) == 2
    assert "lack the columns count, max, frac_positive, frac_active" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()
