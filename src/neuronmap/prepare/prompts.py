"""The prepare stage: facts -> prompts, split into identification and test sets by subject.

A prompt is a prefix of demonstrations (other facts of the relation, one per line) and the
asked fact, its query: `text = prefix + query`. Demonstrations come from a few fixed sets per
relation (`few_shot_sets`), so that the model stages forward each set's prefix once and reuse
its key/value cache for every prompt that starts with it (model/prefix_cache.py). Test prompts
use only the first `test_few_shot_sets` of them: a test fact is never in a set (sets are drawn
from identification facts), and every set a test prompt starts with is one more prefix that each
ablation configuration forwards.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from ..errors import NeuronmapError
from ..maths.draws import relation_rng
from .relations import Fact, Relation
from .settings import PromptSettings

PRIVATE_SET = -1  # demo_set of a prompt whose fact is in every shared set: it gets its own


def fact_prompt(template: str, fact: Fact) -> str:
    return template.format(fact.subject)


def demonstration(template: str, fact: Fact) -> str:
    return f"{template.format(fact.subject)} {fact.objects[0]}"


def split_facts(relation: Relation, settings: PromptSettings, shards: int) -> tuple[list[int], list[int]]:
    """Indices of identification and test facts. Facts are already one per subject, so a
    split of facts is a split of subjects: no subject can be in both."""
    rng = relation_rng(settings.seed, relation.name, "split")
    indices = np.arange(len(relation.facts))
    if settings.max_facts and len(indices) > settings.max_facts:
        indices = np.sort(rng.choice(indices, settings.max_facts, replace=False))
    n_test = min(settings.test_facts, math.floor(settings.max_test_fraction * len(indices)))
    n_identification = len(indices) - n_test
    if n_test < 1 or n_identification < max(settings.few_shot + 1, shards):
        raise NeuronmapError(
            f"{relation.path}: {len(indices)} facts are too few for a test split of "
            f"{settings.test_facts} (max_test_fraction {settings.max_test_fraction}), "
            f"few_shot {settings.few_shot} and shards {shards}")
    permuted = rng.permutation(indices)
    return sorted(permuted[n_test:].tolist()), sorted(permuted[:n_test].tolist())


def template_indices(relation: Relation, chosen: str | list[int] | tuple[int, ...], key: str) -> list[int]:
    if chosen == "all":
        return list(range(len(relation.templates)))
    for t in chosen:
        if t >= len(relation.templates):
            raise NeuronmapError(
                f"{key}: index {t} out of range, {relation.path} has {len(relation.templates)} templates")
    return list(chosen)


def demonstration_sets(identification: list[int], settings: PromptSettings, relation: str) -> list[list[int]]:
    """`few_shot_sets` sets of `few_shot` identification facts: consecutive runs of one seeded
    permutation, disjoint while there are enough facts, wrapping around when there are not."""
    if not settings.few_shot:
        return [[]]
    order = relation_rng(settings.seed, relation, "few_shot").permutation(identification).tolist()
    k = settings.few_shot
    return [[order[(s * k + i) % len(order)] for i in range(k)] for s in range(settings.few_shot_sets)]


def choose_set(sets: list[list[int]], fact_index: int, position: int) -> int:
    """Sets are dealt round-robin; a set holding the asked fact is skipped."""
    for attempt in range(len(sets)):
        s = (position + attempt) % len(sets)
        if fact_index not in sets[s]:
            return s
    return PRIVATE_SET


def relation_prompts(relation: Relation, settings: PromptSettings, shards: int = 1) -> pl.DataFrame:
    """A relation's prompts; identification prompts are dealt round-robin to `shards` extraction jobs."""
    templates = {"identification": template_indices(relation, settings.templates, "templates"),
                 "test": template_indices(relation, settings.test_templates, "test_templates")}
    identification, test = split_facts(relation, settings, shards)
    sets = demonstration_sets(identification, settings, relation.name)
    if settings.test_few_shot_sets > len(sets):
        raise NeuronmapError(f"test_few_shot_sets: {settings.test_few_shot_sets} is more than the "
                             f"{len(sets)} demonstration sets (few_shot_sets) drawn per relation")
    split_sets = {"identification": sets, "test": sets[:settings.test_few_shot_sets]}
    private_rng = relation_rng(settings.seed, relation.name, "few_shot_private")
    rows = []
    for split, fact_indices in (("identification", identification), ("test", test)):
        for position, fact_index in enumerate(fact_indices):
            fact = relation.facts[fact_index]
            demo_set = choose_set(split_sets[split], fact_index, position)
            if demo_set == PRIVATE_SET:
                # Demonstrations never include the asked fact.
                pool = [i for i in identification if i != fact_index]
                demos = private_rng.choice(pool, settings.few_shot, replace=False).tolist()
            else:
                demos = sets[demo_set]
            for t in templates[split]:
                template = relation.templates[t]
                prefix = "".join(demonstration(template, relation.facts[d]) + "\n" for d in demos)
                query = fact_prompt(template, fact)
                rows.append({
                    "prompt_id": f"{relation.name}/{fact_index:05d}/t{t}",
                    "relation": relation.name,
                    "subject": fact.subject,
                    "object": fact.objects[0],
                    "objects": list(fact.objects),
                    "template": t,
                    "demo_set": demo_set,
                    "prefix": prefix,
                    "query": query,
                    "text": prefix + query,
                    "split": split,
                    "fact_position": position,
                })
    frame = pl.DataFrame(rows, schema_overrides={"template": pl.Int32, "demo_set": pl.Int32})
    # Shards are per relation, so adding a relation never reshuffles another relation's shards.
    return frame.with_columns(
        pl.when(pl.col("split") == "identification")
        .then(pl.col("fact_position") % shards)
        .otherwise(None)
        .cast(pl.Int32)
        .alias("shard")
    ).drop("fact_position")


def build_prompts(relations: list[Relation], settings: PromptSettings, shards: int = 1) -> pl.DataFrame:
    return pl.concat([relation_prompts(r, settings, shards) for r in relations], how="vertical")
