"""`neuronmap` subcommands of the prepare stage: the model, the prompts, the translated prompts."""

from __future__ import annotations

import json
import logging

from ..errors import NeuronmapError
from ..model.settings import ModelSource
from .settings import PrepareSettings, PromptSettings

log = logging.getLogger("neuronmap")

SETTINGS = {"prepare-model": ModelSource, "prepare": PrepareSettings, "prepare-languages": PromptSettings}


def cmd_prepare_model(args) -> None:
    """resolve the model; dequantize a GGUF file once"""
    from ..model.loading import prepare_model
    manifest = prepare_model(args.settings.model, args.out, args.settings.trust_remote_code)
    log.info("model ready: %s", json.dumps(manifest))


def args_prepare_model(p) -> None:
    p.add_argument("--out", required=True)


def cmd_prepare(args) -> None:
    """one relation file -> its prompts, split into identification and test sets"""
    from ..io import tables
    from ..io.parquet import write_table
    from .prompts import build_prompts
    from .relations import load_relation
    relation = load_relation(args.relation_file, args.relation)
    prompts = build_prompts([relation], args.settings.prompts, args.settings.shards)
    write_table(prompts, args.out, tables.PROMPTS)
    counts = prompts.group_by("relation", "split").len().sort("relation", "split")
    log.info("wrote %d prompts to %s\n%s", prompts.height, args.out, counts)


def args_prepare(p) -> None:
    p.add_argument("--relation", required=True)
    p.add_argument("--relation-file", required=True)
    p.add_argument("--out", required=True)


def cmd_merge_prompts(args) -> None:
    """per-relation prompts files -> one prompts.parquet"""
    import polars as pl

    from ..io import tables
    from ..io.parquet import read_table, write_table
    prompts = pl.concat([read_table(path) for path in args.inputs], how="vertical")
    repeated = prompts.filter(pl.col("prompt_id").is_duplicated())["prompt_id"].unique().sort()
    if repeated.len():
        raise NeuronmapError(f"{', '.join(args.inputs)}: prompt_id {repeated[0]!r} appears more than once")
    write_table(prompts, args.out, tables.PROMPTS)
    log.info("merged %d prompts of %d relations into %s", prompts.height, len(args.inputs), args.out)


def args_merge_prompts(p) -> None:
    p.add_argument("--inputs", nargs="+", required=True)
    p.add_argument("--out", required=True)


def cmd_prepare_languages(args) -> None:
    """translated relation files -> their test prompts"""
    from ..io import tables
    from ..io.parquet import write_table
    from .languages import language_prompts
    prompts = language_prompts(args.translations, args.settings)
    write_table(prompts, args.out, tables.LANGUAGE_PROMPTS)
    log.info("wrote %d translated test prompts to %s", prompts.height, args.out)


def args_prepare_languages(p) -> None:
    p.add_argument("--translations", nargs="*", default=[],
                   help="<dir>/<language>/<relation>.json files; none writes an empty table")
    p.add_argument("--out", required=True)
