"""Factual recall: greedy generation on test prompts and the match rule.

`generate` runs one configuration (whatever hooks are installed) over the prompts;
`generate_sweep` runs many deactivation configurations at once: each forward batch is one
length-sorted batch of prompts, tokenized once and repeated for a group of configurations, with
a per-row unit mask deciding which units each row has switched off.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from ..model.architectures import MlpSites
from ..model.batching import encode, length_sorted_batches
from ..model.dispatch import input_device
from ..model.deactivation import Deactivation, RowDeactivation
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


def generate(model, tokenizer, texts: Sequence[str], settings: EvaluationSettings, desc: str = "generate") -> list[str]:
    """Greedy continuations of every text (only the new tokens), batched by length."""
    device = input_device(model)
    lengths = [len(x) for x in tokenizer(list(texts))["input_ids"]]
    outputs: list[str | None] = [None] * len(texts)
    batches = list(length_sorted_batches(lengths, settings.batch_size))
    with torch.inference_mode():
        for batch in tqdm(batches, desc=desc, unit="batch", mininterval=2):
            encoded = encode(tokenizer, [texts[i] for i in batch], device, padding_side="left")
            for i, text in zip(batch, _greedy(model, tokenizer, encoded, settings)):
                outputs[i] = text
    return outputs


def _greedy(model, tokenizer, encoded: dict[str, torch.Tensor], settings: EvaluationSettings) -> list[str]:
    generated = model.generate(**encoded, max_new_tokens=settings.max_new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
    return tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def generate_sweep(model, tokenizer, texts: Sequence[str], configs: Sequence[Deactivation],
                   settings: EvaluationSettings, configs_per_batch: int, desc: str = "sweep") -> list[list[str]]:
    """Greedy continuations of every text under every configuration: result[config][text].

    Each batch of `settings.batch_size` prompts (the same batches `generate` makes) is tokenized
    once and repeated for up to `configs_per_batch` configurations, so a forward pass holds
    batch_size x configs_per_batch rows and the model is loaded once for the whole sweep.
    """
    if configs_per_batch < 1:
        raise ValueError("configs_per_batch must be at least 1")
    device = input_device(model)
    lengths = [len(x) for x in tokenizer(list(texts))["input_ids"]]
    outputs: list[list[str | None]] = [[None] * len(texts) for _ in configs]
    batches = list(length_sorted_batches(lengths, settings.batch_size))
    groups = [list(range(start, min(len(configs), start + configs_per_batch)))
              for start in range(0, len(configs), configs_per_batch)]
    masks = RowDeactivation(MlpSites(model), configs, device)
    with masks.installed(), torch.inference_mode(), \
            tqdm(total=len(batches) * len(groups), desc=desc, unit="batch", mininterval=2) as progress:
        for batch in batches:
            encoded = encode(tokenizer, [texts[i] for i in batch], device, padding_side="left")
            for group in groups:
                # Rows are configuration-major: row j * len(batch) + i is prompt batch[i] under group[j].
                masks.set_rows(torch.tensor(group).repeat_interleave(len(batch)))
                repeated = {key: value.repeat(len(group), 1) for key, value in encoded.items()}
                answers = _greedy(model, tokenizer, repeated, settings)
                for j, config in enumerate(group):
                    for i, text in zip(batch, answers[j * len(batch):(j + 1) * len(batch)]):
                        outputs[config][i] = text
                progress.update()
    return outputs
