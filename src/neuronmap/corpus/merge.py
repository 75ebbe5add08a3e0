"""Merging the shards' partial records into the corpus records, one layer at a time (so the
merge holds one layer of every shard, never the model's): exact pairwise moments (Pebay),
summed histograms and counts, the global top and bottom contexts with a window of tokens around
each peak, and per unit the tokens that most often carry its peak."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from ..errors import NeuronmapError
from ..io import tables
from ..io.histogram import QUANTILES, from_runs, quantiles, to_lists
from ..io.parquet import open_parquet, read_row_group, write_row_groups
from .reductions import merge_moments

KEYS = ["site", "layer", "unit"]


def merge_partials(a: pl.DataFrame, b: pl.DataFrame) -> pl.DataFrame:
    """Two partial records of the same units (rows in the same order) as one; histograms aside."""
    moments = ("mean", "m2", "m3", "m4")
    mean, m2, m3, m4 = merge_moments(a["count"].to_numpy().astype(np.float64), [a[c].to_numpy() for c in moments],
                                     b["count"].to_numpy().astype(np.float64), [b[c].to_numpy() for c in moments])
    return a.with_columns(
        count=a["count"] + b["count"], mean=pl.Series(mean), m2=pl.Series(m2), m3=pl.Series(m3), m4=pl.Series(m4),
        min=pl.min_horizontal(a["min"], b["min"]), max=pl.max_horizontal(a["max"], b["max"]),
        n_positive=a["n_positive"] + b["n_positive"], n_active=a["n_active"] + b["n_active"])


def unit_records(partials: Sequence[pl.DataFrame]) -> pl.DataFrame:
    """tables.UNIT_RECORDS of one layer from every shard's partial records of it."""
    merged = partials[0].sort(KEYS)
    counts = from_runs(merged["hist_first"], merged["hist_run"])
    for other in partials[1:]:
        other = other.sort(KEYS)
        if not merged.select(KEYS).equals(other.select(KEYS)):
            raise NeuronmapError("the shards' partial records cover different units (made with other sites or "
                                 "another model?): rerun the corpus_records jobs")
        merged = merge_partials(merged, other)
        counts += from_runs(other["hist_first"], other["hist_run"])
    n = merged["count"].to_numpy().astype(np.float64)
    m2, m3, m4 = merged["m2"].to_numpy(), merged["m3"].to_numpy(), merged["m4"].to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        # Population (biased) moments, as scipy.stats.skew and kurtosis give by default; NaN for a constant unit.
        skewness = np.sqrt(n) * m3 / m2 ** 1.5
        kurtosis = n * m4 / (m2 * m2) - 3.0
        var = m2 / n
    bins, hist = to_lists(counts)
    q = quantiles(counts, merged["min"].to_numpy().astype(np.float64), merged["max"].to_numpy().astype(np.float64),
                  list(QUANTILES.values()))
    return merged.with_columns(
        var=pl.Series(var), skewness=pl.Series(np.where(m2 > 0, skewness, np.nan)),
        kurtosis=pl.Series(np.where(m2 > 0, kurtosis, np.nan)),
        frac_positive=pl.col("n_positive") / pl.col("count"), frac_active=pl.col("n_active") / pl.col("count"),
        **{name: pl.Series(q[:, i]) for i, name in enumerate(QUANTILES)},
        hist_bins=pl.from_arrow(bins), hist_counts=pl.from_arrow(hist),
    ).select(tables.UNIT_RECORDS.names)


def ranked_extremes(partials: Sequence[pl.DataFrame], kind: str, keep: int) -> pl.DataFrame:
    """The `keep` highest (top) or lowest (bottom) context peaks per unit; ties to the lower context id."""
    frame = pl.concat([p.filter(pl.col("kind") == kind) for p in partials])
    frame = frame.sort([*KEYS, "value", "context_id"], descending=[False, False, False, kind == "top", False])
    frame = frame.with_columns(rank=pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over(KEYS))
    return frame.filter(pl.col("rank") <= keep)


class ContextTokens:
    """Token ids of every context, flat, for lookups by (context, position)."""

    def __init__(self, contexts: pl.DataFrame):
        contexts = contexts.sort("context_id")
        if not np.array_equal(contexts["context_id"].to_numpy(), np.arange(contexts.height)):
            raise NeuronmapError("contexts: context ids must number the contexts 0, 1, ... (not written by "
                                 "neuronmap corpus-contexts?)")
        ids = contexts["token_ids"].to_arrow()
        ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
        self.offsets = np.asarray(ids.offsets, np.int64)
        self.flat = np.asarray(ids.flatten(), np.int64)
        self.document = contexts["document"].to_numpy()
        self.label = contexts["label"].to_numpy()

    def token_at(self, context: np.ndarray, position: np.ndarray) -> np.ndarray:
        return self.flat[self.offsets[context] + position]


def with_windows(examples: pl.DataFrame, tokens: ContextTokens, tokenizer, window: int) -> pl.DataFrame:
    """Examples with their peak token, `window` tokens of text either side, document and label."""
    context, position = examples["context_id"].to_numpy(), examples["position"].to_numpy()
    places = pl.DataFrame({"context_id": context, "position": position}).unique(maintain_order=True)
    starts, ends = tokens.offsets[places["context_id"].to_numpy()], tokens.offsets[places["context_id"].to_numpy() + 1]
    peaks = starts + places["position"].to_numpy()
    before = [tokens.flat[max(s, p - window):p].tolist() for s, p in zip(starts, peaks)]
    after = [tokens.flat[p + 1:min(e, p + 1 + window)].tolist() for e, p in zip(ends, peaks)]
    places = places.with_columns(
        token_id=pl.Series(tokens.flat[peaks].astype(np.int32)),
        token=pl.Series(tokenizer.batch_decode([[t] for t in tokens.flat[peaks].tolist()])),
        before=pl.Series(tokenizer.batch_decode(before)), after=pl.Series(tokenizer.batch_decode(after)))
    out = examples.join(places, on=["context_id", "position"], how="left")
    return out.with_columns(document=pl.Series(tokens.document[out["context_id"].to_numpy()]),
                            label=pl.Series(tokens.label[out["context_id"].to_numpy()]))


def peak_tokens(top: pl.DataFrame, tokens: ContextTokens, tokenizer, keep: int) -> pl.DataFrame:
    """Per unit the tokens that most often carry its peak among its top contexts (tables.PEAK_TOKENS)."""
    top = top.with_columns(token_id=pl.Series(tokens.token_at(top["context_id"].to_numpy(),
                                                              top["position"].to_numpy()).astype(np.int32)))
    counted = (top.group_by([*KEYS, "token_id"])
               .agg(contexts=pl.len().cast(pl.Int64), mean_value=pl.col("value").cast(pl.Float64).mean())
               .sort([*KEYS, "contexts", "mean_value", "token_id"], descending=[False, False, False, True, True, False])
               .with_columns(rank=pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over(KEYS))
               .filter(pl.col("rank") <= keep))
    vocabulary = counted["token_id"].unique().to_list()
    names = dict(zip(vocabulary, tokenizer.batch_decode([[t] for t in vocabulary])))
    return counted.with_columns(token=pl.col("token_id").replace_strict(names, return_dtype=pl.String))


def merge_records(unit_paths: Sequence[Path], extreme_paths: Sequence[Path], contexts: pl.DataFrame, tokenizer,
                  settings, outputs: dict[str, Path]) -> None:
    """Write units, examples and peak_tokens (one row group per layer each)."""
    layers = open_parquet(unit_paths[0]).num_row_groups
    for path in (*unit_paths, *extreme_paths):
        if open_parquet(path).num_row_groups != layers:
            raise NeuronmapError(f"{path}: holds a different number of layers than {unit_paths[0]} (made with "
                                 "another model?): rerun the corpus_records jobs")
    tokens = ContextTokens(contexts)

    def units():
        for layer in range(layers):
            yield unit_records([read_row_group(p, layer) for p in unit_paths]).to_arrow()

    peaks = []  # small (units x peak_tokens rows per layer): kept while the examples are written

    def examples():
        for layer in range(layers):
            partials = [read_row_group(p, layer) for p in extreme_paths]
            top = ranked_extremes(partials, "top", settings.peak_token_contexts)
            peaks.append(peak_tokens(top, tokens, tokenizer, settings.peak_tokens)
                         .select(tables.PEAK_TOKENS.names).to_arrow())
            chosen = pl.concat([top.filter(pl.col("rank") <= settings.examples),
                                ranked_extremes(partials, "bottom", settings.examples)])
            yield with_windows(chosen, tokens, tokenizer, settings.window).select(tables.UNIT_EXAMPLES.names).to_arrow()

    write_row_groups(units(), outputs["units"], tables.UNIT_RECORDS)
    write_row_groups(examples(), outputs["examples"], tables.UNIT_EXAMPLES)
    write_row_groups(peaks, outputs["peak_tokens"], tables.PEAK_TOKENS)
