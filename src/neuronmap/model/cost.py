"""What a model-running job cost: the tokens it forwarded and the seconds they took, and what a
bare forward pass over such tokens takes on the same machine (the calibration job), so that a
run's cost.parquet says where time goes and how far each stage is from the bare model."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl
import torch

from .batching import encode, length_sorted_batches
from .dispatch import input_device

# Prompts the calibration job forwards: enough for a steady rate, a few seconds on a CPU.
CALIBRATION_PROMPTS = 128


@dataclass
class ForwardCount:
    """Token positions forwarded through the model (padding included: it is computed too)."""
    tokens: int = 0
    forwards: int = 0
    seconds: float = 0.0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def counting_forwards(model):
    """Count every forward pass of `model` (through its input embedding) and time the block."""
    count = ForwardCount()

    def seen(module, args):
        count.tokens += args[0].numel()
        count.forwards += 1

    handle = model.get_input_embeddings().register_forward_pre_hook(seen)
    device = input_device(model)
    start = time.perf_counter()
    try:
        yield count
    finally:
        _synchronize(device)
        count.seconds = time.perf_counter() - start
        handle.remove()


def job_cost(stage: str, job: str, prompts: int, count: ForwardCount) -> pl.DataFrame:
    return pl.DataFrame({"stage": [stage], "job": [job], "prompts": [prompts], "tokens": [count.tokens],
                         "forwards": [count.forwards], "seconds": [count.seconds]},
                        schema={"stage": pl.String, "job": pl.String, "prompts": pl.Int64, "tokens": pl.Int64,
                                "forwards": pl.Int64, "seconds": pl.Float64})


def calibration(model, tokenizer, texts: Sequence[str], batch_size: int) -> pl.DataFrame:
    """A bare forward pass (no hook, no cache; the last position's logits, as extraction and
    generation need) over `texts`, batched as the stages batch; one batch first, untimed, so
    that one-off start-up costs do not count."""
    texts = list(texts)[:CALIBRATION_PROMPTS]
    device = input_device(model)
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    batches = [encode(tokenizer, [texts[j] for j in batch], device, padding_side="right")
               for batch in length_sorted_batches(lengths, batch_size)]
    with torch.inference_mode():
        model(**batches[0], use_cache=False, logits_to_keep=1)
        with counting_forwards(model) as count:
            for batch in batches:
                model(**batch, use_cache=False, logits_to_keep=1)
    return job_cost("bare", "calibrate", len(texts), count)


def cost_table(jobs: pl.DataFrame, calibration: pl.DataFrame) -> pl.DataFrame:
    """Per stage: jobs, prompts, tokens forwarded, seconds, tokens per second and per prompt,
    and how many times slower than the bare forward pass over the same tokens it ran."""
    bare = float(calibration["tokens"].sum() / calibration["seconds"].sum())
    return jobs.group_by("stage", maintain_order=True).agg(
        jobs=pl.len(), prompts=pl.col("prompts").sum(), tokens=pl.col("tokens").sum(),
        forwards=pl.col("forwards").sum(), seconds=pl.col("seconds").sum(),
    ).with_columns(
        tokens_per_prompt=pl.col("tokens") / pl.col("prompts"),
        tokens_per_s=pl.col("tokens") / pl.col("seconds"),
        bare_tokens_per_s=pl.lit(bare),
    ).with_columns(ratio_to_bare=pl.col("bare_tokens_per_s") / pl.col("tokens_per_s"))
