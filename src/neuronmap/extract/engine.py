"""The extract stage: one forward pass per batch with every site hooked, writing the pooled
responses of a shard's prompts and the per-token statistics of every unit."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
from tqdm import tqdm

from ..errors import NeuronmapError
from ..io import tables
from ..io.parquet import atomic_path, write_table
from ..io.responses import BackgroundWriter, ResponseWriter
from ..model.architectures import MlpSites
from ..model.batching import free_device_memory, is_out_of_memory, length_sorted_batches
from ..model.hooks import PinnedBuffers, SiteRecorder, TokenMask, runs_natively, to_device
from ..model.dispatch import input_device
from ..model.prefix_cache import (NO_PREFIX, SharedPrefixes, forward_prefixes, positions_of,
                                  split_prompts, with_cache)
from .neuron_stats import UnitStats, partial_table, top_table
from .settings import ExtractionSettings

log = logging.getLogger(__name__)

# fused_statistics: auto compiles the statistics kernel only for a shard with at least this many
# query tokens (measured in fuse_statistics' docstring).
FUSED_MIN_TOKENS = 4_000


def fuse_statistics(setting: bool | str, tokens: int, device: torch.device) -> bool:
    """Whether this shard's per-token statistics are fused. On the CPU, where the C kernel
    computes them (model/statistics_kernel.c, built once per machine), auto always fuses. On a
    GPU they are compiled per job, so auto fuses only a shard with enough tokens to repay it: on
    SmolLM2-135M with one CPU thread, compiling took 4.4 s per job with a warm compile cache
    (9 s cold), and the eager statistics cost 1.3 to 1.7 ms per token more than the compiled
    ones (1,078 and 10,880 tokens), so compiling pays from about 3,000 tokens; on a GPU eager
    statistics cost less per token, so it pays later still."""
    if setting == "auto":
        return tokens >= FUSED_MIN_TOKENS or runs_natively(device)
    return bool(setting)


def statistics_path(fused: bool, device: torch.device) -> str:
    if not fused:
        return "eager"
    return "C kernel" if runs_natively(device) else "compiled"


@dataclass(frozen=True)
class ExtractionOutputs:
    responses: Path
    stats: Path
    top: Path


def forward_without_logits(model, batch: dict[str, torch.Tensor], cache=None) -> None:
    # Only the MLP hooks matter; skipping the vocabulary projection saves a large matmul.
    if cache is None:
        model(**batch, use_cache=False, logits_to_keep=1)
    else:
        model(**batch, **with_cache(model, cache), logits_to_keep=1)


class Extraction:
    """Runs batches through the hooked model and streams what they show to the outputs.

    With `prefixes` (pool_span: query), the distinct prefixes of demonstrations are forwarded
    once and each prompt's query after its prefix's cached keys and values: only the queries'
    tokens reach the hooks, so responses are pooled over them and the per-token statistics
    count them alone. Without (pool_span: prompt), every token of every prompt is forwarded,
    pooled and counted."""

    def __init__(self, model, tokenizer, prompt_ids: list[str], texts: list[str], settings: ExtractionSettings,
                 prefixes: list[str] | None = None, background: bool | None = None):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.device = input_device(model)
        self.sites = MlpSites(model)
        store_dtype = torch.float16 if settings.response_dtype == "float16" else torch.float32
        self.prompt_ids, self.texts = prompt_ids, texts
        self.prompts = split_prompts(tokenizer, prefixes or [""] * len(texts), texts)
        tokens = sum(map(len, self.prompts.queries))
        fused = fuse_statistics(settings.fused_statistics, tokens, self.device)
        log.info("per-token statistics: %s (fused_statistics: %s, %d query tokens)",
                 statistics_path(fused, self.device), settings.fused_statistics, tokens)
        self.recorder = SiteRecorder(self.sites, settings.sites, settings.poolings, settings.active_threshold,
                                     fused, store_dtype)
        bos = tokenizer.bos_token_id
        # A leading BOS only reaches the hooks in a prompt without a prefix.
        self.exclude_first = (not settings.include_bos and bos is not None
                              and all(ids and ids[0] == bos for ids in map(self.prompts.tokens, range(len(texts)))))
        # One running block per run of layers (every layer of a site on one device): a batch
        # updates each with one set of calls.
        self.stats = {(run.site, run.first):
                      UnitStats(run.count, self.sites.width(run.site), settings.top_n, run.device)
                      for run in self.recorder.runs}
        # Responses are written by a thread (on CUDA by default), the device's copies of them
        # landing in pinned memory; the C kernel's kept host blocks are reused from batch to
        # batch, so they are written in the batch's own time.
        if background is None:
            background = self.device.type == "cuda"
        self.background = background and not any(run.native for run in self.recorder.runs)
        self.pinned = PinnedBuffers() if self.background else None
        self.tokens_forwarded = 0

    def run(self, outputs: ExtractionOutputs) -> None:
        prompts = self.prompts
        batches = list(length_sorted_batches([len(q) for q in prompts.queries], self.settings.batch_size,
                                             self.settings.batch_tokens))
        widths = {site: self.sites.width(site) for site in self.settings.sites}
        self.recorder.buffers.reserve(max(map(len, batches)))
        with torch.inference_mode():
            # Before the recorder is installed: prefixes are forwarded, not observed.
            shared = forward_prefixes(self.model, prompts.prefixes)
        self.tokens_forwarded = sum(map(len, prompts.prefixes))
        with atomic_path(outputs.responses) as tmp, self.recorder.installed(), torch.inference_mode():
            writer = ResponseWriter(tmp, widths, self.sites.n_layers, self.settings.poolings,
                                    self.settings.response_dtype)
            if self.background:
                writer = BackgroundWriter(writer)
            try:
                for batch in tqdm(batches, desc=f"extract {outputs.responses.name}", unit="batch", mininterval=5):
                    self._run_batch(batch, shared, writer)
            finally:
                writer.close()
            write_table(partial_table(self.stats), outputs.stats, tables.NEURON_STATS_PARTIAL)
            write_table(top_table(self.stats, self.prompt_ids, prompts.tokens, self._decode), outputs.top,
                        tables.TOP_ACTIVATIONS_PARTIAL)
        log.info("wrote responses of %d prompts in %d batches (%d distinct prefixes; %d tokens forwarded) to %s",
                 len(self.prompt_ids), len(batches), len(prompts.prefixes), self.tokens_forwarded,
                 outputs.responses)

    def _decode(self, token_ids: list[int]) -> list[str]:
        """Each token's own string, as `decode([token])` gives it: one batched call per shard."""
        return self.tokenizer.batch_decode([[token] for token in token_ids])

    def _run_batch(self, batch: list[int], shared: SharedPrefixes | None, writer) -> None:
        """Forward one batch; on a device out-of-memory, retry it in halves. Everything the host
        needs (lengths, token counts) it knows already; what the device needs goes there once."""
        prompts = self.prompts
        rows = [prompts.queries[i] for i in batch]
        encoded = pad_right(rows, self.device, self.tokenizer.pad_token_id)
        with_prefix = [prompts.prefix_of[i] != NO_PREFIX for i in batch]
        exclude_first = self.exclude_first and not any(with_prefix)
        lengths = [len(row) for row in rows]
        mask = TokenMask.from_lengths(lengths, max(lengths), exclude_first, self.device)
        self.recorder.start_batch(mask)
        try:
            cache = None
            if shared is not None and any(with_prefix):
                cache, prefix_mask = shared.rows(torch.as_tensor([max(prompts.prefix_of[i], 0) for i in batch]))
                prefix_mask = prefix_mask * to_device(torch.as_tensor(with_prefix), prefix_mask.device)[:, None]
                attention = torch.cat([prefix_mask, encoded["attention_mask"]], 1)
                encoded = {**encoded, "attention_mask": attention,
                           "position_ids": positions_of(attention)[:, shared.length:]}
            forward_without_logits(self.model, encoded, cache)
            observations = self.recorder.finish_batch()
        except RuntimeError as error:
            if not is_out_of_memory(error) or len(batch) == 1:
                raise
            del encoded
            self.recorder.start_batch(mask)  # drops what the failed batch held
            free_device_memory(self.device)
            log.warning("out of memory on a batch of %d prompts; retrying in halves", len(batch))
            half = len(batch) // 2
            self._run_batch(batch[:half], shared, writer)
            self._run_batch(batch[half:], shared, writer)
            return
        # Only now, with the whole forward done, does the batch count.
        self.tokens_forwarded += sum(lengths)
        # Peak positions count from the prompt's first token, not the query's.
        starts = torch.as_tensor([len(prompts.prefix_tokens(i)) for i in batch], dtype=torch.int32)[:, None]
        uploaded: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        for (site, first), seen in observations.items():
            device = seen.peaks.device
            if device not in uploaded:  # once per batch and device
                uploaded[device] = (to_device(torch.as_tensor(batch), device), to_device(starts, device))
            prompt_index, start = uploaded[device]
            seen.peak_positions += start
            self.stats[(site, first)].add(seen, mask.count, prompt_index)
        ids = [self.prompt_ids[i] for i in batch]
        n_tokens = [max(1, n - exclude_first) for n in lengths]  # as pooled: at least one token
        pooled = self.recorder.pooled_to_host(self.pinned)
        if self.background:
            writer.write_batch(ids, n_tokens, pooled.arrays, pooled.release)
        else:
            writer.write_batch(ids, n_tokens, pooled.arrays())


def pad_right(rows: list[list[int]], device: torch.device, pad_token_id: int | None) -> dict[str, torch.Tensor]:
    longest = max(len(row) for row in rows)
    pad = pad_token_id if pad_token_id is not None else 0
    # Built on the host from Python lists in one piece each, then sent to the device once.
    ids = torch.tensor([list(row) + [pad] * (longest - len(row)) for row in rows], dtype=torch.long)
    attention = (torch.arange(longest)[None] < torch.tensor([len(row) for row in rows])[:, None]).long()
    return {"input_ids": to_device(ids, device), "attention_mask": to_device(attention, device)}


def extract_shard(model, tokenizer, prompts: pl.DataFrame, outputs: ExtractionOutputs,
                  settings: ExtractionSettings) -> int:
    if prompts.height == 0:
        raise NeuronmapError(f"{outputs.responses}: no prompts in this shard")
    prefixes = prompts["prefix"].to_list() if settings.pool_span == "query" else None
    extraction = Extraction(model, tokenizer, prompts["prompt_id"].to_list(), prompts["text"].to_list(), settings,
                            prefixes)
    extraction.run(outputs)
    return extraction.tokens_forwarded
