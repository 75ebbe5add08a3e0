"""The stats stage: each unit's expertise for a relation as the Average Precision of its
responses, used as classifier scores, for the relation's prompts against other relations'."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import polars as pl
import torch

from . import schemas
from .errors import NeuronmapError
from .prompts import relation_rng
from .responses import ResponseReader

log = logging.getLogger(__name__)


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AP of every column of `scores` [prompts, units] against boolean `labels` [prompts].

    Exactly sklearn.metrics.average_precision_score, ties included: tied scores form one
    threshold, so every positive in a tie group gets the precision at the group's end.
    """
    n = scores.shape[0]
    n_positive = labels.sum()
    if n_positive == 0:
        raise ValueError("average_precision: no positive labels")
    sorted_scores, order = torch.sort(scores, dim=0, descending=True, stable=True)
    hits = labels.to(torch.float64)[order]
    true_positives = hits.cumsum(0)
    is_group_end = torch.ones_like(sorted_scores, dtype=torch.bool)
    is_group_end[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    positions = torch.arange(n, device=scores.device).unsqueeze(1).expand_as(scores)
    group_end = torch.where(is_group_end, positions, n)
    # The end of each position's tie group is the nearest group end at or below it.
    group_end = torch.flip(torch.cummin(torch.flip(group_end, [0]), 0).values, [0])
    precision = true_positives.gather(0, group_end) / (group_end + 1).to(torch.float64)
    return (hits * precision).sum(0) / n_positive


def choose_prompts(prompts: pl.DataFrame, relation: str, negatives_per_positive: int, seed: int) -> pl.DataFrame:
    """Positives: the relation's identification prompts. Negatives: a seeded sample of other
    relations' identification prompts, negatives_per_positive times as many (all if fewer)."""
    identification = prompts.filter(pl.col("split") == "identification")
    positives = identification.filter(pl.col("relation") == relation)
    if positives.height == 0:
        raise NeuronmapError(f"stats: relation {relation} has no identification prompts")
    others = identification.filter(pl.col("relation") != relation).sort("prompt_id")
    if others.height == 0:
        raise NeuronmapError("stats: expertise needs at least two relations (negatives come from the others)")
    wanted = negatives_per_positive * positives.height
    if others.height > wanted:
        rows = relation_rng(seed, relation, "negatives").choice(others.height, wanted, replace=False)
        others = others[np.sort(rows)]
    else:
        log.warning("only %d negatives available for %d positives of %s", others.height, positives.height, relation)
    return pl.concat([positives.with_columns(label=pl.lit(True)), others.with_columns(label=pl.lit(False))]) \
        .select("prompt_id", "relation", "label")


def block_expertise(values: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    scores = torch.from_numpy(values)
    mask = torch.from_numpy(labels)
    on = scores[mask]
    quantiles = torch.quantile(on, torch.tensor([0.5, 0.9]), dim=0)
    return {"ap": average_precision(scores, mask).numpy(),
            "on_p50": quantiles[0].numpy(), "on_p90": quantiles[1].numpy(),
            "off_mean": scores[~mask].mean(0).numpy()}


def expertise_table(reader: ResponseReader, chosen: pl.DataFrame, tie_seed: int = 0) -> pl.DataFrame:
    """One row per unit of every block in `reader`, ranked globally by AP (1 = most expert)."""
    prompt_ids = chosen["prompt_id"].to_list()
    labels = chosen["label"].to_numpy()
    parts = []
    for site, layer in reader.blocks():
        stats = block_expertise(reader.read_block(site, layer, prompt_ids), labels)
        units = len(stats["ap"])
        parts.append(pl.DataFrame({"site": [site] * units, "layer": [layer] * units,
                                   "unit": np.arange(units), **stats}))
    table = pl.concat(parts)
    # Small prompt sets leave many units tied (often at AP = 1). A seeded random order among
    # ties keeps the ranking deterministic without favouring any site or layer.
    tie_break = np.random.default_rng(tie_seed).permutation(table.height)
    table = table.with_columns(tie_break=tie_break).sort(["ap", "tie_break"], descending=[True, False])
    return table.with_columns(rank=pl.int_range(1, table.height + 1, dtype=pl.Int64)) \
        .select(schemas.EXPERTISE.names)


def selected_units(expertise: pl.DataFrame, relation: str, top_k: Sequence[int]) -> pl.DataFrame:
    k = max(top_k)
    if k > expertise.height:
        raise NeuronmapError(f"top_k: {k} is larger than the {expertise.height} units ranked")
    return expertise.filter(pl.col("rank") <= k).with_columns(relation=pl.lit(relation)) \
        .select(schemas.SELECTED_UNITS.names)
