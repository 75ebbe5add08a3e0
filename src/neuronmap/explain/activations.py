"""The selected units' per-token activations on a sample of corpus contexts, and the contexts each
unit's explainer and scorer see.

One forward pass per batch reads only the selected units (a hook per site and layer that keeps
their columns) and stops after the deepest layer it needs. Memory holds the sampled contexts'
values of those units alone; a job with more units than `VALUE_BUDGET` allows forwards the
contexts again for each slice of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from ..model.architectures import MlpSites
from ..model.batching import length_sorted_batches
from ..model.dispatch import input_device

log = logging.getLogger("neuronmap")

# Bytes of float32 per-token values one pass may hold ([contexts, tokens, units]).
VALUE_BUDGET = 1 << 30


def scoring_half(document: str, seed: int) -> bool:
    """Whether a document's contexts are held out for scoring: a stable hash (not Python's, which
    changes per process), so the explainer never sees a context the scorer judges."""
    digest = hashlib.blake2b(f"{seed}:{document}".encode(), digest_size=8).digest()
    return digest[0] & 1 == 1


def sample_contexts(contexts: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    """`n` contexts of 2 tokens or more (a seeded sample, in corpus order) with their half."""
    usable = contexts.filter(pl.col("n_tokens") >= 2).sort("context_id")
    if usable.height > n:
        picked = np.sort(np.random.default_rng(seed).choice(usable.height, n, replace=False))
        usable = usable[picked]
    return usable.with_columns(
        pl.col("document").map_elements(lambda d: scoring_half(d, seed), return_dtype=pl.Boolean).alias("scoring"))


@dataclass
class UnitValues:
    """Per-token values of some units on the sampled contexts."""
    values: np.ndarray          # [contexts, tokens, units] float32, NaN past a context's end and on special tokens
    peaks: np.ndarray           # [contexts, units] each context's highest value
    positions: np.ndarray       # [contexts, units] its position


class _Done(Exception):
    """Raised by the deepest hook: the layers after it compute nothing the job keeps."""


def unit_values(model, contexts: pl.DataFrame, units: pl.DataFrame, batch_size: int, pad_id: int,
                special_ids=(), progress: str = "") -> UnitValues:
    """Forward `contexts` (token_ids) and keep the per-token values of `units` (site, layer, unit)."""
    sites = MlpSites(model)
    ids = contexts["token_ids"].to_list()
    lengths = [len(t) for t in ids]
    width = max(lengths)
    values = np.full((len(ids), width, units.height), np.nan, np.float32)
    columns: dict[tuple[str, int], tuple[list[int], torch.Tensor]] = {}
    for j, (site, layer, unit) in enumerate(units.select("site", "layer", "unit").iter_rows()):
        columns.setdefault((site, layer), ([], []))
        columns[(site, layer)][0].append(j)
        columns[(site, layer)][1].append(unit)
    deepest = max(layer for _, layer in columns)
    found: dict[tuple[str, int], torch.Tensor] = {}

    def hook_for(key, is_input):
        index = torch.tensor(columns[key][1])

        def hook(module, args, output=None):
            x = args[0] if is_input else output
            found[key] = x[..., index.to(x.device)].float().cpu()
            if key[1] == deepest and len(found) == len(columns):
                raise _Done
        return hook

    device = input_device(model)
    special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
    started, done = time.perf_counter(), 0
    with contextlib.ExitStack() as stack:
        for key in columns:
            point = sites.point(*key)
            stack.callback(point.register(hook_for(key, point.is_input)).remove)
        for batch in length_sorted_batches(lengths, batch_size):
            longest = max(lengths[i] for i in batch)
            tokens = torch.full((len(batch), longest), pad_id, dtype=torch.long)
            for row, i in enumerate(batch):
                tokens[row, :lengths[i]] = torch.as_tensor(ids[i], dtype=torch.long)
            mask = torch.arange(longest)[None, :] < torch.tensor([lengths[i] for i in batch])[:, None]
            found.clear()
            with torch.inference_mode(), contextlib.suppress(_Done):
                model(input_ids=tokens.to(device), attention_mask=mask.long().to(device), use_cache=False)
            keep = mask & ~torch.isin(tokens, special) if len(special) else mask
            for key, (slots, _) in columns.items():
                block = found[key].masked_fill(~keep[..., None], float("nan")).numpy()
                for row, i in enumerate(batch):
                    values[i][:longest, slots] = block[row]
            done += len(batch)
            if progress:
                log.info("%s: %d/%d contexts forwarded (%.0f s)", progress, done, len(ids),
                         time.perf_counter() - started)
    filled = np.where(np.isnan(values), -np.inf, values)
    positions = filled.argmax(1)
    peaks = np.take_along_axis(filled, positions[:, None, :], 1)[:, 0, :]
    return UnitValues(values, peaks, positions)


def units_per_pass(contexts: int, tokens: int) -> int:
    return max(1, VALUE_BUDGET // (4 * max(1, contexts * tokens)))
