"""Factual recall: greedy generation on test prompts and the match rule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .batching import encode, length_sorted_batches


@dataclass(frozen=True)
class EvaluationSettings:
    max_new_tokens: int = 2
    match: str = "prefix"
    case_sensitive: bool = False
    batch_size: int = 16


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
    device = next(model.parameters()).device
    lengths = [len(x) for x in tokenizer(list(texts))["input_ids"]]
    outputs: list[str | None] = [None] * len(texts)
    batches = list(length_sorted_batches(lengths, settings.batch_size))
    with torch.inference_mode():
        for batch in tqdm(batches, desc=desc, unit="batch", mininterval=2):
            encoded = encode(tokenizer, [texts[i] for i in batch], device, padding_side="left")
            generated = model.generate(**encoded, max_new_tokens=settings.max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None,
                                       top_k=None)
            new_tokens = generated[:, encoded["input_ids"].shape[1]:]
            for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                outputs[i] = text
    return outputs
