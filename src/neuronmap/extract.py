"""The extract stage: pooled responses of every unit at every selected site to a shard's prompts."""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl
import torch
from tqdm import tqdm

from .architectures import MlpSites
from .batching import encode, length_sorted_batches
from .errors import NeuronmapError
from .hooks import PooledResponses
from .parquet_io import atomic_path
from .responses import ResponseWriter

log = logging.getLogger(__name__)


def forward_without_logits(model, batch: dict[str, torch.Tensor]) -> None:
    # Only the MLP hooks matter; skipping the vocabulary projection saves a large matmul.
    model(**batch, use_cache=False, logits_to_keep=1)


def extract_responses(model, tokenizer, prompts: pl.DataFrame, out_path: str | Path, *, sites, pooling: str,
                      batch_size: int, dtype: str = "float16") -> int:
    """Write the pooled responses of `prompts` (prompt_id, text) to `out_path`; return the prompt count."""
    if prompts.height == 0:
        raise NeuronmapError(f"{out_path}: no prompts in this shard")
    mlp_sites = MlpSites(model)
    device = next(model.parameters()).device
    texts = prompts["text"].to_list()
    ids = prompts["prompt_id"].to_list()
    lengths = [len(x) for x in tokenizer(texts)["input_ids"]]
    reader = PooledResponses(mlp_sites, sites, pooling)
    with atomic_path(out_path) as tmp, reader.installed(), torch.inference_mode():
        writer = ResponseWriter(tmp, dtype)
        try:
            batches = list(length_sorted_batches(lengths, batch_size))
            for batch in tqdm(batches, desc=f"extract {Path(out_path).name}", unit="batch", mininterval=2):
                encoded = encode(tokenizer, [texts[i] for i in batch], device, padding_side="right")
                reader.start_batch(encoded["attention_mask"])
                forward_without_logits(model, encoded)
                writer.write_batch([ids[i] for i in batch], [lengths[i] for i in batch], reader.to_host())
        finally:
            writer.close()
    log.info("wrote responses of %d prompts to %s", len(ids), out_path)
    return len(ids)
