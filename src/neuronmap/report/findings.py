"""The run's findings, stated from its numbers: whether the reference study's properties hold
(cumulativity, versatility, interference) and whether units carry the relation across
languages. Each finding is a row (estimate, interval or p-value, verdict) and a sentence built
from that row; a property the data cannot decide is said to be undecided.

Cumulativity is read from verdicts.parquet: its pooled rows (every relation's facts in one exact
permutation test, a bootstrap interval over facts) and its per-relation verdicts, the same numbers
as the report's per-relation table. Versatility is read from versatility.parquet (the overlap
against the selection rerun on permuted labels). Interference reads significance.parquet.

Cross-language transfer keeps normal-approximation intervals: a cell's excess drop is the random
controls' mean accuracy minus the top-k accuracy on the same test prompts, its variance the
binomial variance of each accuracy plus the spread of the random seeds; cells are pooled over
relations weighted by their prompts. Treating the two accuracies as independent ignores that they
are measured on the same prompts, which makes the intervals wider, not narrower.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import polars as pl

# versatility.parquet's verdicts (stats/versatility.py; the report reads them, it does not import the stage).
VERSATILITY_VERDICTS = ("shared more than chance", "no different", "disjoint more than chance")
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


def cumulativity(verdicts: pl.DataFrame, confidence: float, alpha: float, power: float) -> list[dict]:
    """Per k, the pooled rows of verdicts.parquet and how many relations' own verdicts hold; then
    whether the pooled excess grows from the smallest k to the largest."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    pooled = verdicts.filter(pl.col("relation").is_null()).sort("k")
    per_relation = verdicts.filter(pl.col("relation").is_not_null())
    rows = []
    for row in pooled.iter_rows(named=True):
        k, estimate, low, high = row["k"], row["excess_drop"], row["ci_low"], row["ci_high"]
        mine = per_relation.filter(pl.col("k") == k)
        says = {"holds": "recall drops more with a relation's own top-k units off than with as many random units",
                "reversed": "recall drops less with a relation's own top-k units off than with random units",
                "undecided": "the data cannot tell the top-k units' drop from the random units'"}[row["verdict"]]
        count = {v: int((mine["verdict"] == v).sum()) for v in ("holds", "reversed", "undecided")}
        detectable = mine["detectable_drop"].drop_nans().drop_nulls()
        reach = (f"; the smallest drop a relation's test prompts could show at {power:.0%} power runs from "
                 f"{100 * detectable.min():.0f} to {100 * detectable.max():.0f} points" if detectable.len() else "")
        rows.append({"property": "cumulativity", "scope": f"k={k}", "estimate": estimate, "ci_low": low,
                     "ci_high": high, "p_value": row["p_value"], "verdict": row["verdict"],
                     "statement": f"At k = {k}, {says}: excess drop {_points(estimate)} "
                                  f"({confidence:.0%} interval {_points(low)} to {_points(high)}; exact permutation "
                                  f"p = {row['p_value']:.3g}; {mine.height} relation{'s' if mine.height != 1 else ''}, "
                                  f"{row['n']} test prompts). Relation by relation (Benjamini-Hochberg q < {alpha}): "
                                  f"{count['holds']} hold, {count['reversed']} reversed, {count['undecided']} "
                                  f"undecided{reach}."})
    if pooled.height >= 2:
        first, last = pooled.row(0, named=True), pooled.row(pooled.height - 1, named=True)
        growth = last["excess_drop"] - first["excess_drop"]
        # The two k share their prompts (positively correlated): the sum of variances is wider than the truth.
        low, high = _interval(growth, math.hypot(first["se"], last["se"]), z)
        verdict = {"holds": "grows", "reversed": "shrinks", "undecided": "undecided"}[_verdict(low, high)]
        says = {"grows": "grows", "shrinks": "shrinks",
                "undecided": "neither clearly grows nor clearly shrinks"}[verdict]
        rows.append({"property": "cumulativity", "scope": f"k={first['k']}→{last['k']}", "estimate": growth,
                     "ci_low": low, "ci_high": high, "p_value": None, "verdict": verdict,
                     "statement": f"From k = {first['k']} to k = {last['k']} the excess drop {says} with k: "
                                  f"{_points(growth)} ({confidence:.0%} interval {_points(low)} to {_points(high)})."})
    return rows


def versatility(table: pl.DataFrame, alpha: float) -> list[dict]:
    """Per k, versatility.parquet's all-pairs test and how many pairs share more or fewer units
    than the selection rerun on permuted labels."""
    selection = table.filter(pl.col("reading") == "selection")
    rows = []
    for (k,), group in selection.sort("k").group_by("k", maintain_order=True):
        pooled = group.filter(pl.col("relation_a").is_null()).row(0, named=True)
        pairs = group.filter(pl.col("relation_a").is_not_null())
        count = {v: int((pairs["verdict"] == v).sum()) for v in VERSATILITY_VERDICTS}
        named = "; ".join(f"{a} & {b}: {s} shared vs {m:.1f} by chance" for a, b, s, m in pairs.filter(
            pl.col("verdict") == "shared more than chance").select("relation_a", "relation_b", "shared", "null_mean")
            .head(5).iter_rows())
        statement = (f"At k = {k}, all pairs of relations together share {pooled['shared']} units, where the "
                     f"selection rerun on permuted relation labels shares {pooled['null_mean']:.1f} (sd "
                     f"{pooled['null_sd']:.1f} over {pooled['permutations']} permutations; two independent random "
                     f"sets would share {pooled['expected_independent']:.1f}): {pooled['verdict']} "
                     f"(p = {pooled['p_value']:.3g}). Pair by pair (Benjamini-Hochberg q < {alpha}): "
                     f"{count['shared more than chance']} share more than chance, {count['disjoint more than chance']} "
                     f"fewer, {count['no different']} no different of {pairs.height}.")
        if named:
            statement += f" More than chance: {named}."
        rows.append({"property": "versatility", "scope": f"k={k}", "estimate": float(pooled["shared"]),
                     "ci_low": None, "ci_high": None, "p_value": pooled["p_value"], "verdict": pooled["verdict"],
                     "statement": statement})
    return rows


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


def findings(significance: pl.DataFrame, verdicts: pl.DataFrame, versatility_table: pl.DataFrame,
             languages: pl.DataFrame, confidence: float, alpha: float, power: float) -> pl.DataFrame:
    """Every finding as a row."""
    rows = cumulativity(verdicts, confidence, alpha, power) + versatility(versatility_table, alpha) \
        + interference(significance, alpha) + transfer(languages, confidence)
    return pl.DataFrame(rows, schema=FINDINGS_SCHEMA)
