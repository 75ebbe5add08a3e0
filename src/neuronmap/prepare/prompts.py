"""The prepare stage: facts -> prompts, split into identification and test sets by subject."""

from __future__ import annotations

import math
import zlib

import numpy as np
import polars as pl

from ..errors import NeuronmapError
from .relations import Fact, Relation
from .settings import PromptSettings

SPLITS = ("identification", "test")


def relation_rng(seed: int, relation: str, purpose: str) -> np.random.Generator:
    """A generator that depends only on the seed and the relation, so adding a relation
    leaves every other relation's draws unchanged."""
    return np.random.default_rng([seed, zlib.crc32(relation.encode()), zlib.crc32(purpose.encode())])


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


def relation_prompts(relation: Relation, settings: PromptSettings, shards: int = 1) -> pl.DataFrame:
    """A relation's prompts; identification prompts are dealt round-robin to `shards` extraction jobs."""
    for t in settings.templates:
        if t >= len(relation.templates):
            raise NeuronmapError(
                f"templates: index {t} out of range, {relation.path} has {len(relation.templates)} templates")
    identification, test = split_facts(relation, settings, shards)
    demo_rng = relation_rng(settings.seed, relation.name, "few_shot")
    rows = []
    for split, fact_indices in (("identification", identification), ("test", test)):
        for position, fact_index in enumerate(fact_indices):
            fact = relation.facts[fact_index]
            # Demonstrations come from the identification split only and never include the asked fact.
            pool = [i for i in identification if i != fact_index]
            demos = demo_rng.choice(pool, settings.few_shot, replace=False).tolist() if settings.few_shot else []
            for t in settings.templates:
                template = relation.templates[t]
                lines = [demonstration(template, relation.facts[d]) for d in demos]
                lines.append(fact_prompt(template, fact))
                rows.append({
                    "prompt_id": f"{relation.name}/{fact_index:05d}/t{t}",
                    "relation": relation.name,
                    "subject": fact.subject,
                    "object": fact.objects[0],
                    "objects": list(fact.objects),
                    "template": t,
                    "text": "\n".join(lines),
                    "split": split,
                    "fact_position": position,
                })
    frame = pl.DataFrame(rows)
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
