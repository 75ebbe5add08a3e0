"""Greedy decoding after cached prefixes, the forward passes the baseline and ablate stages
run (ablate/evaluation.py adds the configurations around it) and the calibration repeats bare
(cost.py): one definition, so the floor forwards what the stages forward."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .dispatch import input_device
from .prefix_cache import SharedPrefixes, positions_of, returned_cache, with_cache


def configs_per_batch_for(setting: int | str, device: torch.device) -> int:
    """`ablation.configs_per_batch` on this device. On the CPU a forward pass of batch_size
    prompts is already compute-bound, and 12 x 16 rows ran 0.94x the speed of 12 forwards of
    16 (bench/ablate.py, 2 cores): there, one configuration per batch. A GPU is underused by
    16 prompts, so configurations share its batches."""
    if setting != "auto":
        return int(setting)
    return 1 if device.type == "cpu" else 12


def greedy(model, tokenizer, shared: SharedPrefixes | None, prefix_rows: torch.Tensor,
           queries: Sequence[Sequence[int]], max_new_tokens: int) -> list[str]:
    """Greedy decoding of each query after its cached prefix (row prefix_rows[i] of `shared`; a
    negative row: none), as `model.generate` does it: queries left-padded (the padding between
    prefix and query masked out), positions counted over the attended tokens, rows that
    produced an end-of-sequence token padded from then on."""
    device = input_device(model)
    longest, rows = max(len(q) for q in queries), len(queries)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((rows, longest), pad, dtype=torch.long)
    attention = torch.zeros((rows, longest), dtype=torch.long)
    for i, query in enumerate(queries):
        ids[i, longest - len(query):] = torch.as_tensor(list(query))
        attention[i, longest - len(query):] = 1
    ids, attention = ids.to(device), attention.to(device)
    cache = None
    if shared is not None and bool((prefix_rows >= 0).any()):
        cache, prefix_mask = shared.rows(prefix_rows.clamp(min=0))
        prefix_mask = prefix_mask * (prefix_rows >= 0).to(prefix_mask.device)[:, None]
        attention = torch.cat([prefix_mask, attention], 1)
    positions = positions_of(attention)[:, attention.shape[1] - longest:]
    eos = torch.as_tensor(end_of_sequence_ids(model, tokenizer), dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    generated = []
    for _ in range(max_new_tokens):
        output = model(input_ids=ids, attention_mask=attention, position_ids=positions, **with_cache(model, cache),
                       logits_to_keep=1)
        cache = returned_cache(model, output)
        token = output.logits[:, -1].float().argmax(-1)
        token = torch.where(finished, torch.full_like(token, pad), token)
        generated.append(token)
        finished |= torch.isin(token, eos)
        if bool(finished.all()):
            break
        ids, positions = token[:, None], positions[:, -1:] + 1
        attention = torch.cat([attention, attention.new_ones(rows, 1)], 1)
    return tokenizer.batch_decode(torch.stack(generated, 1).cpu(), skip_special_tokens=True)


def end_of_sequence_ids(model, tokenizer) -> list[int]:
    """The tokens that end generation: the model's generation config's, else the tokenizer's."""
    config = getattr(model, "generation_config", None)
    found = getattr(config, "eos_token_id", None) if config is not None else None
    if found is None:
        found = tokenizer.eos_token_id
    if found is None:
        return []
    return [found] if isinstance(found, int) else list(found)
