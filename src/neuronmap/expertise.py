"""The stats stage: each unit's expertise for each relation, the Average Precision of its
responses used as scores for "this prompt is of the relation".

Map: a block job sorts each unit's responses to all identification prompts once and reuses
that order for every relation. Reduce: a relation job ranks the units of all blocks.
"""

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

# Unit x prompt x relation cells scored at once: bounds a block job's memory whatever the
# model's width, and keeps the working set near the CPU caches.
CHUNK_CELLS = 1 << 22
_SHIFT = 16
_LOW = (1 << _SHIFT) - 1


def average_precision_many(scores: torch.Tensor, positive: torch.Tensor, included: torch.Tensor) -> torch.Tensor:
    """AP of every column of `scores` [prompts, units] for each of R labelings: `positive`
    and `included` are [prompts, R] booleans (a prompt outside `included` does not count for
    that relation). Returns [R, units] float64.

    Exactly sklearn.metrics.average_precision_score, ties included: tied scores form one
    threshold, so every positive in a tie group gets the precision at the group's end.
    One sort per unit serves every relation.
    """
    return _ap_units_major(scores.T.contiguous(), positive, included)


def _ap_units_major(scores: torch.Tensor, positive: torch.Tensor, included: torch.Tensor) -> torch.Tensor:
    units, n = scores.shape
    if n >= 1 << _SHIFT:
        raise ValueError(f"average_precision: at most {(1 << _SHIFT) - 1} prompts per block")
    hits = positive & included
    if bool((hits.sum(1) > 1).any()):
        raise ValueError("average_precision_many: a prompt may be a positive of one labeling only")
    n_positive = hits.sum(0).to(torch.float64)
    if bool((n_positive == 0).any()):
        raise ValueError("average_precision: a labeling has no positive")
    relations = hits.shape[1]
    # Both running counts of a relation in one int32: positives above bit 16, included below,
    # so one gather and one cumsum serve both.
    code = hits.to(torch.int32) * (1 << _SHIFT) + included.to(torch.int32)        # [n, R]
    owner = torch.where(hits.any(1), hits.to(torch.int8).argmax(1), -1)           # [n] relation a prompt is a positive of
    sorted_scores, order = torch.sort(scores, dim=1, descending=True)
    ascending = sorted_scores.neg_()
    group_end = torch.searchsorted(ascending, ascending, right=True).sub_(1)       # [units, n] end of each tie group
    running = code[order].cumsum(1, dtype=torch.int32).view(units, n * relations)  # [units, n * R]
    # Precision is needed only where a positive sits: at its tie group's end, for its own relation.
    sorted_owner = owner[order]                                                   # [units, n]
    is_positive = sorted_owner >= 0
    sorted_owner.clamp_(min=0)
    at_end = running.gather(1, group_end.mul_(relations).add_(sorted_owner))
    precision = (at_end >> _SHIFT).to(torch.float32).div_((at_end & _LOW).to(torch.float32).clamp_(min=1))
    precision.mul_(is_positive)
    total = torch.zeros(units, relations, dtype=torch.float64).scatter_add_(1, sorted_owner, precision.double())
    return (total / n_positive).T


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AP of every column of `scores` [prompts, units] against boolean `labels` [prompts]."""
    labels = labels.bool().unsqueeze(1)
    return average_precision_many(scores, labels, torch.ones_like(labels))[0]


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


def label_matrix(chosen: dict[str, pl.DataFrame], prompt_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """[prompts, R] positive and included masks over `prompt_ids`, relations in `chosen` order."""
    row = {pid: i for i, pid in enumerate(prompt_ids)}
    positive = torch.zeros(len(prompt_ids), len(chosen), dtype=torch.bool)
    included = torch.zeros_like(positive)
    for r, frame in enumerate(chosen.values()):
        rows = torch.as_tensor([row[pid] for pid in frame["prompt_id"]])
        included[rows, r] = True
        positive[rows, r] = torch.as_tensor(frame["label"].to_list())
    return positive, included


def unit_chunks(n_prompts: int, width: int, n_relations: int) -> list[slice]:
    step = max(1, CHUNK_CELLS // max(1, n_prompts * max(1, n_relations)))
    return [slice(start, min(start + step, width)) for start in range(0, width, step)]


def block_expertise(values: np.ndarray, positive: torch.Tensor, included: torch.Tensor) -> dict[str, np.ndarray]:
    """For one (site, layer): ap, on_p50, on_p90, off_mean as [R, units] arrays."""
    scores = torch.from_numpy(values)
    units_major = scores.T.contiguous()
    out = {key: np.empty((positive.shape[1], values.shape[1]), dtype=np.float64)
           for key in ("ap", "on_p50", "on_p90", "off_mean")}
    for chunk in unit_chunks(values.shape[0], values.shape[1], positive.shape[1]):
        out["ap"][:, chunk] = _ap_units_major(units_major[chunk], positive, included).numpy()
    quantiles = torch.tensor([0.5, 0.9])
    for r in range(positive.shape[1]):
        on = scores[positive[:, r] & included[:, r]]
        q = torch.quantile(on, quantiles, dim=0)
        out["on_p50"][r], out["on_p90"][r] = q[0].numpy(), q[1].numpy()
        out["off_mean"][r] = scores[~positive[:, r] & included[:, r]].mean(0).numpy()
    return out


def layer_block(n_layers: int, block: int, n_blocks: int) -> range:
    """Layers of block `block` when the model's layers are cut into `n_blocks` near-equal runs."""
    if not 0 <= block < n_blocks:
        raise NeuronmapError(f"stats block {block} out of range (stats.blocks = {n_blocks})")
    return range(block * n_layers // n_blocks, (block + 1) * n_layers // n_blocks)


def expertise_block(reader: ResponseReader, chosen: dict[str, pl.DataFrame], pooling: str,
                    block: int, n_blocks: int) -> pl.DataFrame:
    """The map step: every relation's scores for the units of one block of layers."""
    prompt_ids = sorted({pid for frame in chosen.values() for pid in frame["prompt_id"]})
    positive, included = label_matrix(chosen, prompt_ids)
    all_blocks = reader.blocks(pooling)
    if not all_blocks:
        raise NeuronmapError(f"responses hold no {pooling!r} pooling (extraction poolings must include it)")
    n_layers = max(layer for _, layer in all_blocks) + 1
    layers = set(layer_block(n_layers, block, n_blocks))
    relations = list(chosen)
    parts = []
    for site, layer in (key for key in all_blocks if key[1] in layers):
        stats = block_expertise(reader.read_block(pooling, site, layer, prompt_ids), positive, included)
        width = stats["ap"].shape[1]
        for r, relation in enumerate(relations):
            parts.append(pl.DataFrame({
                "relation": [relation] * width, "site": [site] * width,
                "layer": np.full(width, layer, np.int32), "unit": np.arange(width, dtype=np.int32),
                **{key: value[r] for key, value in stats.items()}}))
        log.info("block %d: %s layer %d done", block, site, layer)
    return pl.concat(parts).select(schemas.EXPERTISE_BLOCK.names)


def rank_units(scores: pl.DataFrame, tie_seed: int = 0) -> pl.DataFrame:
    """The reduce step for one relation: all units ranked by AP (1 = most expert)."""
    scores = scores.sort("site", "layer", "unit")
    # Small prompt sets leave many units tied (often at AP = 1). A seeded random order among
    # ties keeps the ranking deterministic without favouring any site or layer.
    tie_break = np.random.default_rng(tie_seed).permutation(scores.height)
    table = scores.with_columns(tie_break=tie_break).sort(["ap", "tie_break"], descending=[True, False])
    return table.with_columns(rank=pl.int_range(1, table.height + 1, dtype=pl.Int64)) \
        .select(schemas.EXPERTISE.names)


def selected_units(expertise: pl.DataFrame, relation: str, top_k: Sequence[int]) -> pl.DataFrame:
    k = max(top_k)
    if k > expertise.height:
        raise NeuronmapError(f"top_k: {k} is larger than the {expertise.height} units ranked")
    return expertise.filter(pl.col("rank") <= k).with_columns(relation=pl.lit(relation)) \
        .select(schemas.SELECTED_UNITS.names)
