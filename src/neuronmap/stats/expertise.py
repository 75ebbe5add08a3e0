"""The stats stage: each unit's expertise for each relation, the Average Precision of its
responses used as scores for "this prompt is of the relation" (maths/expertise.py).

Map: a block job sorts each unit's responses to all identification prompts once and reuses
that order for every relation. Reduce: a relation job ranks the units of all blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import polars as pl
import torch

from ..errors import NeuronmapError
from ..io import tables
from ..io.responses import ResponseReader
from ..maths.draws import relation_rng
from ..maths.expertise import RANK_ORDER, block_expertise

log = logging.getLogger(__name__)


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
    return pl.concat(parts).select(tables.EXPERTISE_BLOCK.names)


def rank_units(scores: pl.DataFrame) -> pl.DataFrame:
    """The reduce step for one relation: all units ranked (1 = most expert) by AP, ties broken
    by separation, then by site, layer and unit so that the order is total and deterministic."""
    table = scores.sort(list(RANK_ORDER), descending=[True, True, False, False, False])
    return table.with_columns(rank=pl.int_range(1, table.height + 1, dtype=pl.Int64)) \
        .select(tables.EXPERTISE.names)


def selected_units(expertise: pl.DataFrame, relation: str, top_k: Sequence[int]) -> pl.DataFrame:
    k = max(top_k)
    if k > expertise.height:
        raise NeuronmapError(f"top_k: {k} is larger than the {expertise.height} units ranked")
    return expertise.filter(pl.col("rank") <= k).with_columns(relation=pl.lit(relation)) \
        .select(tables.SELECTED_UNITS.names)
