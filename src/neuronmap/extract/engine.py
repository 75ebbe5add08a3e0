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
from ..io.responses import ResponseWriter
from ..model.architectures import MlpSites
from ..model.batching import encode, free_device_memory, is_out_of_memory, length_sorted_batches
from ..model.dispatch import input_device, site_device
from ..model.hooks import SiteRecorder, TokenMask
from .neuron_stats import UnitStats, partial_table, top_table
from .settings import ExtractionSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractionOutputs:
    responses: Path
    stats: Path
    top: Path


def forward_without_logits(model, batch: dict[str, torch.Tensor]) -> None:
    # Only the MLP hooks matter; skipping the vocabulary projection saves a large matmul.
    model(**batch, use_cache=False, logits_to_keep=1)


class Extraction:
    """Runs batches through the hooked model and streams what they show to the outputs."""

    def __init__(self, model, tokenizer, prompt_ids: list[str], texts: list[str], settings: ExtractionSettings):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.device = input_device(model)
        self.sites = MlpSites(model)
        store_dtype = torch.float16 if settings.response_dtype == "float16" else torch.float32
        self.recorder = SiteRecorder(self.sites, settings.sites, settings.poolings, settings.active_threshold,
                                     settings.fused_statistics, store_dtype)
        self.prompt_ids, self.texts = prompt_ids, texts
        self.token_ids = tokenizer(texts)["input_ids"]
        bos = tokenizer.bos_token_id
        self.exclude_first = (not settings.include_bos and bos is not None
                              and all(ids and ids[0] == bos for ids in self.token_ids))
        self.stats = {(site, layer): UnitStats(self.sites.width(site), settings.top_n,
                                               site_device(self.sites, site, layer))
                      for site in settings.sites for layer in range(self.sites.n_layers)}

    def run(self, outputs: ExtractionOutputs) -> None:
        lengths = [len(ids) for ids in self.token_ids]
        batches = list(length_sorted_batches(lengths, self.settings.batch_size, self.settings.batch_tokens))
        widths = {site: self.sites.width(site) for site in self.settings.sites}
        with atomic_path(outputs.responses) as tmp, self.recorder.installed(), torch.inference_mode():
            writer = ResponseWriter(tmp, widths, self.sites.n_layers, self.settings.poolings,
                                    self.settings.response_dtype)
            try:
                for batch in tqdm(batches, desc=f"extract {outputs.responses.name}", unit="batch", mininterval=5):
                    self._run_batch(batch, writer)
            finally:
                writer.close()
            write_table(partial_table(self.stats), outputs.stats, tables.NEURON_STATS_PARTIAL)
            write_table(top_table(self.stats, self.prompt_ids, self._tokens), outputs.top,
                        tables.TOP_ACTIVATIONS_PARTIAL)
        log.info("wrote responses of %d prompts in %d batches to %s", len(self.prompt_ids), len(batches),
                 outputs.responses)

    def _tokens(self, prompt_index: int) -> list[str]:
        return [self.tokenizer.decode([token]) for token in self.token_ids[prompt_index]]

    def _run_batch(self, batch: list[int], writer: ResponseWriter) -> None:
        """Forward one batch; on a device out-of-memory, retry it in halves."""
        encoded = encode(self.tokenizer, [self.texts[i] for i in batch], self.device, padding_side="right")
        mask = TokenMask.from_attention_mask(encoded["attention_mask"], self.exclude_first)
        self.recorder.start_batch(mask)
        try:
            forward_without_logits(self.model, encoded)
        except RuntimeError as error:
            if not is_out_of_memory(error) or len(batch) == 1:
                raise
            del encoded
            self.recorder.observations = {}
            free_device_memory(self.device)
            log.warning("out of memory on a batch of %d prompts; retrying in halves", len(batch))
            half = len(batch) // 2
            self._run_batch(batch[:half], writer)
            self._run_batch(batch[half:], writer)
            return
        # Only now, with the whole forward done, does the batch count.
        prompt_index = torch.as_tensor(batch, device=self.device)
        for key, seen in self.recorder.observations.items():
            self.stats[key].add(seen, mask.count, prompt_index)
        writer.write_batch([self.prompt_ids[i] for i in batch], [len(self.token_ids[i]) for i in batch],
                           self.recorder.pooled_to_host())


def extract_shard(model, tokenizer, prompts: pl.DataFrame, outputs: ExtractionOutputs,
                  settings: ExtractionSettings) -> int:
    if prompts.height == 0:
        raise NeuronmapError(f"{outputs.responses}: no prompts in this shard")
    Extraction(model, tokenizer, prompts["prompt_id"].to_list(), prompts["text"].to_list(), settings).run(outputs)
    return prompts.height
