"""The ablate stage: deactivate a relation's top-k units (or random controls) and measure
factual recall on the test prompts of every relation."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from . import schemas
from .architectures import MlpSites
from .evaluation import EvaluationSettings, generate, is_correct
from .deactivation import deactivated
from .prompts import relation_rng

log = logging.getLogger(__name__)

UnitSet = dict[tuple[str, int], list[int]]


@dataclass(frozen=True)
class Ablation:
    ablated_relation: str | None
    k: int
    control: str  # "none" (baseline), "top_k" or "random"
    seed: int | None
    units: UnitSet


def top_units(selected: pl.DataFrame, k: int) -> UnitSet:
    units: UnitSet = defaultdict(list)
    for site, layer, unit in selected.filter(pl.col("rank") <= k).select("site", "layer", "unit").iter_rows():
        units[(site, layer)].append(unit)
    return dict(units)


def random_units(top: UnitSet, widths: dict[str, int], rng: np.random.Generator) -> UnitSet:
    """As many random units in each (site, layer) as the top-k set has there, none of them in it."""
    units: UnitSet = {}
    for (site, layer), chosen in sorted(top.items()):
        candidates = np.setdiff1d(np.arange(widths[site]), chosen)
        count = min(len(chosen), len(candidates))
        units[(site, layer)] = sorted(rng.choice(candidates, count, replace=False).tolist())
    return units


def ablations_for(relation: str, selected: pl.DataFrame, top_k: Sequence[int], seeds: Sequence[int],
                  widths: dict[str, int]) -> list[Ablation]:
    plan = []
    for k in sorted(top_k):
        top = top_units(selected, k)
        plan.append(Ablation(relation, k, "top_k", None, top))
        for seed in seeds:
            rng = relation_rng(seed, relation, f"random-{k}")
            plan.append(Ablation(relation, k, "random", seed, random_units(top, widths, rng)))
    return plan


def evaluate(model, tokenizer, test_prompts: pl.DataFrame, ablation: Ablation,
             settings: EvaluationSettings) -> pl.DataFrame:
    """Per-prompt predictions under one ablation (the empty one is the baseline)."""
    sites = MlpSites(model)
    desc = "baseline" if ablation.control == "none" else \
        f"{ablation.ablated_relation} {ablation.control} k={ablation.k}" + \
        (f" seed={ablation.seed}" if ablation.seed is not None else "")
    with deactivated(sites, ablation.units):
        generated = generate(model, tokenizer, test_prompts["text"].to_list(), settings, desc=desc)
    correct = [is_correct(g, objs, settings.match, settings.case_sensitive)
               for g, objs in zip(generated, test_prompts["objects"].to_list())]
    n = test_prompts.height
    frame = pl.DataFrame({
        "ablated_relation": [ablation.ablated_relation] * n,
        "k": [ablation.k] * n,
        "control": [ablation.control] * n,
        "seed": [ablation.seed] * n,
        "prompt_id": test_prompts["prompt_id"],
        "eval_relation": test_prompts["relation"],
        "generated": generated,
        "correct": correct,
    }, schema={"ablated_relation": pl.String, "k": pl.Int64, "control": pl.String, "seed": pl.Int64,
               "prompt_id": pl.String, "eval_relation": pl.String, "generated": pl.String, "correct": pl.Boolean})
    log.info("%s: accuracy %.3f over %d prompts", desc, frame["correct"].mean(), n)
    return frame


def summarize(predictions: pl.DataFrame, baseline: pl.DataFrame) -> pl.DataFrame:
    base = baseline.group_by("eval_relation").agg(baseline_accuracy=pl.col("correct").mean())
    summary = predictions.group_by("ablated_relation", "k", "control", "seed", "eval_relation").agg(
        n=pl.len().cast(pl.Int64), correct=pl.col("correct").sum().cast(pl.Int64),
        accuracy=pl.col("correct").mean())
    summary = summary.join(base, on="eval_relation", how="left").with_columns(
        relative_drop=pl.when(pl.col("baseline_accuracy") > 0)
        .then((pl.col("baseline_accuracy") - pl.col("accuracy")) / pl.col("baseline_accuracy"))
        .otherwise(None))
    return summary.sort("k", "control", "seed", "eval_relation", nulls_last=False) \
        .select(schemas.ABLATION.names)


def unit_count(units: UnitSet) -> int:
    return sum(len(v) for v in units.values())
