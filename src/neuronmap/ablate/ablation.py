"""The ablate stage: deactivate a relation's top-k units (or random controls) and measure
factual recall on the test prompts of every relation, and perplexity of a neutral text.

Every configuration of a relation's sweep (each k, top-k and random controls of several seeds)
is evaluated in one batched sweep (evaluation.generate_sweep): no model reload, and forward
batches that hold several configurations at once.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from ..errors import NeuronmapError
from ..maths.draws import relation_rng
from ..model.architectures import MlpSites
from ..model.deactivation import Deactivation, UnitSet, deactivated, random_units
from ..model.generation import configs_per_batch_for  # ablate/commands.py imports it from here
from .evaluation import EvaluationSettings, generate, generate_sweep, is_correct

log = logging.getLogger(__name__)

DEACTIVATION_VALUES = ("zero", "mean", "clamp")
RANDOM_EVALS = ("own", "all")


@dataclass(frozen=True)
class Ablation:
    ablated_relation: str | None
    k: int
    control: str  # "none" (baseline), "top_k" or "random"
    seed: int | None
    units: UnitSet

    def describe(self) -> str:
        if self.control == "none":
            return "baseline"
        seed = f" seed={self.seed}" if self.seed is not None else ""
        return f"{self.ablated_relation} {self.control} k={self.k}{seed}"


BASELINE = Ablation(None, 0, "none", None, {})


@dataclass(frozen=True)
class DeactivationValue:
    """What a deactivated unit is set to: zero, its mean response on the relation's negatives
    (off_mean of the expertise table), or one clamp value for every unit."""
    mode: str = "zero"
    clamp_value: float = 0.0

    def __post_init__(self):
        if self.mode not in DEACTIVATION_VALUES:
            raise NeuronmapError(
                f"ablation.value: unknown {self.mode!r} (choose from {', '.join(DEACTIVATION_VALUES)})")


def top_units(selected: pl.DataFrame, k: int) -> UnitSet:
    units: UnitSet = defaultdict(list)
    for site, layer, unit in selected.filter(pl.col("rank") <= k).select("site", "layer", "unit").iter_rows():
        units[(site, layer)].append(unit)
    return dict(units)


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


def off_means(expertise: pl.DataFrame, widths: Mapping[str, int]) -> dict[tuple[str, int], np.ndarray]:
    """Each unit's mean response on the relation's negatives, as dense per-(site, layer) arrays
    (NaN where the expertise table has no row)."""
    values: dict[tuple[str, int], np.ndarray] = {}
    for (site, layer), block in expertise.select("site", "layer", "unit", "off_mean").group_by(
            "site", "layer", maintain_order=True):
        dense = np.full(widths[site], np.nan, dtype=np.float32)
        dense[block["unit"].to_numpy()] = block["off_mean"].to_numpy()
        values[(site, layer)] = dense
    return values


def deactivation_for(ablation: Ablation, value: DeactivationValue,
                     negative_means: Mapping[tuple[str, int], np.ndarray] | None = None) -> Deactivation:
    if value.mode == "zero":
        return Deactivation.constant(ablation.units, 0.0)
    if value.mode == "clamp":
        return Deactivation.constant(ablation.units, value.clamp_value)
    if negative_means is None:
        raise NeuronmapError("ablation.value: mean needs the relation's expertise table (off_mean per unit)")
    missing = [point for point in ablation.units if point not in negative_means]
    if missing:
        raise NeuronmapError(f"ablation.value: mean, but the expertise table has no off_mean for {missing[:3]}")
    config = Deactivation.per_unit(ablation.units, negative_means)
    if any(np.isnan(v).any() for v in config.values.values()):
        raise NeuronmapError("ablation.value: mean, but some deactivated units have no off_mean in the expertise table")
    return config


def prediction_frame(ablation: Ablation, prompts: pl.DataFrame, generated: Sequence[str],
                     settings: EvaluationSettings) -> pl.DataFrame:
    """Per-prompt predictions under one ablation; prompts may carry a `language` column."""
    correct = [is_correct(g, objs, settings.match, settings.case_sensitive)
               for g, objs in zip(generated, prompts["objects"].to_list())]
    n = prompts.height
    frame = pl.DataFrame({
        "ablated_relation": [ablation.ablated_relation] * n,
        "k": [ablation.k] * n,
        "control": [ablation.control] * n,
        "seed": [ablation.seed] * n,
        "prompt_id": prompts["prompt_id"],
        "eval_relation": prompts["relation"],
        "generated": list(generated),
        "correct": correct,
    }, schema={"ablated_relation": pl.String, "k": pl.Int64, "control": pl.String, "seed": pl.Int64,
               "prompt_id": pl.String, "eval_relation": pl.String, "generated": pl.String, "correct": pl.Boolean})
    if "language" in prompts.columns:
        frame = frame.with_columns(language=prompts["language"])
    return frame


def evaluate(model, tokenizer, test_prompts: pl.DataFrame, ablation: Ablation,
             settings: EvaluationSettings, value: float = 0.0) -> pl.DataFrame:
    """Per-prompt predictions under one ablation, one configuration at a time (the unbatched
    reference that bench/ablate.py compares the sweep with)."""
    with deactivated(MlpSites(model), ablation.units, value):
        generated = generate(model, tokenizer, test_prompts["prefix"].to_list(), test_prompts["text"].to_list(),
                             settings, desc=ablation.describe())
    frame = prediction_frame(ablation, test_prompts, generated, settings)
    log.info("%s: accuracy %.3f over %d prompts", ablation.describe(), frame["correct"].mean(), frame.height)
    return frame


def evaluate_sweep(model, tokenizer, prompts: pl.DataFrame, ablations: Sequence[Ablation],
                   configs: Sequence[Deactivation], settings: EvaluationSettings,
                   configs_per_batch: int) -> pl.DataFrame:
    """Per-prompt predictions under every ablation, evaluated together (see generate_sweep)."""
    if len(ablations) != len(configs):
        raise ValueError("evaluate_sweep: one deactivation configuration per ablation")
    generated = generate_sweep(model, tokenizer, prompts["prefix"].to_list(), prompts["text"].to_list(), configs,
                               settings, configs_per_batch,
                               desc=f"sweep of {len(configs)} configurations")
    frames = [prediction_frame(a, prompts, g, settings) for a, g in zip(ablations, generated)]
    for ablation, frame in zip(ablations, frames):
        log.info("%s: accuracy %.3f over %d prompts", ablation.describe(), frame["correct"].mean(), frame.height)
    return pl.concat(frames)


def evaluate_plan(model, tokenizer, prompts: pl.DataFrame, ablations: Sequence[Ablation],
                  configs: Sequence[Deactivation], settings: EvaluationSettings, configs_per_batch: int,
                  random_eval: str = "own") -> pl.DataFrame:
    """A relation's sweep: top-k ablations on every prompt; random controls on every prompt
    (random_eval "all") or only on the ablated relation's own prompts ("own", in every
    language), which is what they control for and a fraction of the cost."""
    if random_eval not in RANDOM_EVALS:
        raise NeuronmapError(
            f"ablation.random_eval: unknown {random_eval!r} (choose from {', '.join(RANDOM_EVALS)})")
    everywhere = [i for i, a in enumerate(ablations) if a.control != "random" or random_eval == "all"]
    own_only = [i for i in range(len(ablations)) if i not in everywhere]
    frames = []
    if everywhere:
        frames.append(evaluate_sweep(model, tokenizer, prompts, [ablations[i] for i in everywhere],
                                     [configs[i] for i in everywhere], settings, configs_per_batch))
    for relation in sorted({ablations[i].ablated_relation for i in own_only}):
        chosen = [i for i in own_only if ablations[i].ablated_relation == relation]
        own = prompts.filter(pl.col("relation") == relation)
        if own.height:
            frames.append(evaluate_sweep(model, tokenizer, own, [ablations[i] for i in chosen],
                                         [configs[i] for i in chosen], settings, configs_per_batch))
    return pl.concat(frames) if frames else prediction_frame(BASELINE, prompts.clear(), [], settings)

