"""Translated relation files and the prompts evaluated in other languages."""

import json

import polars as pl
import pytest

from neuronmap.errors import NeuronmapError
from neuronmap.prepare.languages import language_prompts, translation_files
from neuronmap.prepare.settings import PromptSettings
from neuronmap.prepare.relations import find_relation_file, load_relation

from conftest import REPO

LANGUAGES = REPO / "data" / "languages"


def translations():
    return sorted(LANGUAGES.glob("*/*.json"))


def test_shipped_translations_parse_and_mirror_their_source():
    assert {p.parent.name for p in translations()} >= {"de", "es", "fr"}
    for path in translations():
        relation = load_relation(path)
        source = load_relation(find_relation_file(REPO / "data" / "relations", path.stem))
        # Same template indices as the source, so `templates` in the config means the same thing.
        assert len(relation.templates) == len(source.templates), path
        assert len(relation.facts) == len(source.facts), path  # one translated fact per source fact
        assert json.loads(path.read_text())["properties"]["language"] == path.parent.name


def test_language_prompts_are_test_prompts_with_prefixed_ids():
    settings = PromptSettings.defaults(templates=(0,), few_shot=3, test_facts=50, max_test_fraction=0.5, seed=0)
    files = translation_files(LANGUAGES, ["fr", "de"], ["country_capital_city", "verb_past_tense"])
    prompts = language_prompts(files, settings)
    assert set(prompts["language"]) == {"fr", "de"} and set(prompts["relation"]) == {"country_capital_city"}
    assert (prompts["split"] == "test").all() and prompts["prompt_id"].is_unique().all()
    fr = prompts.filter(pl.col("language") == "fr")
    assert fr.height == 12  # half of the 24 facts, as for the English file
    assert all(pid.startswith("fr:country_capital_city/") for pid in fr["prompt_id"])
    for text, subject in zip(fr["text"], fr["subject"]):
        lines = text.split("\n")
        assert len(lines) == 4 and lines[-1] == f"La capitale {subject} est"


def test_missing_language_folder_is_named(tmp_path):
    with pytest.raises(NeuronmapError, match="languages.evaluate: 'xx' has no folder"):
        translation_files(tmp_path, ["xx"], ["country_capital_city"])
