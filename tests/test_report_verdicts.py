"""The report's per-relation verdicts, versatility and stability: its findings and tables carry
the numbers of verdicts.parquet, versatility.parquet and stability.parquet, unchanged."""

import html
import re
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from neuronmap.ablate.verdicts import verdict_table
from neuronmap.io import tables
from neuronmap.io.parquet import write_table
from neuronmap.report import build, data
from neuronmap.report.findings import cumulativity, findings, versatility
from neuronmap.report.page import Page
from neuronmap.stats.versatility import versatility_table

from test_verdicts import synthetic_predictions

SIGNIFICANCE = {"confidence": 0.95, "alpha": 0.05, "power": 0.8}


@pytest.fixture(scope="module")
def verdicts():
    rng = np.random.default_rng(5)
    predictions, baseline = synthetic_predictions(rng, {"a": 0.7, "b": 0.0, "c": -0.5}, facts=30)
    more, _ = synthetic_predictions(rng, {"a": 0.9, "b": 0.2, "c": 0.0}, facts=30, k=300)
    return verdict_table(pl.concat([predictions, more]), baseline, n_resamples=300, simulations=100)


@pytest.fixture(scope="module")
def versatility_file():
    """Three relations' top units and a permutation null made up so that a & b share many units."""
    rng = np.random.default_rng(2)
    units = 1000

    def top(relation, members, k=100, draw=None):
        frame = pl.DataFrame({"relation": relation, "site": "up", "layer": np.zeros(k, np.int32),
                              "unit": np.asarray(members, np.int32), "rank": np.arange(1, k + 1, dtype=np.int64),
                              "ap": np.linspace(1, 0.5, k), "separation": np.zeros(k)})
        return frame if draw is None else frame.with_columns(draw=pl.lit(draw, pl.Int32))
    selected = pl.concat([top("a", range(100)), top("b", range(50, 150)), top("c", range(500, 600))])
    null = pl.concat([top(r, rng.choice(units, 100, replace=False), draw=d) for d in range(10) for r in "abc"])
    return versatility_table(selected.select(tables.SELECTED_UNITS.names), null, None, [100], units, 0.05)


@pytest.fixture(scope="module")
def stability():
    rows = [{"relation": r, "split": 0, "k": k, "positives_a": 10, "positives_b": 11, "shared": s,
             "expected_independent": k * k / 1000, "fraction": s / k, "p_value": 1e-5, "ap_spearman": 0.9}
            for r, k, s in [("a", 10, 7), ("a", 100, 60), ("b", 10, 2), ("b", 100, 31)]]
    return pl.from_arrow(pl.DataFrame(rows).to_arrow().cast(tables.STABILITY))


def test_cumulativity_states_the_pooled_verdicts(verdicts):
    rows = cumulativity(verdicts, 0.95, 0.05, 0.8)
    pooled = verdicts.filter(pl.col("relation").is_null()).sort("k")
    for row, expected in zip(rows, pooled.iter_rows(named=True)):
        assert (row["estimate"], row["ci_low"], row["ci_high"], row["p_value"], row["verdict"]) == (
            expected["excess_drop"], expected["ci_low"], expected["ci_high"], expected["p_value"], expected["verdict"])
        assert f"excess drop {100 * expected['excess_drop']:+.1f} points" in row["statement"]
        mine = verdicts.filter((pl.col("k") == expected["k"]) & pl.col("relation").is_not_null())
        holds = int((mine["verdict"] == "holds").sum())
        assert f"{holds} hold, {int((mine['verdict'] == 'reversed').sum())} reversed" in row["statement"]
    growth = rows[-1]
    assert growth["scope"] == "k=100→300"
    assert growth["estimate"] == pytest.approx(pooled["excess_drop"][1] - pooled["excess_drop"][0])


def test_versatility_states_the_all_pairs_test(versatility_file):
    (row,) = versatility(versatility_file, 0.05)
    pooled = versatility_file.filter(pl.col("relation_a").is_null()).row(0, named=True)
    assert row["estimate"] == pooled["shared"] == 50
    assert row["verdict"] == pooled["verdict"]
    assert f"shares {pooled['null_mean']:.1f} (sd {pooled['null_sd']:.1f} over 10 permutations" in row["statement"]
    pair = versatility_file.filter(pl.col("relation_a") == "a", pl.col("relation_b") == "b").row(0, named=True)
    assert pair["verdict"] == "shared more than chance" and "a & b: 50 shared" in row["statement"]


def test_findings_hold_one_row_per_property_and_scope(verdicts, versatility_file):
    significance = pl.from_arrow(tables.SIGNIFICANCE.empty_table())
    languages = pl.from_arrow(tables.LANGUAGE_ABLATION.empty_table())
    rows = findings(significance, verdicts, versatility_file, languages, 0.95, 0.05, 0.8)
    assert rows.select("property", "scope").rows() == [
        ("cumulativity", "k=100"), ("cumulativity", "k=300"), ("cumulativity", "k=100→300"), ("versatility", "k=100")]


def cells(section: str) -> list[list[str]]:
    """The table's body cells, unescaped, row by row."""
    body = section.split("<tbody>")[1]
    rows = [row for row in body.split("</tr>") if "<td>" in row]
    return [[html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row)] for row in rows]


def render(section, tmp_path, **files) -> str:
    paths = {}
    for name, (frame, schema) in files.items():
        paths[name] = tmp_path / f"{name}.parquet"
        write_table(frame, paths[name], schema)
    config = {"significance": SIGNIFICANCE, "random_seeds": [1, 2, 3]}
    run = SimpleNamespace(inputs=SimpleNamespace(**paths), config=config)
    page = Page("test")
    section(page, run)
    return "".join(page.sections)


def test_the_verdict_table_shows_the_files_numbers(verdicts, tmp_path):
    shown = cells(render(build.verdicts_section, tmp_path, verdicts=(verdicts, tables.VERDICTS)))
    expected = data.verdict_rows(verdicts)
    assert len(shown) == verdicts.height
    for row, values in zip(shown, expected.iter_rows(named=True)):
        assert row[0] == (values["relation"]) and row[1] == str(values["k"])
        assert row[expected.columns.index("excess drop")] == f"{values['excess drop']:.3f}"
        assert row[expected.columns.index("p_value")] == f"{values['p_value']:.3g}"
        assert row[expected.columns.index("verdict")] == values["verdict"]
        detectable = values["detectable drop"]
        assert row[-1] == (f"{detectable:.3f}" if detectable is not None else "–")
    assert shown[-1][0] == data.POOLED


def test_the_versatility_table_shows_the_files_numbers(versatility_file, tmp_path):
    overlap = pl.DataFrame({"k": [100] * 4, "relation_a": ["a", "a", "b", "b"], "relation_b": ["a", "b", "a", "b"],
                            "shared": [100, 50, 50, 100], "jaccard": [1.0, 1 / 3, 1 / 3, 1.0]})
    shown = cells(render(build.overlap_section, tmp_path, versatility=(versatility_file, tables.VERSATILITY),
                         overlap=(overlap, tables.OVERLAP)))
    for row, values in zip(shown, data.versatility_rows(versatility_file).iter_rows(named=True)):
        assert row[2] == values["pair"] and row[3] == str(values["shared"])
        assert row[4] == f"{values['permuted labels: mean']:.1f}" and row[-1] == values["verdict"]


def test_the_stability_table_shows_the_files_numbers(stability, tmp_path):
    shown = cells(render(build.stability_section, tmp_path, stability=(stability, tables.STABILITY)))
    assert [row[:2] for row in shown] == [["a", "10"], ["a", "100"], ["b", "10"], ["b", "100"]]
    assert [row[5] for row in shown] == [f"{f:.3f}" for f in stability.sort("relation", "k")["fraction"]]
