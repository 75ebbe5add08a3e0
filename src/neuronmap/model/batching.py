"""Batches of prompts sorted by token length, so a batch pads little, and the logits a batch may hold."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

# Bytes of float32 logits one forward pass may hold: bounds the memory of a perplexity pass
# (ablate/perplexity.py, labels/perplexity.py) whatever the number of configurations; the plan
# counts it (plan/estimate.py).
LOGIT_BUDGET = 512 * 2 ** 20


def length_sorted_batches(token_lengths: Sequence[int], batch_size: int,
                          batch_tokens: int | None = None) -> Iterator[list[int]]:
    """Indices of prompts, batch by batch, longest first (an out-of-memory shows up at once).
    A batch holds at most `batch_size` prompts and, with `batch_tokens`, at most that many
    padded tokens (rows x longest row)."""
    order = sorted(range(len(token_lengths)), key=lambda i: (-token_lengths[i], i))
    batch: list[int] = []
    for i in order:
        longest = token_lengths[batch[0]] if batch else token_lengths[i]
        if batch and (len(batch) >= batch_size or (batch_tokens and (len(batch) + 1) * longest > batch_tokens)):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def encode(tokenizer, texts: Sequence[str], device: torch.device, padding_side: str) -> dict[str, torch.Tensor]:
    tokenizer.padding_side = padding_side
    batch = tokenizer(list(texts), return_tensors="pt", padding=True)
    return {key: value.to(device) for key, value in batch.items() if key in ("input_ids", "attention_mask")}


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
