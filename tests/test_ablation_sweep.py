"""The batched sweep on the real embedded model: every configuration's predictions equal those of
one configuration at a time, and the plan of top-k and random controls is what it should be."""

import numpy as np
import polars as pl
import pytest

from neuronmap.ablate import ablation as ablation_module
from neuronmap.ablate.ablation import (Ablation, DeactivationValue, ablations_for, deactivation_for, evaluate, evaluate_plan,
                                evaluate_sweep, off_means)
from neuronmap.errors import NeuronmapError
from neuronmap.ablate.settings import EvaluationSettings
from neuronmap.prepare.prompts import build_prompts
from neuronmap.prepare.settings import PromptSettings
from neuronmap.prepare.relations import find_relation_file, load_relation

from conftest import RELATIONS


@pytest.fixture(scope="module")
def test_prompts():
    relations = [load_relation(find_relation_file(RELATIONS, name), name)
                 for name in ("country_capital_city", "verb_past_tense")]
    prompts = build_prompts(relations, PromptSettings.defaults(max_facts=40, test_facts=12))
    return prompts.filter(pl.col("split") == "test").sort("prompt_id").gather_every(4)


def test_sweep_predictions_equal_one_configuration_at_a_time(smollm2, test_prompts):
    model, tokenizer = smollm2
    rng = np.random.default_rng(0)
    units = {(site, layer): sorted(rng.choice(1536, 60, replace=False).tolist())
             for site in ("gate", "up", "act") for layer in range(0, 30, 3)}
    plan = [Ablation("r", 1800, "top_k", None, units),
            Ablation("r", 10, "random", 1, {("act", 5): [3, 4, 5]}),
            Ablation(None, 0, "none", None, {}),
            Ablation("r", 1800, "random", 2, units)]
    values = [0.0, 0.0, 0.0, 2.5]  # the last one clamps instead of zeroing
    configs = [deactivation_for(a, DeactivationValue("clamp", v)) for a, v in zip(plan, values)]
    settings = EvaluationSettings.defaults(max_new_tokens=2, batch_size=3)
    swept = evaluate_sweep(model, tokenizer, test_prompts, plan, configs, settings, configs_per_batch=3)
    for ablation, value in zip(plan, values):
        one = evaluate(model, tokenizer, test_prompts, ablation, settings, value=value)
        got = swept.filter((pl.col("k") == ablation.k) & (pl.col("control") == ablation.control)
                           & (pl.col("seed").eq_missing(ablation.seed)))
        assert got["prompt_id"].to_list() == one["prompt_id"].to_list()
        assert got["generated"].to_list() == one["generated"].to_list(), ablation.describe()
    baseline = swept.filter(pl.col("control") == "none")["generated"]
    assert (swept.filter(pl.col("seed") == 2)["generated"] != baseline).any()  # the clamp does bite


def test_plan_has_top_k_and_same_placed_random_controls():
    selected = pl.DataFrame({"site": ["gate"] * 5 + ["act"] * 3, "layer": [1, 1, 2, 2, 2, 0, 0, 7],
                             "unit": [3, 4, 5, 6, 7, 8, 9, 10], "rank": [1, 2, 3, 4, 5, 6, 7, 8]},
                            schema_overrides={"layer": pl.Int32, "unit": pl.Int32, "rank": pl.Int64})
    plan = ablations_for("r", selected, [4, 8], [1, 2, 3], {"gate": 16, "act": 16})
    assert [(a.k, a.control, a.seed) for a in plan] == [
        (4, "top_k", None), (4, "random", 1), (4, "random", 2), (4, "random", 3),
        (8, "top_k", None), (8, "random", 1), (8, "random", 2), (8, "random", 3)]
    top8 = plan[4].units
    for control in plan[5:]:
        assert {p: len(u) for p, u in control.units.items()} == {p: len(u) for p, u in top8.items()}
        assert all(not set(u) & set(top8[p]) for p, u in control.units.items())
    assert plan[5].units != plan[6].units  # seeds differ


def test_mean_value_uses_each_units_off_mean():
    expertise = pl.DataFrame({"site": ["gate", "gate", "act"], "layer": [0, 0, 2], "unit": [1, 3, 0],
                              "off_mean": [0.5, -1.0, 2.0]},
                             schema_overrides={"layer": pl.Int32, "unit": pl.Int32, "off_mean": pl.Float32})
    means = off_means(expertise, {"gate": 4, "act": 2})
    config = deactivation_for(Ablation("r", 3, "top_k", None, {("gate", 0): [3, 1], ("act", 2): [0]}),
                              DeactivationValue("mean"), means)
    assert config.units[("gate", 0)].tolist() == [1, 3] and config.values[("gate", 0)].tolist() == [0.5, -1.0]
    assert config.values[("act", 2)].tolist() == [2.0]
    with pytest.raises(NeuronmapError, match="no off_mean"):
        deactivation_for(Ablation("r", 1, "top_k", None, {("gate", 0): [2]}), DeactivationValue("mean"), means)
    with pytest.raises(NeuronmapError, match="ablation.value: unknown 'half'"):
        DeactivationValue("half")


@pytest.mark.parametrize("random_eval, random_prompts", [("own", 2), ("all", 4)])
def test_random_controls_are_evaluated_on_own_prompts_or_all(monkeypatch, random_eval, random_prompts):
    calls = []

    def fake_sweep(model, tokenizer, prompts, ablations, configs, settings, configs_per_batch):
        calls.append(([a.control for a in ablations], prompts["relation"].to_list()))
        return pl.DataFrame({"control": [a.control for a in ablations for _ in range(prompts.height)]})
    monkeypatch.setattr(ablation_module, "evaluate_sweep", fake_sweep)
    prompts = pl.DataFrame({"relation": ["r", "s", "r", "s"], "language": ["en", "en", "fr", "en"]})
    plan = [Ablation("r", 5, "top_k", None, {}), Ablation("r", 5, "random", 1, {}), Ablation("r", 5, "random", 2, {})]
    frame = evaluate_plan(None, None, prompts, plan, [None] * 3, EvaluationSettings.defaults(), 4, random_eval)
    assert frame.filter(pl.col("control") == "top_k").height == 4
    assert frame.filter(pl.col("control") == "random").height == 2 * random_prompts
    if random_eval == "own":
        assert calls == [(["top_k"], ["r", "s", "r", "s"]), (["random", "random"], ["r", "r"])]
    with pytest.raises(NeuronmapError, match="ablation.random_eval: unknown 'some'"):
        evaluate_plan(None, None, prompts, plan, [None] * 3, EvaluationSettings.defaults(), 4, "some")


def test_configs_per_batch_auto_is_one_on_the_cpu_and_twelve_on_a_gpu():
    import torch

    from neuronmap.ablate.ablation import configs_per_batch_for
    assert configs_per_batch_for("auto", torch.device("cpu")) == 1
    assert configs_per_batch_for("auto", torch.device("cuda", 0)) == 12
    assert configs_per_batch_for(5, torch.device("cpu")) == 5
