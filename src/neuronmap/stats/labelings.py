"""Labelings of the identification prompts other than the relations' own, scored with the same
Average Precision as the selection: permuted relation labels (the versatility null), a pair of
relations each ranked without the other's prompts among its negatives (the reference study's
reading of shared units), and halves of the facts (split-half stability).

The map step reads one block of layers' responses once and scores every labeling with one sort
per unit (maths.expertise.average_precision_groups): within a group of labelings a prompt is a
positive of one labeling at most, so each permutation, each round of pairs and each split is
one group. It keeps, per labeling, the block's `keep` best units (enough for any top-k) with
their separation, so that the reduce step ranks them as the selection ranks, or all of
them where it needs every unit's AP (the halves' rank correlation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from ..errors import NeuronmapError
from ..io import tables
from ..io.responses import ResponseReader
from ..maths.expertise import RANK_ORDER, average_precision_groups
from .expertise import layer_block

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Labeling:
    check: str               # "permutation", "leave_pair_out" or "half"
    draw: int                # the permutation or the split; 0 for leave_pair_out
    half: int                # 0 or 1 for a half; 0 otherwise
    relation: str            # whose positives (a permuted label for a permutation)
    other: str | None        # leave_pair_out: the relation whose prompts are not negatives
    positives: tuple[str, ...]
    negatives: tuple[str, ...]

    @property
    def every_unit(self) -> bool:
        """Keep every unit, not only the best: the halves' rank correlation needs every AP."""
        return self.check == "half"


def group_masks(group: Sequence[Labeling], prompt_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """[prompts, labelings] positive and included masks."""
    row = {pid: i for i, pid in enumerate(prompt_ids)}
    positive = torch.zeros(len(prompt_ids), len(group), dtype=torch.bool)
    included = torch.zeros_like(positive)
    for column, labeling in enumerate(group):
        on = [row[pid] for pid in labeling.positives]
        positive[on, column] = True
        included[on + [row[pid] for pid in labeling.negatives], column] = True
    return positive, included


def score_block(reader: ResponseReader, groups: Sequence[Sequence[Labeling]], pooling: str, block: int,
                n_blocks: int, keep: int) -> pl.DataFrame:
    """tables.LABELING_BLOCK: the map step over the units of one block of layers."""
    if not groups:
        return pl.from_arrow(tables.LABELING_BLOCK.empty_table())
    prompt_ids = sorted({pid for group in groups for lab in group for pid in lab.positives + lab.negatives})
    all_blocks = reader.blocks(pooling)
    if not all_blocks:
        raise NeuronmapError(f"responses hold no {pooling!r} pooling (extraction poolings must include it)")
    layers = set(layer_block(max(layer for _, layer in all_blocks) + 1, block, n_blocks))
    keys = [key for key in all_blocks if key[1] in layers]
    return score_values(lambda site, layer: reader.read_block(pooling, site, layer, prompt_ids), keys, prompt_ids,
                        groups, keep)


def score_values(read: Callable[[str, int], np.ndarray], keys: Sequence[tuple[str, int]], prompt_ids: Sequence[str],
                 groups: Sequence[Sequence[Labeling]], keep: int) -> pl.DataFrame:
    """tables.LABELING_BLOCK from the responses [prompts, units] that `read(site, layer)` gives
    for each (site, layer) of `keys`. Two passes: every unit's AP for every labeling; then the
    separation (the selection's tie-break) of the units a labeling keeps: its `keep` best by AP
    and any tied with the last of them, or every unit for a half."""
    masks = [group_masks(group, prompt_ids) for group in groups]
    labelings = [lab for group in groups for lab in group]
    ap_parts, unit_parts = [], []
    for site, layer in keys:
        values = read(site, layer)
        ap_parts.append(np.concatenate(average_precision_groups(torch.from_numpy(values), masks)))
        unit_parts.append(pl.DataFrame({"site": site, "layer": np.full(values.shape[1], layer, np.int32),
                                        "unit": np.arange(values.shape[1], dtype=np.int32)}))
        log.info("%s layer %d: AP of %d labelings", site, layer, len(labelings))
    ap = np.concatenate(ap_parts, axis=1)  # [labelings, units of the block]
    units = pl.concat(unit_parts)
    kept = np.ones_like(ap, dtype=bool)
    for row, lab in enumerate(labelings):
        if not lab.every_unit and keep < ap.shape[1]:
            kept[row] = ap[row] >= np.partition(ap[row], ap.shape[1] - keep)[ap.shape[1] - keep]
    positive = np.concatenate([p.numpy() & i.numpy() for p, i in masks], axis=1)  # [prompts, labelings]
    negative = np.concatenate([~p.numpy() & i.numpy() for p, i in masks], axis=1)
    spread = np.full_like(ap, np.nan)
    start = 0
    for (site, layer), part in zip(keys, ap_parts):
        stop = start + part.shape[1]
        wanted = kept[:, start:stop]
        if wanted.any():
            spread[:, start:stop] = np.where(wanted, separations(read(site, layer), positive, negative), np.nan)
        start = stop
    frames = []
    for row, lab in enumerate(labelings):
        chosen = np.flatnonzero(kept[row])
        frames.append(units[chosen].with_columns(
            check=pl.lit(lab.check), draw=pl.lit(lab.draw, pl.Int32), half=pl.lit(lab.half, pl.Int32),
            relation=pl.lit(lab.relation), other=pl.lit(lab.other, pl.String),
            ap=pl.Series(ap[row, chosen]), separation=pl.Series(spread[row, chosen])))
    return pl.concat(frames).select(tables.LABELING_BLOCK.names)


def separations(values: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """maths.expertise.separation of every unit (column of `values` [prompts, units]) for every
    labeling at once ([prompts, labelings] masks of its positives and negatives): [labelings,
    units], as matrix products of the centred responses (equal to the one-at-a-time separation
    to rounding)."""
    x = values.astype(np.float64)
    x -= x.mean(0)
    squares = x * x
    stats = []
    for mask in (positive, negative):
        weights = mask.T.astype(np.float64) / mask.sum(0)[:, None]
        mean = weights @ x
        stats.append((mean, np.maximum(weights @ squares - mean * mean, 0.0)))
    (on, on_var), (off, off_var) = stats
    difference = on - off
    spread = np.sqrt((on_var + off_var) / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(spread > 0, difference / spread, np.where(difference == 0, 0.0, np.sign(difference) * np.inf))


def ranked(scores: pl.DataFrame, by: Sequence[str]) -> pl.DataFrame:
    """Per labeling (the columns `by`), its units as the selection ranks them (AP, separation,
    site, layer, unit), with rank 1 = best."""
    ordered = scores.sort([*by, *RANK_ORDER], descending=[False] * len(by) + [True, True, False, False, False])
    return ordered.with_columns(rank=pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over(by))
