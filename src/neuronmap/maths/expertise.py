"""The expertise measures of a block of units, shared by the relation study (stats/expertise.py)
and the labelled corpus (labels/expertise.py): the Average Precision of each unit's responses used
as scores for "this prompt is of the relation (label)", the separation that breaks AP's ties, and
the order that ranks units by them.

AP is exactly sklearn's, ties included, and one sort per unit serves every relation: the
positives and included prompts of all relations are packed as bit fields, so that one cumsum
counts them all.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import polars as pl
import torch

# Unit x prompt x relation cells scored at once: bounds a block job's memory whatever the
# model's width. The kernel reads its counts in scattered order, so it is fastest while each
# thread's share of a chunk (about 175 units of 1000 prompts and 12 relations) stays in cache.
CHUNK_CELLS = 1 << 22
# Fewer units than this per thread cost more in hand-offs than the thread saves.
_MIN_UNITS_PER_THREAD = 32


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
    packed = _pack_counts(positive, included)
    blocks = _row_blocks(scores.shape[0])
    if len(blocks) == 1:
        return torch.from_numpy(_ap_rows(scores, packed))
    parts = _pool(len(blocks)).map(lambda rows: _ap_rows(scores[rows], packed), blocks)
    return torch.from_numpy(np.concatenate(list(parts), axis=1))


class _Field(NamedTuple):
    """Where one relation's two running counts sit in the packed words. uint64 scalars: numpy
    1.x turns a uint64 array shifted by a Python int into float64."""
    word: int
    positives_shift: np.uint64
    positives_mask: np.uint64
    retrieved_shift: np.uint64
    retrieved_mask: np.uint64


class _PackedCounts(NamedTuple):
    """Each prompt's contribution to every relation's two running counts (its positives and
    its included prompts) as bit fields of a few uint64 words, so that one cumsum per word
    counts every relation. A field is as wide as its relation's total needs, so none carries
    into the next. Prompts get new labels that put each relation's positives side by side."""
    label: np.ndarray       # [n] int32: each prompt's new label
    words: np.ndarray       # [W, n] uint64, by new label
    fields: list[_Field]    # per relation
    bounds: np.ndarray      # [R + 1]: relation r's positives are labels bounds[r]:bounds[r + 1]
    word_of: np.ndarray     # [n] int64, by new label: the word of the relation it is a positive of
    n_positive: np.ndarray  # [R]


def _pack_counts(positive: torch.Tensor, included: torch.Tensor) -> _PackedCounts:
    # Every chunk of a block has the same labels: pack them once.
    return _pack_counts_of(positive.bool().numpy().tobytes(), included.bool().numpy().tobytes(),
                           tuple(positive.shape))


@functools.lru_cache(maxsize=4)
def _pack_counts_of(positive: bytes, included: bytes, shape: tuple[int, int]) -> _PackedCounts:
    included = np.frombuffer(included, bool).reshape(shape)
    hits = np.frombuffer(positive, bool).reshape(shape) & included
    if (hits.sum(1) > 1).any():
        raise ValueError("average_precision_many: a prompt may be a positive of one labeling only")
    n_positive = hits.sum(0)
    if (n_positive == 0).any():
        raise ValueError("average_precision: a labeling has no positive")
    n, relations = shape
    owner = np.where(hits.any(1), hits.argmax(1), relations)
    by_label = np.argsort(owner, kind="stable")
    label = np.empty(n, np.int32)
    label[by_label] = np.arange(n, dtype=np.int32)
    fields = _field_layout(n_positive, included.sum(0))
    words = np.zeros((fields[-1].word + 1, n), np.uint64)
    for r, field in enumerate(fields):
        words[field.word] |= hits[by_label, r].astype(np.uint64) << field.positives_shift
        words[field.word] |= included[by_label, r].astype(np.uint64) << field.retrieved_shift
    word_of = np.zeros(n, np.int64)
    word_of[:n_positive.sum()] = np.repeat([field.word for field in fields], n_positive)
    return _PackedCounts(label, words, fields, np.concatenate([[0], np.cumsum(n_positive)]), word_of, n_positive)


def _field_layout(n_positive: np.ndarray, n_included: np.ndarray) -> list[_Field]:
    fields, word, used = [], -1, 64
    for positives, retrieved in zip(n_positive, n_included):
        positives_bits, retrieved_bits = int(positives).bit_length(), int(retrieved).bit_length()
        if used + positives_bits + retrieved_bits > 64:
            word, used = word + 1, 0
        fields.append(_Field(word, np.uint64(used + retrieved_bits), np.uint64((1 << positives_bits) - 1),
                             np.uint64(used), np.uint64((1 << retrieved_bits) - 1)))
        used += positives_bits + retrieved_bits
    return fields


def _ap_rows(scores: torch.Tensor, packed: _PackedCounts) -> np.ndarray:
    """[R, units] AP of a block of units-major scores."""
    pairs = _sorted_prompts(scores, packed.label)
    return _ap_sorted(pairs[..., _LABEL].astype(np.int64), _tie_group_ends(pairs[..., _KEY]), packed)


def _ap_sorted(order: np.ndarray, ends: np.ndarray, packed: _PackedCounts) -> np.ndarray:
    """[R, units] AP from each unit's prompts in descending order of score (`order` [units, n],
    their labels in `packed`; overwritten) and the end of each one's tie group (`ends`)."""
    units, n = order.shape
    running = packed.words.take(order.ravel(), axis=1).reshape(-1, n)  # [W * units, n]
    np.cumsum(running, axis=1, out=running)
    # Back to label order: each prompt's counts where its tie group ends, read in the word of
    # its own relation (the only one whose precision it adds to).
    order += np.arange(0, units * n, n)[:, None]
    read_at = np.empty((units, n), np.int64)
    read_at.ravel()[order.ravel()] = ends
    read_at += packed.word_of * (units * n)
    counts = running.ravel().take(read_at)
    ap = np.empty((len(packed.fields), units))
    for r, field in enumerate(packed.fields):
        mine = counts[:, packed.bounds[r]:packed.bounds[r + 1]]
        positives = (mine >> field.positives_shift) & field.positives_mask
        retrieved = (mine >> field.retrieved_shift) & field.retrieved_mask
        ap[r] = (positives / retrieved).sum(1) / packed.n_positive[r]
    return ap


# A (label, score key) pair of int32s sorts as one int64 with the key in its high half.
_LABEL, _KEY = (0, 1) if sys.byteorder == "little" else (1, 0)


def _sorted_prompts(scores: torch.Tensor, label: np.ndarray) -> np.ndarray:
    """Each unit's prompts by descending score, as [units, n, 2] int32 pairs (see _LABEL, _KEY).
    Sorting the pairs as int64s is several times faster than an argsort of the scores."""
    units, n = scores.shape
    pairs = np.empty((units, n, 2), np.int32)
    _descending_key(scores, out=pairs[..., _KEY])
    pairs[..., _LABEL] = label
    pairs.view(np.int64).reshape(units, n).sort(axis=1)
    return pairs


def _descending_key(scores: torch.Tensor, out: np.ndarray) -> None:
    """int32 keys that order as the scores do, reversed, and tie exactly where they tie."""
    if scores.dtype in (torch.float32, torch.float16, torch.bfloat16):  # exact in float32
        # 0 - x rather than -x: -0.0 and 0.0 must tie.
        bits = np.subtract(np.float32(0), scores.detach().float().numpy()).view(np.int32)
        # Sign-magnitude float bits to two's complement order: flip the magnitude of negatives.
        np.right_shift(bits, 31, out=out)
        out &= 0x7FFFFFFF
        out ^= bits
    else:
        _, rank = torch.unique(scores.detach(), return_inverse=True)
        out[...] = rank.neg().numpy()


def _tie_group_ends(keys: np.ndarray) -> np.ndarray:
    """Flat position, for each sorted prompt, of the last prompt of its tie group."""
    units, n = keys.shape
    last = np.empty((units, n), bool)
    np.not_equal(keys[:, :-1], keys[:, 1:], out=last[:, :-1])
    last[:, -1] = True
    last = last.ravel()
    group = np.cumsum(last)
    group -= last
    return np.flatnonzero(last).take(group)


def _row_blocks(units: int) -> list[slice]:
    """One block of units per torch thread: numpy lets go of the GIL in the kernel's sorts,
    gathers and cumsums, so the blocks run in parallel."""
    count = max(1, min(torch.get_num_threads(), units // _MIN_UNITS_PER_THREAD))
    bounds = np.linspace(0, units, count + 1).astype(int)
    return [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="average-precision")


os.register_at_fork(after_in_child=_pool.cache_clear)  # a forked child has none of the threads


def average_precision_groups(scores: torch.Tensor, groups: Sequence[tuple[torch.Tensor, torch.Tensor]]
                             ) -> list[np.ndarray]:
    """average_precision_many for several groups of labelings of the same `scores` [prompts,
    units], with one sort per unit for all of them: a prompt may be a positive of one labeling
    per group, of any number across groups (permuted labels, halves of the prompts). Returns
    each group's [R_g, units] float64."""
    packs = [_pack_counts(positive, included) for positive, included in groups]
    units_major = scores.T.contiguous()
    n, units = scores.shape
    identity = np.arange(n, dtype=np.int32)

    def rows_ap(rows: slice) -> list[np.ndarray]:
        pairs = _sorted_prompts(units_major[rows], identity)
        ends = _tie_group_ends(pairs[..., _KEY])
        return [_ap_sorted(pack.label.take(pairs[..., _LABEL]).astype(np.int64), ends, pack) for pack in packs]

    widest = max(len(pack.fields) for pack in packs)
    out = [np.empty((len(pack.fields), units)) for pack in packs]
    for chunk in unit_chunks(n, units, widest):
        blocks = [slice(chunk.start + b.start, chunk.start + b.stop) for b in _row_blocks(chunk.stop - chunk.start)]
        parts = [rows_ap(blocks[0])] if len(blocks) == 1 else list(_pool(len(blocks)).map(rows_ap, blocks))
        for rows, part in zip(blocks, parts):
            for g, ap in enumerate(part):
                out[g][:, rows] = ap
    return out


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AP of every column of `scores` [prompts, units] against boolean `labels` [prompts]."""
    labels = labels.bool().unsqueeze(1)
    return average_precision_many(scores, labels, torch.ones_like(labels))[0]


def unit_chunks(n_prompts: int, width: int, n_relations: int) -> list[slice]:
    step = max(1, CHUNK_CELLS // max(1, n_prompts * max(1, n_relations)))
    return [slice(start, min(start + step, width)) for start in range(0, width, step)]


def separation(on: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """Per unit, the standardized difference of its responses on positives and on negatives:
    (mean on - mean off) / sqrt((var on + var off) / 2), in float64. It breaks AP's ties: among
    units that order the prompts equally well, the one whose positives stand further from its
    negatives ranks first. No spread at all: +-inf where the means differ, 0 where they do not."""
    on, off = on.double(), off.double()
    difference = on.mean(0) - off.mean(0)
    spread = torch.sqrt((on.var(0, correction=0) + off.var(0, correction=0)) / 2)
    no_spread = torch.where(difference == 0, torch.zeros_like(difference), difference.sign() * torch.inf)
    return torch.where(spread > 0, difference / spread.clamp(min=torch.finfo(torch.float64).tiny), no_spread)


def block_expertise(values: np.ndarray, positive: torch.Tensor, included: torch.Tensor) -> dict[str, np.ndarray]:
    """For one (site, layer): ap, separation, on_p50, on_p90, off_mean as [R, units] arrays."""
    scores = torch.from_numpy(values)
    units_major = scores.T.contiguous()
    out = {key: np.empty((positive.shape[1], values.shape[1]), dtype=np.float64)
           for key in ("ap", "separation", "on_p50", "on_p90", "off_mean")}
    for chunk in unit_chunks(values.shape[0], values.shape[1], positive.shape[1]):
        out["ap"][:, chunk] = _ap_units_major(units_major[chunk], positive, included).numpy()
    quantiles = torch.tensor([0.5, 0.9])
    for r in range(positive.shape[1]):
        on = scores[positive[:, r] & included[:, r]]
        off = scores[~positive[:, r] & included[:, r]]
        q = torch.quantile(on, quantiles, dim=0)
        out["on_p50"][r], out["on_p90"][r] = q[0].numpy(), q[1].numpy()
        out["off_mean"][r] = off.mean(0).numpy()
        out["separation"][r] = separation(on, off).numpy()
    return out


# Units rank by AP, ties broken by separation, then by site, layer and unit: a total order.
RANK_ORDER = ("ap", "separation", "site", "layer", "unit")


def top_ties(expertise: pl.DataFrame) -> dict[str, int]:
    """How many units share the top AP, and how many of them still tie with another after
    separation (their rank then falls to site, layer and unit)."""
    top = expertise.filter(pl.col("ap") == expertise["ap"].max())
    unresolved = top.group_by("separation").len().filter(pl.col("len") > 1)["len"].sum()
    return {"at_top_ap": top.height, "unresolved": int(unresolved or 0)}
