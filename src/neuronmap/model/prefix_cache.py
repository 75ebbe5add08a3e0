"""Shared prompt prefixes forwarded once: the demonstrations that start many prompts are run
through the model once (per deactivation configuration) and their key/value cache reused by
every batch of queries that follows them.

Under causal attention a prefix's keys and values do not depend on what follows it, so a query
forwarded after the cached prefix sees exactly what it sees in the whole prompt: the same
activations to float rounding, the same greedy answers. All distinct prefixes are forwarded
together, left-padded, so that one batch of queries may follow different prefixes: each row
selects its prefix's cache row, the attention mask hides the padding, and positions are
counted over the attended tokens only (as `generate` does for a left-padded batch).

Token boundaries are taken from the whole prompt's tokenization: a prompt's prefix is the
longest run of leading tokens that it shares with its prefix text tokenized alone, so a token
that a tokenizer merges across the boundary belongs to the query and the cached path forwards
exactly the tokens of the uncached one.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .dispatch import input_device

NO_PREFIX = -1


@dataclass(frozen=True)
class PromptTokens:
    """Each prompt as (prefix, query): `prefix_of[i]` indexes `prefixes` (NO_PREFIX: the whole
    prompt is its query), `queries[i]` are the tokens after it."""
    prefixes: list[list[int]]
    prefix_of: list[int]
    queries: list[list[int]]

    def tokens(self, i: int) -> list[int]:
        return self.prefix_tokens(i) + self.queries[i]

    def prefix_tokens(self, i: int) -> list[int]:
        return [] if self.prefix_of[i] == NO_PREFIX else self.prefixes[self.prefix_of[i]]


def _shared_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_prompts(tokenizer, prefixes: Sequence[str], texts: Sequence[str]) -> PromptTokens:
    """Tokenize each text and cut it after its prefix (an empty prefix text: no prefix). Each
    query keeps at least one token."""
    full = tokenizer(list(texts))["input_ids"]
    distinct = sorted({p for p in prefixes if p})
    prefix_ids = dict(zip(distinct, tokenizer(distinct)["input_ids"])) if distinct else {}
    index: dict[tuple[int, ...], int] = {}
    prefix_of, queries = [], []
    for prefix, ids in zip(prefixes, full):
        n = min(_shared_length(prefix_ids[prefix], ids), len(ids) - 1) if prefix else 0
        prefix_of.append(index.setdefault(tuple(ids[:n]), len(index)) if n else NO_PREFIX)
        queries.append(list(ids[n:]))
    return PromptTokens([list(key) for key in index], prefix_of, queries)


@functools.cache
def _cache_argument(model_class: type) -> str:
    # transformers 5.x names it `cache`; earlier versions `past_key_values`.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def with_cache(model, cache) -> dict:
    """Keyword arguments that hand `cache` (None: a new one) to the model's forward."""
    return {_cache_argument(type(model)): cache, "use_cache": True}


def returned_cache(model, output):
    return getattr(output, _cache_argument(type(model)))


def positions_of(attention: torch.Tensor) -> torch.Tensor:
    """Each token's position counted over the attended tokens before it (padding anywhere)."""
    return (attention.cumsum(1) - 1).clamp(min=0)


@dataclass
class SharedPrefixes:
    """The key/value cache of every distinct prefix, left-padded to the longest, one row per
    (repeat, prefix): row r * len(prefixes) + p."""
    cache: object
    mask: torch.Tensor  # [rows, longest] long, 1 on the prefix's tokens

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def rows(self, rows: torch.Tensor) -> tuple[object, torch.Tensor]:
        """A fresh cache whose row i is cached row rows[i] (a forward pass extends the cache it
        is given, so each batch gets its own copy) and those rows' prefix mask."""
        cache = copy.deepcopy(self.cache)
        # Indices on the host index a tensor on any device (a dispatched model's cache spans several).
        cache.batch_select_indices(rows if rows.device.type == "cpu" else rows.cpu())
        return cache, self.mask[rows.to(self.mask.device)]


def forward_prefixes(model, prefixes: Sequence[Sequence[int]], repeats: int = 1) -> SharedPrefixes | None:
    """Forward every prefix `repeats` times (the repeats differ when a per-row deactivation is
    installed: one repeat per configuration). None when there is no prefix."""
    if not prefixes:
        return None
    device = input_device(model)
    longest = max(len(p) for p in prefixes)
    rows = [list(p) for p in prefixes] * repeats
    ids = torch.zeros((len(rows), longest), dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, prefix in enumerate(rows):
        ids[i, longest - len(prefix):] = torch.as_tensor(prefix)
        mask[i, longest - len(prefix):] = 1
    ids, mask = ids.to(device), mask.to(device)
    output = model(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask), use_cache=True,
                   logits_to_keep=1)
    return SharedPrefixes(returned_cache(model, output), mask)
