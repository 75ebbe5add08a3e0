"""Versatility: do two relations' selected units overlap more than chance, or less?

Each relation's AP counts the other relations' prompts among its negatives, so the selections
are not independent draws: a unit that responds to two relations is pushed down in both
rankings, and the hypergeometric count k^2 / units of two independent sets is the wrong chance
level. The null here reruns the selection itself on prompts whose relation labels are permuted
(each permuted relation keeps its size, negatives drawn by stats.expertise.choose_prompts, AP
by the same code): the overlap two permuted relations' top-k sets have is what the selection
gives when labels carry no information. If the real labels carried none either, the observed
overlap would be one more draw of that null: its p-value comes from a count law with the null
draws' mean and variance (count_p_value), since a handful of permutations cannot give small rank
p-values; tests/test_versatility.py measures its false-positive rate on label-permuted data.

The reference study's reading (`leave_pair_out`): each relation of a pair ranked with the other's
prompts left out of its negatives, so neither pushes the other's units down. It counts the
units both relations drive more than the rest, which is what "shared units" means there; it
is a count, not a test (the two rankings still share their other negatives, so neither the
hypergeometric nor the permutation null above is its chance level).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Sequence

import numpy as np
import polars as pl
import scipy.stats

from ..io import tables
from ..maths.significance import benjamini_hochberg
from .expertise import choose_prompts
from .labelings import Labeling

log = logging.getLogger(__name__)

SHARED, NO_DIFFERENT, DISJOINT = "shared more than chance", "no different", "disjoint more than chance"


def permutation_labelings(prompts: pl.DataFrame, relations: Sequence[str], negatives_per_positive: int,
                          seed: int, permutations: int) -> list[list[Labeling]]:
    """One group per permutation: the identification prompts' relation labels shuffled, then
    each relation's positives and negatives chosen as the selection chooses them."""
    identification = prompts.filter((pl.col("split") == "identification") & pl.col("relation").is_in(list(relations))) \
        .sort("prompt_id")
    groups = []
    quiet = logging.getLogger("neuronmap.stats.expertise")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "only n negatives available" was said once by the selection
    try:
        for draw in range(permutations):
            rng = np.random.default_rng([seed, draw, zlib.crc32(b"versatility")])
            shuffled = identification.with_columns(relation=pl.Series(rng.permutation(identification["relation"])))
            negatives_seed = int(rng.integers(2 ** 31))
            group = []
            for relation in relations:
                chosen = choose_prompts(shuffled, relation, negatives_per_positive, negatives_seed)
                group.append(Labeling("permutation", draw, 0, relation, None,
                                      tuple(chosen.filter(pl.col("label"))["prompt_id"]),
                                      tuple(chosen.filter(~pl.col("label"))["prompt_id"])))
            groups.append(group)
    finally:
        quiet.setLevel(level)
    return groups


def rounds(items: Sequence[str]) -> list[list[tuple[str, str]]]:
    """Every pair once, in rounds where no item is in two pairs (the circle method)."""
    items = list(items) + ([None] if len(items) % 2 else [])
    out = []
    for _ in range(len(items) - 1):
        pairs = [(items[i], items[-1 - i]) for i in range(len(items) // 2)]
        out.append([tuple(sorted(pair)) for pair in pairs if None not in pair])
        items = [items[0], items[-1], *items[1:-1]]
    return out


def pair_labelings(chosen: dict[str, pl.DataFrame], prompts: pl.DataFrame) -> list[list[Labeling]]:
    """The reference study's reading: per pair (a, b), a ranked with b's identification prompts
    out of its negatives and b with a's; one group per round of disjoint pairs."""
    if len(chosen) < 3:
        return []
    identification = prompts.filter(pl.col("split") == "identification")
    own = {r: set(identification.filter(pl.col("relation") == r)["prompt_id"]) for r in chosen}
    groups = []
    for pairs in rounds(sorted(chosen)):
        group = []
        for a, b in pairs:
            for one, other in ((a, b), (b, a)):
                frame = chosen[one]
                negatives = tuple(pid for pid in frame.filter(~pl.col("label"))["prompt_id"] if pid not in own[other])
                group.append(Labeling("leave_pair_out", 0, 0, one, other,
                                      tuple(frame.filter(pl.col("label"))["prompt_id"]), negatives))
        groups.append(group)
    return groups


def count_p_values(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
    """Two-sided p-values of each `observed` [tests] as one more draw of its row of null overlaps
    [tests, P] (module docstring), the null's variance widened by its mean's own uncertainty
    (x (1 + 1/P)). A null of mean 5 or more: Student's t with P - 1 degrees of freedom (the
    variance is estimated from P draws), continuity corrected. Smaller: the negative binomial of
    that mean and variance where the variance exceeds the mean, else Poisson, a null of all zeros
    counting as a mean of 1/(P + 1). Measured on simulated nulls of 10 draws
    (tests/test_versatility.py): at most alpha = 0.05."""
    observed = np.asarray(observed, np.float64)
    draws = null.shape[1]
    mean = np.maximum(null.mean(1), 1 / (draws + 1))
    variance = (null.var(1, ddof=1) if draws > 1 else np.zeros(len(null))) * (1 + 1 / draws)
    wide = variance > mean
    spread = np.sqrt(np.where(variance > 0, variance, 1.0))
    ratio = np.where(wide, mean / np.where(wide, variance, 1.0), 0.5)
    size = np.where(wide, mean ** 2 / np.where(wide, variance - mean, 1.0), 1.0)
    more = np.where(wide, scipy.stats.nbinom.sf(observed - 1, size, ratio), scipy.stats.poisson.sf(observed - 1, mean))
    fewer = np.where(wide, scipy.stats.nbinom.cdf(observed, size, ratio), scipy.stats.poisson.cdf(observed, mean))
    large = (variance > 0) & (mean >= 5)
    more = np.where(large, scipy.stats.t.sf((observed - 0.5 - mean) / spread, draws - 1), more)
    fewer = np.where(large, scipy.stats.t.cdf((observed + 0.5 - mean) / spread, draws - 1), fewer)
    return np.minimum(1.0, 2 * np.minimum(more, fewer))


def _pair_counts(top: pl.DataFrame, by: Sequence[str]) -> pl.DataFrame:
    """Units shared by every pair of relations (a < b) within each group of `by`."""
    pairs = top.join(top, on=[*by, "site", "layer", "unit"], suffix="_b") \
        .filter(pl.col("relation") < pl.col("relation_b"))
    return pairs.group_by(*by, pl.col("relation").alias("relation_a"), "relation_b").agg(shared=pl.len().cast(pl.Int64))


def _all_pairs(relations: Sequence[str]) -> pl.DataFrame:
    relations = sorted(relations)
    return pl.DataFrame([(a, b) for i, a in enumerate(relations) for b in relations[i + 1:]],
                        schema={"relation_a": pl.String, "relation_b": pl.String}, orient="row")


def versatility_table(selected: pl.DataFrame, null: pl.DataFrame, pairs: pl.DataFrame | None,
                      top_k: Sequence[int], population: int, alpha: float) -> pl.DataFrame:
    """tables.VERSATILITY. `selected`: the relations' selected units (tables.SELECTED_UNITS);
    `null`: the permuted labelings' ranked units (labelings.ranked, by draw and relation);
    `pairs`: the leave-pair-out labelings' ranked units (by relation and other), or None.
    Per k: a row per pair, then a row for all pairs together (relation_a, relation_b null: the
    sum of the pairs' overlaps against the sum's own null); q_value is Benjamini-Hochberg over
    the pairs of each k (the all-pairs row keeps its p-value)."""
    relations = sorted(selected["relation"].unique().to_list())
    every_pair = _all_pairs(relations)
    draws = pl.DataFrame({"draw": sorted(null["draw"].unique().to_list())}, schema={"draw": pl.Int32})
    rows = []
    for k in sorted(top_k):
        observed = _with_zeros(every_pair, _pair_counts(selected.filter(pl.col("rank") <= k), []), [])
        null_counts = _with_zeros(every_pair.join(draws, how="cross"),
                                  _pair_counts(null.filter(pl.col("rank") <= k), ["draw"]), ["draw"]).sort("draw")
        tests = []
        for a, b, shared in observed.iter_rows():
            mine = null_counts.filter((pl.col("relation_a") == a) & (pl.col("relation_b") == b))["shared"].to_numpy()
            tests.append(_test_row(k, a, b, shared, mine, k * k / population))
        q = benjamini_hochberg(np.array([row["p_value"] for row in tests]))
        rows += [{**row, "q_value": value} for row, value in zip(tests, q)]
        total = null_counts.group_by("draw").agg(pl.col("shared").sum()).sort("draw")["shared"].to_numpy()
        pooled = _test_row(k, None, None, int(observed["shared"].sum()), total, every_pair.height * k * k / population)
        rows.append({**pooled, "q_value": pooled["p_value"]})
        if pairs is not None:
            rows += _leave_pair_out(pairs.filter(pl.col("rank") <= k), every_pair, k, population)
    for row in rows:
        row["verdict"] = _verdict(row.get("q_value"), row["shared"], row.get("null_mean"), alpha)
    log.info("versatility: %d permutations, %d relations", draws.height, len(relations))
    schema = pl.from_arrow(tables.VERSATILITY.empty_table()).schema
    return pl.DataFrame([{name: row.get(name) for name in schema} for row in rows], schema=schema)


def _with_zeros(grid: pl.DataFrame, counts: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """`counts` on every row of `grid`: pairs that share nothing have no row in `counts`."""
    return grid.join(counts, on=[*by, "relation_a", "relation_b"], how="left") \
        .with_columns(pl.col("shared").fill_null(0)).select(*by, "relation_a", "relation_b", "shared")


def _test_row(k, a, b, shared: int, null: np.ndarray, expected: float) -> dict:
    return {"reading": "selection", "k": k, "relation_a": a, "relation_b": b, "shared": shared,
            "expected_independent": expected, "permutations": null.size, "null_mean": float(null.mean()),
            "null_sd": float(null.std(ddof=1)) if null.size > 1 else math.nan,
            "null_min": int(null.min()), "null_max": int(null.max()),
            "p_value": float(count_p_values(np.array([shared]), null[None, :])[0])}


def _leave_pair_out(top: pl.DataFrame, every_pair: pl.DataFrame, k: int, population: int) -> list[dict]:
    """Per pair, the units of a's top-k (ranked without b's prompts) in b's (ranked without a's)."""
    key = ["relation_a", "relation_b", "site", "layer", "unit"]
    mine = top.filter(pl.col("relation") < pl.col("other")).select(
        pl.col("relation").alias("relation_a"), pl.col("other").alias("relation_b"), "site", "layer", "unit")
    theirs = top.filter(pl.col("relation") > pl.col("other")).select(
        pl.col("other").alias("relation_a"), pl.col("relation").alias("relation_b"), "site", "layer", "unit")
    counts = mine.join(theirs, on=key).group_by("relation_a", "relation_b").agg(shared=pl.len().cast(pl.Int64))
    return [{"reading": "leave_pair_out", "k": k, "relation_a": a, "relation_b": b, "shared": shared,
             "expected_independent": k * k / population, "permutations": 0}
            for a, b, shared in _with_zeros(every_pair, counts, []).iter_rows()]


def _verdict(q: float | None, shared: int, null_mean: float | None, alpha: float) -> str | None:
    if q is None or null_mean is None or math.isnan(q):
        return None
    if q >= alpha or shared == null_mean:
        return NO_DIFFERENT
    return SHARED if shared > null_mean else DISJOINT
