"""What a model-running job cost: the tokens it forwarded and the seconds they took, and what a
bare forward pass over such tokens takes on the same machine (the calibration job), so that a
run's cost.parquet says where time goes and how far each stage is from the bare model.

The floor is like for like: the calibration forwards each stage's own regime (cached prefixes,
short query segments, the stage's batch shapes) with no hook, since a forward of ~11 query
tokens after a cached prefix costs far more per token than one over a whole prompt."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl
import torch

from .batching import encode, length_sorted_batches
from .dispatch import input_device
from .generation import configs_per_batch_for, greedy
from .prefix_cache import NO_PREFIX, forward_prefixes, positions_of, split_prompts, with_cache

# Prompts each regime of the calibration job forwards (at least: whole groups): enough for a
# steady rate, a few seconds on a CPU.
CALIBRATION_PROMPTS = 128
# The calibration regime whose rate is the floor of a stage without its own (corpus).
WHOLE = "whole"


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


def peak_rss_mib() -> float | None:
    """The process's high-water mark of resident memory so far, MiB. Snakemake's benchmark files
    sample memory every 30 s, so a job shorter than that reads as its loading; the kernel keeps
    the true peak. Linux: VmHWM of /proc/self/status, which starts afresh at exec (getrusage's
    ru_maxrss does not: it carries the parent's over fork and exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def job_cost(stage: str, job: str, prompts: int, count: ForwardCount) -> pl.DataFrame:
    """One job's row, made when its model work is done (so the peak memory is the job's)."""
    return pl.DataFrame({"stage": [stage], "job": [job], "prompts": [prompts], "tokens": [count.tokens],
                         "forwards": [count.forwards], "seconds": [count.seconds], "peak_rss_mib": [peak_rss_mib()]},
                        schema={"stage": pl.String, "job": pl.String, "prompts": pl.Int64, "tokens": pl.Int64,
                                "forwards": pl.Int64, "seconds": pl.Float64, "peak_rss_mib": pl.Float64})


def _timed(model, run) -> ForwardCount:
    with counting_forwards(model) as count:
        run()
    return count


def _sample_groups(keys: Sequence, limit: int) -> list[int]:
    """Indices of whole groups of equal keys, in order of first appearance, until at least
    `limit` indices: a group is what a stage's job forwards together (a shard's prompts, a
    prefix's queries), so the sample keeps the job's mix of prefix and query tokens."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    chosen: list[int] = []
    for members in groups.values():
        if len(chosen) >= limit:
            break
        chosen += members
    return chosen


def whole_prompts(model, tokenizer, texts: Sequence[str], batch_size: int, batch_tokens: int | None) -> ForwardCount:
    """Whole prompts, no cache, right-padded, length-sorted batches (extraction's regime with
    pool_span: prompt; without `batch_tokens`, the floor of a stage without its own: corpus,
    whose contexts are whole texts)."""
    device = input_device(model)
    lengths = [len(ids) for ids in tokenizer(list(texts))["input_ids"]]
    batches = [encode(tokenizer, [texts[j] for j in batch], device, padding_side="right")
               for batch in length_sorted_batches(lengths, batch_size, batch_tokens)]
    return _timed(model, lambda: [model(**batch, use_cache=False, logits_to_keep=1) for batch in batches])


def _pad_right(rows: Sequence[Sequence[int]], device, pad: int) -> dict[str, torch.Tensor]:
    longest = max(len(row) for row in rows)
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.as_tensor(row)
        attention[i, :len(row)] = 1
    return {"input_ids": ids.to(device), "attention_mask": attention.to(device)}


def cached_queries(model, tokenizer, prefixes: Sequence[str], texts: Sequence[str], batch_size: int,
                   batch_tokens: int | None) -> ForwardCount:
    """The extract stage's forward passes, bare: each distinct prefix once (left-padded, one
    forward), then length-sorted batches of right-padded queries after their prefixes' cached
    keys and values (extract/engine.py's `_run_batch`, without its hooks)."""
    device = input_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = split_prompts(tokenizer, prefixes, texts)
    batches = list(length_sorted_batches([len(q) for q in prompts.queries], batch_size, batch_tokens))

    def run():
        shared = forward_prefixes(model, prompts.prefixes)
        for batch in batches:
            encoded = _pad_right([prompts.queries[i] for i in batch], device, pad)
            with_prefix = [prompts.prefix_of[i] != NO_PREFIX for i in batch]
            if shared is None or not any(with_prefix):
                model(**encoded, use_cache=False, logits_to_keep=1)
                continue
            cache, prefix_mask = shared.rows(torch.as_tensor([max(prompts.prefix_of[i], 0) for i in batch]))
            prefix_mask = prefix_mask * torch.as_tensor(with_prefix, device=prefix_mask.device)[:, None]
            attention = torch.cat([prefix_mask, encoded["attention_mask"]], 1)
            model(input_ids=encoded["input_ids"], attention_mask=attention,
                  position_ids=positions_of(attention)[:, shared.length:], **with_cache(model, cache),
                  logits_to_keep=1)
    return _timed(model, run)


def cached_generation(model, tokenizer, prefixes: Sequence[str], texts: Sequence[str], batch_size: int,
                      max_new_tokens: int, repeats: int) -> ForwardCount:
    """The baseline and ablate stages' forward passes, bare: every distinct prefix `repeats`
    times (one per configuration of a group), then each length-sorted batch of queries repeated
    `repeats` times and decoded greedily after its cached prefixes (ablate/evaluation.py's
    `generate_sweep` for one group of `repeats` configurations, without the deactivation
    hooks), through the same `greedy`."""
    prompts = split_prompts(tokenizer, prefixes, texts)
    batches = list(length_sorted_batches([len(q) for q in prompts.queries], batch_size))
    n_prefixes = len(prompts.prefixes)

    def run():
        shared = forward_prefixes(model, prompts.prefixes, repeats=repeats)
        for batch in batches:
            prefix_rows = torch.as_tensor([prompts.prefix_of[i] for i in batch] * repeats)
            prefix_rows += torch.arange(repeats).repeat_interleave(len(batch)) * n_prefixes
            greedy(model, tokenizer, shared, prefix_rows, [prompts.queries[i] for i in batch] * repeats,
                   max_new_tokens)
    return _timed(model, run)


def calibration(model, tokenizer, prompts: pl.DataFrame, settings) -> pl.DataFrame:
    """The floor of each stage: its forward passes with no hook, on a sample of the run's
    prompts (whole groups, see `_sample_groups`), one row per regime (`job`):
    - extract: identification prompts, whole (relation, shard) jobs, as cached_queries (or
      as whole_prompts with pool_span: prompt, as the stage then runs);
    - baseline: test prompts, whole prefix groups, as cached_generation with one repeat;
    - ablate: the same with ablation.configs_per_batch repeats (on this device); the same
      measurement as baseline where that is 1;
    - whole: whole prompts, no cache (the floor of stages without their own: corpus).
    One batch first, untimed, so that one-off start-up costs do not count."""
    prompts = prompts.sort("prompt_id")
    ident = prompts.filter(pl.col("split") == "identification")
    test = prompts.filter(pl.col("split") == "test")
    ident = ident[_sample_groups(list(zip(ident["relation"], ident["shard"])), CALIBRATION_PROMPTS)]
    test = test[_sample_groups(test["prefix"].to_list(), CALIBRATION_PROMPTS)]
    whole = prompts["text"].to_list()[:CALIBRATION_PROMPTS]
    repeats = configs_per_batch_for(settings.configs_per_batch, input_device(model))
    rows = []
    with torch.inference_mode():
        model(**encode(tokenizer, whole[:settings.batch_size], input_device(model), padding_side="right"),
              use_cache=False, logits_to_keep=1)
        if ident.height:
            if settings.pool_span == "query":
                # One (relation, shard) job at a time: its prefixes, then its queries.
                count = sum_counts([cached_queries(model, tokenizer, job["prefix"].to_list(), job["text"].to_list(),
                                                   settings.batch_size, settings.batch_tokens)
                                    for job in ident.partition_by("relation", "shard", maintain_order=True)])
            else:
                count = whole_prompts(model, tokenizer, ident["text"].to_list(), settings.batch_size,
                                      settings.batch_tokens)
            rows.append(job_cost("bare", "extract", ident.height, count))
        if test.height:
            def evaluation(n):
                return cached_generation(model, tokenizer, test["prefix"].to_list(), test["text"].to_list(),
                                         settings.batch_size, settings.max_new_tokens, n)
            baseline = evaluation(1)
            rows.append(job_cost("bare", "baseline", test.height, baseline))
            ablate = baseline if repeats == 1 else evaluation(repeats)
            rows.append(job_cost("bare", "ablate", test.height * repeats, ablate))
        whole_count = whole_prompts(model, tokenizer, whole, settings.batch_size, None)
        rows.append(job_cost("bare", WHOLE, len(whole), whole_count))
    return pl.concat(rows)


def sum_counts(counts: Sequence[ForwardCount]) -> ForwardCount:
    return ForwardCount(sum(c.tokens for c in counts), sum(c.forwards for c in counts),
                        sum(c.seconds for c in counts))


def cost_table(jobs: pl.DataFrame, calibration: pl.DataFrame) -> pl.DataFrame:
    """Per stage: jobs, prompts, tokens forwarded, seconds, tokens per second and per prompt,
    and how many times slower than its floor it ran: the calibration's bare forward passes of
    the same regime (the row whose `job` is the stage), else of whole prompts. A calibration
    file of one row (before regimes: job `calibrate`) is every stage's floor."""
    rates = {job: tokens / seconds for job, tokens, seconds in
             calibration.select("job", "tokens", "seconds").iter_rows()}
    fallback = WHOLE if WHOLE in rates else calibration["job"][0]
    if "peak_rss_mib" not in jobs.columns:  # job files of an older run
        jobs = jobs.with_columns(peak_rss_mib=pl.lit(None, pl.Float64))
    stages = jobs.group_by("stage", maintain_order=True).agg(
        jobs=pl.len(), prompts=pl.col("prompts").sum(), tokens=pl.col("tokens").sum(),
        forwards=pl.col("forwards").sum(), seconds=pl.col("seconds").sum(), peak_rss_mib=pl.col("peak_rss_mib").max())
    floors = [stage if stage in rates else fallback for stage in stages["stage"]]
    return stages.with_columns(
        tokens_per_prompt=pl.col("tokens") / pl.col("prompts"),
        tokens_per_s=pl.col("tokens") / pl.col("seconds"),
        floor=pl.Series(floors, dtype=pl.String),
        bare_tokens_per_s=pl.Series([rates[f] for f in floors], dtype=pl.Float64),
    ).with_columns(ratio_to_bare=pl.col("bare_tokens_per_s") / pl.col("tokens_per_s")
                   ).select(pl.exclude("peak_rss_mib"), "peak_rss_mib")
