"""Factual recall: greedy generation on test prompts and the match rule.

`generate` runs one configuration (whatever hooks are installed) over the prompts;
`generate_sweep` runs many deactivation configurations at once: each forward batch is one
length-sorted batch of queries, repeated for a group of configurations, with a per-row unit
mask deciding which units each row has switched off. Both forward each shared prefix of
demonstrations once per configuration group and reuse its key/value cache (prefix_cache.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from ..model.architectures import MlpSites
from ..model.batching import length_sorted_batches
from ..model.deactivation import Deactivation, RowDeactivation
from ..model.dispatch import input_device
from ..model.generation import greedy
from ..model.prefix_cache import forward_prefixes, split_prompts
from .settings import EvaluationSettings


def answer_text(generated: str) -> str:
    # Few-shot demonstrations are one per line: the answer ends at the first line break.
    return generated.lstrip().split("\n", 1)[0].strip()


def is_correct(generated: str, objects: Sequence[str], match: str = "prefix", case_sensitive: bool = False) -> bool:
    """prefix: the answer is a non-empty prefix of a gold object or a gold object is a prefix of
    it (the reference study's rule). exact_start: the answer starts with a gold object."""
    answer = answer_text(generated)
    if not answer:
        return False
    if not case_sensitive:
        answer = answer.casefold()
    for gold in objects:
        gold = gold if case_sensitive else gold.casefold()
        if answer.startswith(gold) or (match == "prefix" and gold.startswith(answer)):
            return True
    return False


def generate(model, tokenizer, prefixes: Sequence[str], texts: Sequence[str], settings: EvaluationSettings,
             desc: str = "generate") -> list[str]:
    """Greedy continuations of every text (only the new tokens) under whatever hooks are installed."""
    return generate_sweep(model, tokenizer, prefixes, texts, [Deactivation.constant({})], settings, 1, desc)[0]


def generate_sweep(model, tokenizer, prefixes: Sequence[str], texts: Sequence[str], configs: Sequence[Deactivation],
                   settings: EvaluationSettings, configs_per_batch: int, desc: str = "sweep") -> list[list[str]]:
    """Greedy continuations of every text under every configuration: result[config][text].

    For each group of up to `configs_per_batch` configurations, every distinct prefix (the
    demonstrations) is forwarded once per configuration (deactivation applies to it as to
    everything else) and its key/value cache serves every batch of queries. A forward batch
    holds up to `settings.batch_size` queries repeated for each configuration of the group,
    configuration-major, whatever prefixes they follow.
    """
    if configs_per_batch < 1:
        raise ValueError("configs_per_batch must be at least 1")
    prompts = split_prompts(tokenizer, prefixes, texts)
    outputs: list[list[str | None]] = [[None] * len(texts) for _ in configs]
    batches = list(length_sorted_batches([len(q) for q in prompts.queries], settings.batch_size))
    config_groups = [list(range(start, min(len(configs), start + configs_per_batch)))
                     for start in range(0, len(configs), configs_per_batch)]
    n_prefixes = len(prompts.prefixes)
    masks = RowDeactivation(MlpSites(model), configs, input_device(model))
    total = len(batches) * len(config_groups)
    with masks.installed(), torch.inference_mode(), tqdm(total=total, desc=desc, unit="batch", mininterval=2) as progress:
        for config_group in config_groups:
            group = torch.tensor(config_group)
            masks.set_rows(group.repeat_interleave(n_prefixes))
            shared = forward_prefixes(model, prompts.prefixes, repeats=len(config_group))
            for batch in batches:
                # Row j * len(batch) + i is query batch[i] under config_group[j], after cached row
                # j * n_prefixes + (its prefix).
                masks.set_rows(group.repeat_interleave(len(batch)))
                prefix_rows = torch.as_tensor([prompts.prefix_of[i] for i in batch] * len(config_group))
                prefix_rows += torch.arange(len(config_group)).repeat_interleave(len(batch)) * n_prefixes
                answers = greedy(model, tokenizer, shared, prefix_rows, [prompts.queries[i] for i in batch] *
                                 len(config_group), settings.max_new_tokens)
                for j, config in enumerate(config_group):
                    for i, text in zip(batch, answers[j * len(batch):(j + 1) * len(batch)]):
                        outputs[config][i] = text
                progress.update()
    return outputs
