"""Split-half stability of the selection: would another half of the identification facts select
the same units?

Per split, each relation's identification facts are dealt at random into two halves (a fact's
prompts stay together), and so are the facts of its negatives (each in its own relation's
halves), so the halves share no prompt. Each half is ranked as the selection ranks (AP, then
separation, then position) with the positives and negatives that fall in it; the two top-k sets
are compared with the count two independent random sets of k units share (k^2 / units,
hypergeometric tail p-value), and the two halves' APs of every unit by Spearman's rank
correlation. A selection that does not reproduce across halves is a selection of noise. The
halves have half the prompts, so their agreement understates the full selection's stability.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
import scipy.stats

from ..errors import NeuronmapError
from ..io import tables
from ..io.tables import FACT_OF_PROMPT
from ..maths.draws import relation_rng
from ..maths.significance import hypergeometric_tail
from .labelings import Labeling

_fact = pl.col("prompt_id").str.replace(FACT_OF_PROMPT, "")


def fact_halves(prompts: pl.DataFrame, split: int, seed: int) -> dict[str, int]:
    """Each identification fact's half (0 or 1) in `split`: per relation, a seeded shuffle of its
    facts, the first half (rounded down) in half 0."""
    facts = prompts.filter(pl.col("split") == "identification") \
        .select("relation", fact=_fact).unique().sort("relation", "fact")
    halves = {}
    for (relation,), group in facts.group_by("relation", maintain_order=True):
        if group.height < 2:
            raise NeuronmapError(f"stability: {relation} has {group.height} identification fact: halves need 2")
        order = relation_rng(seed, relation, f"stability-{split}").permutation(group.height)
        half = np.ones(group.height, np.int64)
        half[order[:group.height // 2]] = 0
        halves.update(zip(group["fact"], half.tolist()))
    return halves


def half_labelings(prompts: pl.DataFrame, chosen: dict[str, pl.DataFrame], seed: int, splits: int
                   ) -> list[list[Labeling]]:
    """One group per split: every relation's two halves (its chosen positives and negatives
    whose facts fall in the half)."""
    groups = []
    for split in range(splits):
        halves = fact_halves(prompts, split, seed)
        group = []
        for relation, frame in chosen.items():
            frame = frame.with_columns(half=_fact.replace_strict(halves, return_dtype=pl.Int64))
            for half in (0, 1):
                part = frame.filter(pl.col("half") == half)
                group.append(Labeling("half", split, half, relation, None,
                                      tuple(part.filter(pl.col("label"))["prompt_id"]),
                                      tuple(part.filter(~pl.col("label"))["prompt_id"])))
        groups.append(group)
    return groups


def stability_table(ranked: pl.DataFrame, positives: dict[tuple[str, int, int], int], top_k: Sequence[int]
                    ) -> pl.DataFrame:
    """tables.STABILITY from the halves' ranked units (labelings.ranked by draw, half and
    relation: every unit); `positives`: the prompts of each (relation, split, half)."""
    rows = []
    for (relation, split), group in ranked.sort("relation", "draw").group_by(["relation", "draw"], maintain_order=True):
        a = group.filter(pl.col("half") == 0).sort("site", "layer", "unit")
        b = group.filter(pl.col("half") == 1).sort("site", "layer", "unit")
        population = a.height
        if b.height != population or not a.select("site", "layer", "unit").equals(b.select("site", "layer", "unit")):
            raise NeuronmapError(f"stability: the halves of {relation} (split {split}) ranked different units")
        spearman = float(scipy.stats.spearmanr(a["ap"].to_numpy(), b["ap"].to_numpy()).statistic)
        for k in sorted(top_k):
            top_a = a.filter(pl.col("rank") <= k).select("site", "layer", "unit")
            shared = top_a.join(b.filter(pl.col("rank") <= k), on=["site", "layer", "unit"]).height
            rows.append({"relation": relation, "split": split, "k": k,
                         "positives_a": positives[(relation, split, 0)], "positives_b": positives[(relation, split, 1)],
                         "shared": shared, "expected_independent": k * k / population, "fraction": shared / k,
                         "p_value": hypergeometric_tail(shared, population, k, k), "ap_spearman": spearman})
    if not rows:
        return pl.from_arrow(tables.STABILITY.empty_table())
    return pl.from_arrow(pl.DataFrame(rows).select(tables.STABILITY.names).to_arrow().cast(tables.STABILITY))
