"""The relation study's expertise on a labelled corpus: per label and unit, the Average
Precision of the unit's mean response over a context at telling the label's contexts from all
other contexts (maths/expertise.py's AP, as the relation study's, on the responses the records jobs stored), ties broken
by the same separation measure; and the top units per label."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import torch

from ..errors import NeuronmapError
from ..io import tables
from ..io.responses import ResponseReader
from ..maths.expertise import RANK_ORDER, block_expertise


def label_expertise(responses: Sequence[str | Path], contexts: pl.DataFrame, labels: list[str]) -> pl.DataFrame:
    """tables.LABEL_EXPERTISE for every unit stored in `responses`, over `contexts` (context_id, label)."""
    reader = ResponseReader(list(responses))
    ids = [str(c) for c in contexts["context_id"].to_list()]
    label_of = contexts["label"].to_list()
    positive = torch.tensor([[label == wanted for wanted in labels] for label in label_of], dtype=torch.bool)
    included = torch.ones_like(positive)
    blocks = reader.blocks("mean")
    if not blocks:
        raise NeuronmapError(f"{responses[0]}: no context responses stored (labels.ap was off in the records jobs?)")
    parts = []
    for site, layer in blocks:
        stats = block_expertise(reader.read_block("mean", site, layer, ids), positive, included)
        width = stats["ap"].shape[1]
        for index, label in enumerate(labels):
            parts.append(pl.DataFrame({
                "site": [site] * width, "layer": np.full(width, layer, np.int32), "unit": np.arange(width, dtype=np.int32),
                "label": [label] * width, "ap": stats["ap"][index], "separation": stats["separation"][index]}))
    return rank_per_label(pl.concat(parts))


def rank_per_label(scores: pl.DataFrame) -> pl.DataFrame:
    """Rank 1 = most expert within each label: AP, then separation, then site, layer, unit."""
    ranked = scores.sort(["label", *RANK_ORDER], descending=[False, True, True, False, False, False])
    return ranked.with_columns(rank=pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over("label")) \
        .select(tables.LABEL_EXPERTISE.names)


def ap_selection(expertise: pl.DataFrame, counts: dict[str, int]) -> pl.DataFrame:
    """tables.LABEL_UNITS rows of method "ap": each label's `counts[label]` top units."""
    chosen = expertise.filter(pl.col("rank") <= pl.col("label").replace_strict(counts, return_dtype=pl.Int64))
    return chosen.sort(["label", "rank"]).with_columns(
        method=pl.lit("ap"), score=pl.col("ap"), rank=pl.col("rank").cast(pl.Int32)).select(tables.LABEL_UNITS.names)
