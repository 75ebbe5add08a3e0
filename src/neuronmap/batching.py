"""Batches of prompts sorted by token length, so a batch pads little."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def length_sorted_batches(token_lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices of prompts, batch by batch, longest first (an out-of-memory shows up at once)."""
    order = sorted(range(len(token_lengths)), key=lambda i: (-token_lengths[i], i))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def encode(tokenizer, texts: Sequence[str], device: torch.device, padding_side: str) -> dict[str, torch.Tensor]:
    tokenizer.padding_side = padding_side
    batch = tokenizer(list(texts), return_tensors="pt", padding=True)
    return {key: value.to(device) for key, value in batch.items() if key in ("input_ids", "attention_mask")}
