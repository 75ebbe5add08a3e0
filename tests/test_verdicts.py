"""Per-relation verdicts (ablate/verdicts.py): the exact permutation test against brute force and
scipy, its false-positive rate on null data, planted effects recovered, and the detectable drop
against an independent binomial computation and against simulation."""

import itertools
import math

import numpy as np
import polars as pl
import pytest
import scipy.stats

from neuronmap.ablate import verdicts as V
from neuronmap.io import tables


def brute_force_p(counts: np.ndarray) -> float:
    """Every assignment of the top-k role to one of the S + 1 sets, per fact."""
    sets = counts.shape[1]
    observed = counts[:, 1:].mean(1).sum() - counts[:, 0].sum()
    extreme = 0
    for choice in itertools.product(range(sets), repeat=len(counts)):
        designated = counts[np.arange(len(counts)), choice]
        statistic = (counts.sum(1) - designated) / (sets - 1) - designated
        extreme += abs(statistic.sum()) >= abs(observed) - 1e-9
    return extreme / sets ** len(counts)


@pytest.mark.parametrize("seed", range(4))
def test_exact_p_value_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 3, 6)
    counts = np.stack([rng.integers(0, sizes + 1) for _ in range(3)], axis=1)  # S = 2 seeds
    assert V.permutation_p_value(counts) == pytest.approx(brute_force_p(counts), abs=1e-12)


def test_one_seed_is_the_exact_sign_flip_test():
    rng = np.random.default_rng(5)
    counts = rng.integers(0, 3, (9, 2))
    differences = (counts[:, 1] - counts[:, 0]).astype(float)
    reference = scipy.stats.permutation_test((differences,), np.mean, permutation_type="samples",
                                             n_resamples=10 ** 6, alternative="two-sided").pvalue
    assert V.permutation_p_value(counts) == pytest.approx(reference, abs=1e-12)


def test_simulated_p_values_match_the_exact_convolution():
    rng = np.random.default_rng(2)
    sizes = rng.integers(1, 4, 15)
    randoms = np.stack([rng.integers(0, sizes + 1) for _ in range(3)], axis=1)
    cell = V.Cell(np.column_stack([sizes, randoms]), sizes, np.zeros(15, np.int64))
    top = np.stack([rng.integers(0, sizes + 1) for _ in range(20)])
    p, observed = V._simulated_p_values(cell, top)
    for row in range(20):
        counts = np.column_stack([top[row], randoms])
        assert p[row] == pytest.approx(V.permutation_p_value(counts), abs=1e-9)
        assert observed[row] == pytest.approx(3 * len(sizes) * 0 + (randoms.sum(1) - 3 * top[row]).sum())


def null_counts(rng, facts, prompts_per_fact, seeds, datasets):
    """[datasets, facts, 1 + S] right answers when the top-k set is one more random set: each fact
    has its own difficulty (its prompts correlated) and each set answers independently."""
    rate = rng.beta(2, 2, (datasets, facts, 1))
    return rng.binomial(prompts_per_fact, np.broadcast_to(rate, (datasets, facts, seeds + 1)))


def attained_size(counts: np.ndarray, alpha: float) -> float:
    """P(p < alpha) under the test's own null for these facts: alpha at most, less where the
    exact null is discrete."""
    support, pmf, _ = V.null_distribution(counts)
    levels, level = np.unique(np.abs(support), return_inverse=True)
    extreme = np.bincount(level, pmf)[::-1].cumsum()[::-1][level]  # P(|T| >= |s|) for each s
    return float(pmf[extreme < alpha].sum())


@pytest.mark.parametrize("facts,prompts_per_fact,seeds", [(150, 1, 3), (100, 3, 2), (40, 1, 1)])
def test_false_positive_rate_on_null_data(facts, prompts_per_fact, seeds):
    """2,000 simulated null datasets each (the top-k set one more random set). The number with
    p < 0.05 lies in the binomial 99% interval of the test's attained size (the mean over the
    datasets of P(p < 0.05) under the exact null of their facts), which is at most 0.05: the
    exact test is discrete (measured 0.045, 0.041, 0.027: 40 facts and one seed are coarse)."""
    rng = np.random.default_rng(11)
    datasets, alpha = 2000, 0.05
    counts = null_counts(rng, facts, prompts_per_fact, seeds, datasets)
    false_positives = sum(V.permutation_p_value(c) < alpha for c in counts)
    size = np.mean([attained_size(c, alpha) for c in counts])
    assert size <= alpha
    low, high = scipy.stats.binom.interval(0.99, datasets, size)
    assert low <= false_positives <= high


def synthetic_predictions(rng, effects: dict[str, float], facts=50, seeds=(1, 2, 3), k=100, base=0.8):
    """Predictions of the ablate stage's shape: per relation, every test prompt answered right
    with probability `base` by the random controls; the top-k set answers like one more random
    control, then loses each right answer with probability effect (effect < 0: it answers right
    a wrong answer the random sets give, with probability -effect)."""
    rows, baseline = [], []
    for relation, effect in effects.items():
        for fact in range(facts):
            pid = f"{relation}/{fact:05d}/t0"
            randoms = rng.random(len(seeds)) < base
            top = rng.random() < base
            if effect > 0:
                top = top and rng.random() >= effect
            elif effect < 0:
                randoms = randoms & (rng.random(len(seeds)) >= -effect)
                top = top or rng.random() < -effect
            baseline.append({"prompt_id": pid, "correct": bool(rng.random() < base)})
            rows.append((relation, k, "top_k", 0, pid, relation, "", bool(top)))
            for seed, right in zip(seeds, randoms):
                rows.append((relation, k, "random", seed, pid, relation, "", bool(right)))
    predictions = pl.DataFrame(rows, schema=tables.PREDICTIONS.names, orient="row")
    return predictions, pl.DataFrame(baseline)


def test_planted_effects_are_recovered():
    rng = np.random.default_rng(3)
    effects = {"specific": 0.6, "absent": 0.0, "reversed": -0.6}
    predictions, baseline = synthetic_predictions(rng, effects)
    table = V.verdict_table(predictions, baseline, n_resamples=500, simulations=200)
    assert table.schema == pl.from_arrow(tables.VERDICTS.empty_table()).schema
    by = {r: row for r, row in zip(table["relation"], table.iter_rows(named=True))}
    assert by["specific"]["verdict"] == "holds" and by["specific"]["ci_low"] > 0
    assert by["absent"]["verdict"] == "undecided" and by["absent"]["ci_low"] < 0 < by["absent"]["ci_high"]
    assert by["reversed"]["verdict"] == "reversed" and by["reversed"]["ci_high"] < 0
    # The pooled row is built from the same facts: its excess is the prompt-weighted mean.
    pooled = by[None]
    assert pooled["n"] == 150
    assert pooled["excess_drop"] == pytest.approx(np.mean([by[r]["excess_drop"] for r in effects]))
    # An effect of 0.6 x 0.8 = 48 points on 50 prompts is far above what 50 prompts can detect.
    assert by["specific"]["detectable_drop"] < by["specific"]["excess_drop"]


def test_verdicts_need_the_random_controls_on_the_same_prompts():
    rng = np.random.default_rng(0)
    predictions, baseline = synthetic_predictions(rng, {"r": 0.5}, facts=5)
    dropped = predictions.filter(~((pl.col("control") == "random") & (pl.col("prompt_id") == "r/00000/t0")
                                   & (pl.col("seed") == 2)))
    with pytest.raises(Exception, match="same test prompts"):
        V.verdict_table(dropped, baseline, n_resamples=100, simulations=50)


def test_detectable_drop_without_noise_matches_the_binomial():
    """Random controls always right on 12 prompts (3 seeds): one lost answer gives p = 1/4, so
    p < 0.05 needs 3 lost (p = 1/64); the drop is found with power 0.8 when Binomial(12, pi) >= 3
    with probability 0.8, and the detectable drop is that pi."""
    cell = V.Cell(np.ones((12, 4), np.int64), np.ones(12, np.int64), np.zeros(12, np.int64))
    expected = scipy.optimize.brentq(lambda pi: scipy.stats.binom.sf(2, 12, pi) - 0.8, 1e-6, 1 - 1e-6)
    found = V.detectable_drop(cell, 0.05, 0.8, 4000, np.random.default_rng(0))
    assert found == pytest.approx(expected, abs=0.03)  # 4,000 simulations: power within ~0.01


def test_detectable_drop_is_found_with_its_power():
    """Simulate afresh at the detectable drop, with the exact test: the share found is the power."""
    rng = np.random.default_rng(8)
    facts, seeds = 30, 3
    rate = rng.beta(2, 1, facts)
    randoms = (rng.random((facts, seeds)) < rate[:, None]).astype(np.int64)
    cell = V.Cell(np.column_stack([randoms[:, 0], randoms]), np.ones(facts, np.int64), np.zeros(facts, np.int64))
    drop = V.detectable_drop(cell, 0.05, 0.8, 1000, np.random.default_rng(1))
    pi = drop / randoms.mean()
    trials, found = 400, 0
    for _ in range(trials):
        top = (rng.random(facts) < randoms.mean(1)) & (rng.random(facts) >= pi)
        counts = np.column_stack([top.astype(np.int64), randoms])
        found += V.permutation_p_value(counts) < 0.05 and randoms.mean(1).sum() > top.sum()
    low, high = scipy.stats.binom.interval(0.99, trials, 0.8)
    assert low - 10 <= found <= high + 10  # plus the bisection's own Monte Carlo error


def test_nothing_to_lose_is_not_detectable():
    cell = V.Cell(np.zeros((10, 4), np.int64), np.ones(10, np.int64), np.zeros(10, np.int64))
    assert math.isnan(V.detectable_drop(cell, 0.05, 0.8, 100, np.random.default_rng(0)))
    assert V.permutation_p_value(cell.counts) == 1.0


def test_every_column_is_documented():
    """docs/parquet.md's section on `verdicts.parquet` names every column of tables.VERDICTS."""
    from conftest import REPO
    documented = (REPO / "docs" / "parquet.md").read_text().split("## `verdicts.parquet`")[1].split("\n## ")[0]
    for column in tables.VERDICTS.names:
        assert f"`{column}`" in documented, column
