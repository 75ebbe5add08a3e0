"""Contexts: each document tokenized and cut into pieces of at most `context_tokens` tokens.

A context never spans two documents (so never two labels). Contexts are numbered in corpus
order and keep their document's shard, so the records of a context do not depend on how many
shards a run has.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from ..io import tables
from .reading import Document


def cut_contexts(tokenizer, documents: list[Document], context_tokens: int, shards: int,
                 heldout_fraction: float) -> pl.DataFrame:
    """tables.CONTEXTS: one row per context, with its token ids; a held-out document's contexts
    (Document.heldout) are kept out of the records and scored by the perplexity check."""
    rows = {name: [] for name in tables.CONTEXTS.names}
    encoded = tokenizer([d.text for d in documents], add_special_tokens=True)["input_ids"]
    for document, ids in zip(documents, encoded):
        shard = document.shard(shards)
        heldout = document.heldout(heldout_fraction)
        for part, start in enumerate(range(0, len(ids), context_tokens)):
            piece = ids[start:start + context_tokens]
            rows["document"].append(document.document)
            rows["label"].append(document.label)
            rows["part"].append(part)
            rows["shard"].append(shard)
            rows["n_tokens"].append(len(piece))
            rows["token_ids"].append(np.asarray(piece, np.int32))
            rows["heldout"].append(heldout)
    rows["context_id"] = list(range(len(rows["document"])))
    return pl.from_arrow(pa.table(rows, schema=tables.CONTEXTS))
