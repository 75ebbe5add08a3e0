import json

import polars as pl
import pytest

from neuronmap.errors import NeuronmapError
from neuronmap.prepare.prompts import build_prompts
from neuronmap.prepare.settings import PromptSettings
from neuronmap.prepare.relations import find_relation_file, load_relation

from conftest import RELATIONS

SOME = ["country_capital_city", "landmark_in_country", "person_occupation", "verb_past_tense"]


def load(name):
    return load_relation(find_relation_file(RELATIONS, name), name)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_subject_in_both_splits(seed):
    prompts = build_prompts([load(n) for n in SOME],
                            PromptSettings.defaults(few_shot=3, test_facts=50, seed=seed), shards=3)
    for relation, group in prompts.group_by("relation"):
        identification = set(group.filter(pl.col("split") == "identification")["subject"])
        test = set(group.filter(pl.col("split") == "test")["subject"])
        assert identification and test
        assert not identification & test, relation


def test_deterministic_and_independent_of_other_relations():
    settings = PromptSettings.defaults(few_shot=3, test_facts=20, seed=5)
    alone = build_prompts([load("verb_past_tense")], settings)
    together = build_prompts([load("country_capital_city"), load("verb_past_tense")], settings)
    assert alone.equals(build_prompts([load("verb_past_tense")], settings))
    assert alone.equals(together.filter(pl.col("relation") == "verb_past_tense"))


def test_demonstrations_come_from_identification_never_the_asked_fact():
    relation = load("country_capital_city")
    prompts = build_prompts([relation], PromptSettings.defaults(few_shot=3, test_facts=8, seed=0))
    identification_subjects = set(prompts.filter(pl.col("split") == "identification")["subject"])
    for row in prompts.iter_rows(named=True):
        template = relation.templates[row["template"]]
        lines = row["text"].split("\n")
        assert len(lines) == 4 and lines[-1] == template.format(row["subject"]) == row["query"]
        assert row["text"] == row["prefix"] + row["query"]
        demo_subjects = {s for s in identification_subjects for line in lines[:-1]
                         if line.startswith(template.format(s) + " ")}
        assert len(demo_subjects) == 3 and row["subject"] not in demo_subjects


def test_prompts_share_a_few_demonstration_sets():
    relation = load("verb_past_tense")
    settings = PromptSettings.defaults(few_shot=3, few_shot_sets=4, test_facts=20, seed=0)
    prompts = build_prompts([relation], settings)
    for template, group in prompts.group_by("template"):
        # One prefix per demonstration set and template: what the model stages forward once.
        assert group["prefix"].n_unique() == group["demo_set"].n_unique() <= 4
        assert set(group["demo_set"]) <= {0, 1, 2, 3}


def test_test_prompts_start_with_the_first_test_few_shot_sets():
    relation = load("verb_past_tense")
    for test_sets in (1, 2, 4):
        settings = PromptSettings.defaults(few_shot=3, few_shot_sets=4, test_few_shot_sets=test_sets,
                                           test_facts=20, seed=0)
        prompts = build_prompts([relation], settings)
        test = prompts.filter(pl.col("split") == "test")
        assert sorted(test["demo_set"].unique()) == list(range(test_sets))
        assert test["prefix"].n_unique() == test_sets
        # Identification prompts still use every set, and the same draw whatever the test sets.
        identification = prompts.filter(pl.col("split") == "identification")
        assert sorted(identification["demo_set"].unique()) == [0, 1, 2, 3]
    with pytest.raises(NeuronmapError, match="test_few_shot_sets: 5 is more than the 4"):
        build_prompts([relation], PromptSettings.defaults(few_shot_sets=4, test_few_shot_sets=5))


def test_identification_uses_every_template_and_test_the_first():
    relation = load("country_capital_city")
    assert len(relation.templates) == 2
    prompts = build_prompts([relation], PromptSettings.defaults(test_facts=12))
    identification = prompts.filter(pl.col("split") == "identification")
    test = prompts.filter(pl.col("split") == "test")
    assert sorted(identification["template"].unique()) == [0, 1]
    assert identification.height == 2 * identification["subject"].n_unique()
    assert test["template"].unique().to_list() == [0]
    assert not set(identification["subject"]) & set(test["subject"])
    chosen = build_prompts([relation], PromptSettings.defaults(test_facts=12, templates=[1], test_templates=(0, 1)))
    assert chosen.filter(pl.col("split") == "identification")["template"].unique().to_list() == [1]
    assert chosen.filter(pl.col("split") == "test").height == 2 * test.height


def test_shards_cover_identification_prompts_only():
    prompts = build_prompts([load("landmark_in_country")], PromptSettings.defaults(max_facts=100), shards=4)
    assert prompts.filter(pl.col("split") == "test")["shard"].null_count() == \
        prompts.filter(pl.col("split") == "test").height
    sizes = prompts.filter(pl.col("split") == "identification").group_by("shard").len()["len"]
    assert sizes.len() == 4 and sizes.max() - sizes.min() <= 1


def test_duplicates_collapse_and_escapes_are_fixed():
    capitals = load("country_capital_city")
    assert any(obj == "Brasília" for fact in capitals.facts for obj in fact.objects)
    occupations = load("person_occupation")
    subjects = [fact.subject for fact in occupations.facts]
    assert len(subjects) == len(set(subjects))


def write(tmp_path, payload, name="bad"):
    path = tmp_path / f"{name}.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


GOOD = {"name": "x", "prompt_templates": ["{} is in"], "samples": [{"subject": "a", "object": "b"}]}


@pytest.mark.parametrize("payload, message", [
    ("{not json", "not valid JSON"),
    ({**GOOD, "prompt_templates": ["no placeholder"]}, "prompt_templates[0]"),
    ({**GOOD, "samples": []}, "no facts"),
    ({**GOOD, "samples": [{"subject": "a"}]}, "samples[0]"),
    ({"samples": []}, "prompt_templates"),
])
def test_malformed_relation_file_names_the_file(tmp_path, payload, message):
    path = write(tmp_path, payload)
    with pytest.raises(NeuronmapError) as error:
        load_relation(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_too_few_facts_for_the_split(tmp_path):
    path = write(tmp_path, GOOD)
    with pytest.raises(NeuronmapError, match="too few"):
        build_prompts([load_relation(path)], PromptSettings.defaults(few_shot=3))
