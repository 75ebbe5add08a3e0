"""The run's findings, stated from its numbers: whether the reference study's properties hold
(cumulativity, versatility, interference) and whether units carry the relation across
languages. Each finding is a row (estimate, interval or p-value, verdict) and a sentence built
from that row; a property the data cannot decide is said to be undecided.

Intervals of "top-k against random-k" are normal approximations: a cell's excess drop is the
random controls' mean accuracy minus the top-k accuracy on the same test prompts, its variance
the binomial variance of each accuracy plus the spread of the random seeds; cells are pooled
over relations weighted by their prompts. Treating the two accuracies as independent ignores
that they are measured on the same prompts, which makes the intervals wider, not narrower.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import polars as pl

from ..ablate.significance import benjamini_hochberg, hypergeometric_tail

FINDINGS_SCHEMA = {"property": pl.String, "scope": pl.String, "estimate": pl.Float64, "ci_low": pl.Float64,
                   "ci_high": pl.Float64, "p_value": pl.Float64, "verdict": pl.String, "statement": pl.String}


def _points(x: float) -> str:
    return f"{100 * x:+.1f} points"


def excess_drop(cells: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """Per group of `by`: the excess drop (random-k mean accuracy minus top-k accuracy) pooled
    over relations, weighted by test prompts, with its standard error. `cells` are the rows of
    significance.parquet or languages.parquet where a relation's own units are off."""
    key = [*by, "eval_relation"]
    top = cells.filter(pl.col("control") == "top_k").select(*key, "n", pl.col("accuracy").alias("top"))
    random = cells.filter(pl.col("control") == "random").group_by(key).agg(
        random=pl.col("accuracy").mean(), random_var=pl.col("accuracy").var(ddof=1).fill_null(0.0),
        random_binomial=(pl.col("accuracy") * (1 - pl.col("accuracy"))).mean(), seeds=pl.len())
    joined = top.join(random, on=key, how="inner").with_columns(
        excess=pl.col("random") - pl.col("top"),
        var=pl.col("top") * (1 - pl.col("top")) / pl.col("n")
        + (pl.col("random_binomial") / pl.col("n") + pl.col("random_var")) / pl.col("seeds"))
    return joined.group_by(by, maintain_order=True).agg(
        relations=pl.len(), prompts=pl.col("n").sum(),
        estimate=(pl.col("excess") * pl.col("n")).sum() / pl.col("n").sum(),
        se=(pl.col("var") * pl.col("n") ** 2).sum().sqrt() / pl.col("n").sum()).sort(by)


def _interval(estimate: float, se: float, z: float) -> tuple[float, float]:
    return estimate - z * se, estimate + z * se


def _verdict(low: float, high: float) -> str:
    return "holds" if low > 0 else "reversed" if high < 0 else "undecided"


def cumulativity(significance: pl.DataFrame, confidence: float) -> list[dict]:
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    own = significance.filter(pl.col("ablated_relation") == pl.col("eval_relation"))
    pooled = excess_drop(own, ["k"])
    rows = []
    for k, relations, prompts, estimate, se in pooled.select("k", "relations", "prompts", "estimate", "se").iter_rows():
        low, high = _interval(estimate, se, z)
        verdict = _verdict(low, high)
        says = {"holds": "recall drops more with a relation's own top-k units off than with as many random units",
                "reversed": "recall drops less with a relation's own top-k units off than with random units",
                "undecided": "the data cannot tell the top-k units' drop from the random units'"}[verdict]
        rows.append({"property": "cumulativity", "scope": f"k={k}", "estimate": estimate, "ci_low": low,
                     "ci_high": high, "p_value": None, "verdict": verdict,
                     "statement": f"At k = {k}, {says}: excess drop {_points(estimate)} "
                                  f"({confidence:.0%} interval {_points(low)} to {_points(high)}; "
                                  f"{relations} relation{'s' if relations != 1 else ''}, {prompts} test prompts)."})
    if pooled.height >= 2:
        first, last = pooled.row(0, named=True), pooled.row(pooled.height - 1, named=True)
        growth = last["estimate"] - first["estimate"]
        low, high = _interval(growth, math.hypot(first["se"], last["se"]), z)
        verdict = {"holds": "grows", "reversed": "shrinks", "undecided": "undecided"}[_verdict(low, high)]
        says = {"grows": "grows", "shrinks": "shrinks",
                "undecided": "neither clearly grows nor clearly shrinks"}[verdict]
        rows.append({"property": "cumulativity", "scope": f"k={first['k']}→{last['k']}", "estimate": growth,
                     "ci_low": low, "ci_high": high, "p_value": None, "verdict": verdict,
                     "statement": f"From k = {first['k']} to k = {last['k']} the excess drop {says} with k: "
                                  f"{_points(growth)} ({confidence:.0%} interval {_points(low)} to {_points(high)})."})
    return rows


def versatility(overlap: pl.DataFrame, population: int, alpha: float) -> tuple[list[dict], pl.DataFrame]:
    """Units shared by each pair of relations against the number two random sets of k units
    would share (k^2 / units), with a hypergeometric p-value, Benjamini-Hochberg within each k."""
    pairs = overlap.filter(pl.col("relation_a") < pl.col("relation_b")).with_columns(
        expected=pl.col("k").cast(pl.Float64) ** 2 / population)
    pairs = pairs.with_columns(p_value=pl.Series([hypergeometric_tail(s, population, k, k) for s, k in
                                                  pairs.select("shared", "k").iter_rows()], dtype=pl.Float64))
    q = np.full(pairs.height, np.nan)
    for k in pairs["k"].unique().to_list():
        index = np.flatnonzero((pairs["k"] == k).to_numpy())
        q[index] = benjamini_hochberg(pairs["p_value"].to_numpy()[index])
    pairs = pairs.with_columns(q_value=pl.Series(q)).sort("k", "relation_a", "relation_b")
    rows = []
    for k, group in pairs.group_by("k", maintain_order=True):
        k = k[0]
        above = group.filter((pl.col("q_value") < alpha) & (pl.col("shared") > pl.col("expected")))
        shared, expected = int(group["shared"].sum()), float(group["expected"].sum())
        verdict = "holds" if above.height else "not detected"
        named = "; ".join(f"{a} & {b}: {s} shared vs {e:.1f} expected"
                          for a, b, s, e in above.select("relation_a", "relation_b", "shared", "expected")
                          .head(5).iter_rows())
        statement = (f"At k = {k}, {above.height} of {group.height} pairs of relations share more units than "
                     f"chance (hypergeometric test, Benjamini-Hochberg q < {alpha}); all pairs together share "
                     f"{shared} units where {expected:.1f} are expected by chance.")
        if named:
            statement += f" Most shared: {named}."
        rows.append({"property": "versatility", "scope": f"k={k}", "estimate": float(above.height),
                     "ci_low": None, "ci_high": None, "p_value": float(group["p_value"].min()),
                     "verdict": verdict, "statement": statement})
    return rows, pairs


def interference(significance: pl.DataFrame, alpha: float) -> list[dict]:
    """Top-k ablations that raise recall on another relation, significantly after the
    Benjamini-Hochberg correction over every top-k cell."""
    other = significance.filter((pl.col("control") == "top_k") & (pl.col("ablated_relation") != pl.col("eval_relation")))
    rows = []
    for k, group in other.group_by("k", maintain_order=True):
        k = k[0]
        rises = group.filter((pl.col("difference") > 0) & (pl.col("q_value") < alpha))
        named = "; ".join(f"{a} off raises {e} by {_points(d)}" for a, e, d in
                          rises.select("ablated_relation", "eval_relation", "difference").head(5).iter_rows())
        smallest = group.filter(pl.col("difference") > 0)["q_value"].min()
        statement = (f"At k = {k}, {rises.height} of {group.height} ablated × other-relation cells show recall "
                     f"rising significantly (Benjamini-Hochberg q < {alpha})")
        statement += f": {named}." if named else (
            f"; the smallest q among the rises is {smallest:.3g}." if smallest is not None else "; no cell rises.")
        rows.append({"property": "interference", "scope": f"k={k}", "estimate": float(rises.height),
                     "ci_low": None, "ci_high": None,
                     "p_value": float(smallest) if smallest is not None else None,
                     "verdict": "holds" if rises.height else "not detected", "statement": statement})
    return rows


def transfer(languages: pl.DataFrame, confidence: float) -> list[dict]:
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    own = languages.filter(pl.col("ablated_relation") == pl.col("eval_relation"))
    rows = []
    for language, k, relations, prompts, estimate, se in excess_drop(own, ["language", "k"]).select(
            "language", "k", "relations", "prompts", "estimate", "se").iter_rows():
        low, high = _interval(estimate, se, z)
        verdict = _verdict(low, high)
        says = {"holds": "the source language's top-k units hurt recall more than random units",
                "reversed": "the source language's top-k units hurt recall less than random units",
                "undecided": "the data cannot tell the top-k units' drop from the random units'"}[verdict]
        rows.append({"property": "cross-language transfer", "scope": f"{language} k={k}", "estimate": estimate,
                     "ci_low": low, "ci_high": high, "p_value": None, "verdict": verdict,
                     "statement": f"In {language} at k = {k}, {says}: excess drop {_points(estimate)} "
                                  f"({confidence:.0%} interval {_points(low)} to {_points(high)}; "
                                  f"{relations} relation{'s' if relations != 1 else ''}, {prompts} test prompts)."})
    return rows


def findings(significance: pl.DataFrame, overlap: pl.DataFrame, languages: pl.DataFrame, units: int,
             confidence: float, alpha: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Every finding as a row, and the versatility test of every pair of relations."""
    versatile, pairs = versatility(overlap, units, alpha)
    rows = cumulativity(significance, confidence) + versatile + interference(significance, alpha) \
        + transfer(languages, confidence)
    return pl.DataFrame(rows, schema=FINDINGS_SCHEMA), pairs
