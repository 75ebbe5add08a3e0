"""The neuron atlas: the top units of every relation with everything known about each, as the
compact column-oriented JSON that the report's script turns into a searchable table and cards.

Only the top `units_per_relation` units of each relation are embedded (their union), so the
report stays small for models of any size; every per-unit file is read with a semi-join on
those units, so memory follows the atlas, not the model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import polars as pl

from ..errors import NeuronmapError

log = logging.getLogger(__name__)

KEY = ["site", "layer", "unit"]
EXPERTISE_COLUMNS = ["ap", "rank", "on_p50", "on_p90", "off_mean"]
STATS_COLUMNS = ["count", "mean", "var", "min", "max", "frac_positive"]
OPTIONAL_STATS_COLUMNS = ["frac_active"]
TOP_ACTIVATION_COLUMNS = ["site", "layer", "unit", "rank", "prompt_id", "position", "token", "value"]
# Columns of a decoded-token table that say what a token is, not which decoding it belongs to.
DECODED_VALUE_COLUMNS = {"token", "tokens", "rank", "score", "scores", "logit", "logits", "value", "values",
                         "token_id", "token_ids", "probability"}


def scan(path: str | Path, columns: list[str] | None = None) -> pl.LazyFrame:
    """A lazy reader that names the file when it is missing or lacks a column."""
    path = Path(path)
    if not path.exists():
        raise NeuronmapError(f"{path}: file not found")
    frame = pl.scan_parquet(path)
    if columns is not None:
        present = frame.collect_schema().names()
        missing = [c for c in columns if c not in present]
        if missing:
            raise NeuronmapError(f"{path}: column(s) {missing} missing (has {present})")
        frame = frame.select(columns)
    return frame


def collect(frame: pl.LazyFrame, path: str | Path) -> pl.DataFrame:
    try:
        return frame.collect()
    except (pl.exceptions.ComputeError, OSError) as exc:
        raise NeuronmapError(f"{path}: not a readable Parquet file (corrupt or truncated?): {exc}") from None


def atlas_units(expertise: Mapping[str, Path], units_per_relation: int) -> pl.DataFrame:
    """The union of every relation's top units, with each relation's AP, rank and responses.

    Columns: site, layer, unit, then <column>:<relation> for each expertise column, and
    best_relation / best_rank (the relation where the unit ranks highest).
    """
    chosen = pl.concat([
        collect(scan(path, KEY + ["rank"]).filter(pl.col("rank") <= units_per_relation).select(KEY), path)
        for path in expertise.values()
    ]).unique().sort(KEY)
    atlas = chosen
    for relation, path in expertise.items():
        rows = collect(scan(path, KEY + EXPERTISE_COLUMNS).join(chosen.lazy(), on=KEY, how="semi"), path)
        atlas = atlas.join(rows.rename({c: f"{c}:{relation}" for c in EXPERTISE_COLUMNS}), on=KEY, how="left")
    relations = list(expertise)
    ranks = pl.concat_list([pl.col(f"rank:{r}") for r in relations])
    best = ranks.list.arg_min()
    return atlas.with_columns(
        best_rank=ranks.list.min(),
        best_relation=pl.lit(relations).list.get(best),
    ).sort("best_rank", *KEY)


def _clean(token: str) -> str:
    # Byte-level BPE and SentencePiece spell a leading space as Ġ or ▁.
    return token.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n").strip()


def peak_span(text: str, offsets: list[tuple[int, int]], position: int, token: str) -> tuple[int, int]:
    """Characters [start, end) of the token at `position` of the tokenized prompt, or (-1, -1)
    when the stored token does not match the text there (then the card shows it unmarked)."""
    if 0 <= position < len(offsets):
        start, end = offsets[position]
        if end > start and _clean(text[start:end]) == _clean(token):
            return start, end
        if end > start and _clean(token) and _clean(token) in text[start:end]:
            return start, end
    return -1, -1


def top_prompts(top: pl.DataFrame, prompts: pl.DataFrame, tokenizer) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The top-activating rows with each prompt's text and the peak token's character span.

    Returns (rows with prompt_index, start, end; the prompts they use)."""
    used = prompts.join(top.select("prompt_id").unique(), on="prompt_id", how="semi") \
        .select("prompt_id", "relation", "text").sort("prompt_id").with_row_index("prompt_index")
    missing = top.join(used, on="prompt_id", how="anti")
    if missing.height:
        raise NeuronmapError(f"top_activations: prompt_id {missing['prompt_id'][0]!r} is not in prompts.parquet")
    offsets = {}
    if tokenizer is not None:
        encoded = tokenizer(used["text"].to_list(), return_offsets_mapping=True)
        offsets = dict(zip(used["prompt_id"].to_list(), encoded["offset_mapping"]))
    rows = top.join(used, on="prompt_id", how="left")
    spans = [peak_span(text, offsets.get(pid, []), position, token)
             for pid, text, position, token in rows.select("prompt_id", "text", "position", "token").iter_rows()]
    rows = rows.with_columns(start=pl.Series([s for s, _ in spans], dtype=pl.Int64),
                             end=pl.Series([e for _, e in spans], dtype=pl.Int64))
    return rows, used


def decoded_tokens(decoded: pl.DataFrame, n: int) -> pl.DataFrame:
    """site, layer, unit, variant, tokens (top n) from a decoded-token table in long form (one row
    per token, ordered by `rank` or by descending `score`) or with a list column `tokens`.
    Every other column (e.g. direction, final-norm gain) names the decoding, as `variant`."""
    for column in KEY:
        if column not in decoded.columns:
            raise NeuronmapError(f"decoded table: column {column!r} missing (has {decoded.columns})")
    variants = [c for c in decoded.columns if c not in KEY and c not in DECODED_VALUE_COLUMNS]
    variant = (pl.concat_str([pl.lit(f"{c}=") + pl.col(c).cast(pl.String) for c in variants], separator=", ")
               if variants else pl.lit(""))
    frame = decoded.with_columns(variant=variant)
    if "tokens" in frame.columns:
        return frame.select(*KEY, "variant", pl.col("tokens").list.head(n))
    if "token" not in frame.columns:
        raise NeuronmapError(f"decoded table: needs a token or tokens column (has {decoded.columns})")
    if "rank" in frame.columns:
        frame = frame.sort("rank")
    elif "score" in frame.columns:
        frame = frame.sort("score", descending=True)
    return frame.group_by(*KEY, "variant", maintain_order=True).agg(pl.col("token").head(n).alias("tokens"))


def _round(values: list, digits: int = 4) -> list:
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            out.append(None)
        elif isinstance(v, float):
            out.append(float(f"{v:.{digits}g}"))
        else:
            out.append(v)
    return out


def build_atlas(*, expertise: Mapping[str, Path], prompts: pl.DataFrame, units_per_relation: int,
                prompts_per_unit: int, neuron_stats: Path | None = None, top_activations: Path | None = None,
                decoded: Path | None = None, tokenizer=None, decoded_per_unit: int = 8) -> dict:
    """The atlas payload (plain JSON types). Absent inputs leave their field null, and the page
    says "not recorded" there (the report always has all three)."""
    units = atlas_units(expertise, units_per_relation)
    keys = units.select(KEY)
    relations = list(expertise)
    payload: dict = {
        "relations": relations,
        "units_per_relation": units_per_relation,
        "site": units["site"].to_list(), "layer": units["layer"].to_list(), "unit": units["unit"].to_list(),
        "best_relation": units["best_relation"].to_list(), "best_rank": units["best_rank"].to_list(),
        "expertise": {column: {r: _round(units[f"{column}:{r}"].to_list()) for r in relations}
                      for column in EXPERTISE_COLUMNS},
        "stats": None, "decoded": None, "top": None, "prompts": None,
    }
    if neuron_stats is not None:
        optional = [c for c in OPTIONAL_STATS_COLUMNS if c in scan(neuron_stats).collect_schema().names()]
        stats = collect(scan(neuron_stats, KEY + STATS_COLUMNS + optional).join(keys.lazy(), on=KEY, how="semi"),
                        neuron_stats)
        stats = keys.join(stats.with_columns(sd=pl.col("var").sqrt()), on=KEY, how="left", maintain_order="left")
        payload["stats"] = {c: _round(stats[c].cast(pl.Float64).to_list())
                            for c in ["mean", "sd", "min", "max", "frac_positive", *optional]}
        payload["stats"]["count"] = stats["count"].to_list()
    if decoded is not None:
        table = collect(scan(decoded).join(keys.lazy(), on=KEY, how="semi"), decoded)
        tokens = decoded_tokens(table, decoded_per_unit)
        index = {key: i for i, key in enumerate(keys.iter_rows())}
        variants = sorted(tokens["variant"].unique().to_list())
        per_variant = {v: [[] for _ in range(keys.height)] for v in variants}
        for site, layer, unit, variant, toks in tokens.iter_rows():
            per_variant[variant][index[(site, layer, unit)]] = [t for t in toks if t is not None]
        payload["decoded"] = {"variants": variants, "tokens": per_variant}
    if top_activations is not None:
        top = collect(scan(top_activations, TOP_ACTIVATION_COLUMNS).filter(pl.col("rank") <= prompts_per_unit)
                      .join(keys.lazy(), on=KEY, how="semi"), top_activations)
        rows, used = top_prompts(top, prompts, tokenizer)
        index = {key: i for i, key in enumerate(keys.iter_rows())}
        per_unit: list[list] = [[] for _ in range(keys.height)]
        for site, layer, unit, _rank, prompt_index, position, token, value, start, end in rows.sort(
                *KEY, "rank").select(*KEY, "rank", "prompt_index", "position", "token", "value", "start", "end") \
                .iter_rows():
            per_unit[index[(site, layer, unit)]].append(
                [prompt_index, position, token, _round([float(value)])[0], start, end])
        payload["top"] = per_unit
        payload["prompts"] = {"id": used["prompt_id"].to_list(), "relation": used["relation"].to_list(),
                              "text": used["text"].to_list()}
    log.info("atlas: %d units (top %d of %d relations)", keys.height, units_per_relation, len(relations))
    return payload
