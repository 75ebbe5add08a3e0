"""Side effects of an ablation: perplexity of a neutral text with and without it.

A relation's units are specific when switching them off hurts that relation but leaves ordinary
text about as predictable as before. The text (data/neutral_text.txt by default) is scored as
one sequence per row, one row per ablation configuration, all sharing forward passes through
per-row unit masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import polars as pl
import torch
import torch.nn.functional as F

from ..errors import NeuronmapError
from ..io import tables
from ..model.architectures import MlpSites
from ..model.batching import LOGIT_BUDGET
from ..model.deactivation import Deactivation, RowDeactivation
from ..model.dispatch import input_device


def read_text(path: str | Path, tokenizer, max_tokens: int) -> torch.Tensor:
    """The text's token ids as [1, tokens] (BOS added when the tokenizer adds one)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise NeuronmapError(f"perplexity.text: {path} not found") from None
    except UnicodeDecodeError as exc:
        raise NeuronmapError(f"perplexity.text: {path} is not UTF-8 text: {exc}") from None
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens]
    if ids.shape[1] < 2:
        raise NeuronmapError(f"perplexity.text: {path} has fewer than 2 tokens")
    return ids


def mean_nll(model, input_ids: torch.Tensor, configs: Sequence[Deactivation]) -> list[float]:
    """Mean negative log-likelihood (nats per predicted token) of `input_ids` [1, T] under each
    configuration."""
    device = input_device(model)
    input_ids = input_ids.to(device)
    tokens = input_ids.shape[1]
    vocab = model.get_output_embeddings().weight.shape[0]
    rows_per_pass = max(1, LOGIT_BUDGET // (tokens * vocab * 4))
    masks = RowDeactivation(MlpSites(model), configs, device)
    out: list[float] = []
    with masks.installed(), torch.inference_mode():
        for start in range(0, len(configs), rows_per_pass):
            rows = list(range(start, min(len(configs), start + rows_per_pass)))
            masks.set_rows(rows)
            logits = model(input_ids=input_ids.expand(len(rows), -1), use_cache=False).logits
            for row in range(len(rows)):
                out.append(F.cross_entropy(logits[row, :-1].float(), input_ids[0, 1:], reduction="mean").item())
    return out


def perplexity(nll: float) -> float:
    return math.exp(nll)


def perplexity_frame(ablations: Sequence, nll: Sequence[float], tokens: int) -> pl.DataFrame:
    """One row per ablation (the first one the baseline), with the ratio to the baseline."""
    frame = pl.DataFrame({
        "ablated_relation": [a.ablated_relation for a in ablations], "k": [a.k for a in ablations],
        "control": [a.control for a in ablations], "seed": [a.seed for a in ablations],
        "tokens": [tokens] * len(ablations), "nll": list(nll),
    }, schema_overrides={"ablated_relation": pl.String, "k": pl.Int64, "seed": pl.Int64, "tokens": pl.Int64})
    return frame.with_columns(perplexity=pl.col("nll").exp()) \
        .with_columns(baseline_perplexity=pl.col("perplexity").first()) \
        .with_columns(ratio=pl.col("perplexity") / pl.col("baseline_perplexity")) \
        .select(tables.PERPLEXITY.names)
