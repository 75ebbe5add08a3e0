"""Relations in other languages: identify units on one language's prompts, evaluate in others.

A translation of a relation is a relation file of the same name and format under
<dir>/<language>/ (data/languages/README.md). Its facts are split and prompted exactly like the
source relation's (same templates indices, few-shot count and split settings); only its test
prompts are kept, since units are identified in the source language alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from ..errors import NeuronmapError
from ..io import tables
from .prompts import relation_prompts
from .relations import load_relation
from .settings import PromptSettings

log = logging.getLogger(__name__)


def translation_files(directory: str | Path, languages: Sequence[str], relations: Sequence[str]) -> list[Path]:
    """The translated relation files that exist, language by language (a relation need not be
    translated into every language)."""
    directory = Path(directory)
    files = []
    for language in languages:
        folder = directory / language
        if not folder.is_dir():
            raise NeuronmapError(f"languages.evaluate: {language!r} has no folder {folder}")
        files.extend(folder / f"{name}.json" for name in relations if (folder / f"{name}.json").is_file())
    return files


def language_prompts(files: Sequence[str | Path], settings: PromptSettings) -> pl.DataFrame:
    """Test prompts of every translated relation, with a `language` column; prompt ids are
    prefixed with the language (`fr:country_capital_city/00003/t0`) so they never collide with
    the source language's."""
    frames = []
    for path in map(Path, files):
        language, name = path.parent.name, path.stem
        prompts = relation_prompts(load_relation(path, name), settings).filter(pl.col("split") == "test")
        frames.append(prompts.with_columns(prompt_id=pl.lit(f"{language}:") + pl.col("prompt_id"),
                                           language=pl.lit(language)))
        log.info("%s in %s: %d test prompts", name, language, prompts.height)
    if not frames:
        log.warning("no translated relation files: the translated test set is empty")
        return pl.from_arrow(tables.LANGUAGE_PROMPTS.empty_table())
    return pl.concat(frames, how="vertical_relaxed").select(tables.LANGUAGE_PROMPTS.names)
