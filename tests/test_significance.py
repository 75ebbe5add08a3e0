"""Paired statistics of ablations: checked against scipy's independent implementations."""

import numpy as np
import polars as pl
import pytest
from scipy import stats

from neuronmap.maths.significance import benjamini_hochberg, bootstrap_interval, mcnemar_exact, paired_difference
from neuronmap.ablate.sweep import paired_table, sweep_table


def test_identical_predictions_give_zero_difference():
    answers = np.array([True, False, True, True, False, True] * 5)
    result = paired_difference(answers, answers.copy(), n_resamples=500)
    assert result.difference == 0 and result.ci_low == 0 and result.ci_high == 0
    assert result.lost == result.gained == 0 and result.p_value == 1.0


@pytest.mark.parametrize("lost, gained", [(0, 0), (0, 1), (0, 5), (1, 9), (3, 3), (4, 7), (12, 2), (30, 11), (0, 40)])
def test_exact_mcnemar_is_the_two_sided_binomial_test_of_discordant_pairs(lost, gained):
    expected = 1.0 if lost + gained == 0 else stats.binomtest(lost, lost + gained, 0.5).pvalue
    assert mcnemar_exact(lost, gained) == pytest.approx(expected, rel=1e-12)


def test_counts_and_difference_of_a_known_case():
    baseline = np.array([1, 1, 1, 1, 0, 0, 1, 0, 1, 1], dtype=bool)
    ablated = np.array([0, 0, 1, 0, 1, 0, 1, 0, 0, 1], dtype=bool)
    result = paired_difference(baseline, ablated, n_resamples=1000)
    assert (result.lost, result.gained, result.n) == (4, 1, 10)
    assert result.difference == pytest.approx(-0.3)
    assert result.p_value == pytest.approx(0.375)  # 2 * P(Bin(5, 1/2) <= 1) = 2 * 6/32
    assert result.ci_low <= result.difference <= result.ci_high


def test_bootstrap_interval_agrees_with_scipy_percentile_bootstrap():
    rng = np.random.default_rng(3)
    baseline = rng.random(60) < 0.7
    ablated = np.where(rng.random(60) < 0.3, ~baseline, baseline)
    differences = ablated.astype(float) - baseline.astype(float)
    ours = bootstrap_interval(differences, 40000, 0.95, np.random.default_rng(0))
    theirs = stats.bootstrap((differences,), np.mean, n_resamples=40000, confidence_level=0.95,
                             method="percentile", random_state=np.random.default_rng(1)).confidence_interval
    assert ours[0] == pytest.approx(theirs.low, abs=0.01)
    assert ours[1] == pytest.approx(theirs.high, abs=0.01)


def test_benjamini_hochberg_matches_scipy():
    p = np.array([0.001, 0.04, 0.03, 0.5, 0.2, 0.011, 1.0, 0.049])
    np.testing.assert_allclose(benjamini_hochberg(p), stats.false_discovery_control(p, method="bh"))
    with_nan = benjamini_hochberg(np.array([0.01, np.nan, 0.02]))
    assert np.isnan(with_nan[1]) and with_nan[0] == pytest.approx(0.02)


def predictions(config, correct, prompt_ids, relation="r1"):
    ablated, k, control, seed = config
    n = len(correct)
    return pl.DataFrame({"ablated_relation": [ablated] * n, "k": [k] * n, "control": [control] * n,
                         "seed": [seed] * n, "prompt_id": prompt_ids, "eval_relation": [relation] * n,
                         "generated": [""] * n, "correct": correct},
                        schema_overrides={"seed": pl.Int64, "ablated_relation": pl.String})


def test_paired_table_and_sweep_on_a_known_case():
    ids = [f"p{i}" for i in range(20)]
    base = [True] * 16 + [False] * 4
    baseline = predictions((None, 0, "none", None), base, ids)
    top = [False] * 12 + [True] * 4 + [False] * 4         # 12 lost, nothing gained
    random_same = base                                     # identical to the baseline
    random_gain = [True] * 16 + [True, False, False, False]  # one gained
    frame = pl.concat([predictions(("r1", 10, "top_k", None), top, ids),
                       predictions(("r1", 10, "random", 1), random_same, ids),
                       predictions(("r1", 10, "random", 2), random_gain, ids)])
    table = paired_table(frame, baseline, n_resamples=500, alpha=0.05)
    top_row = table.filter(pl.col("control") == "top_k").row(0, named=True)
    assert (top_row["lost"], top_row["gained"], top_row["n"], top_row["correct"]) == (12, 0, 20, 4)
    assert top_row["accuracy"] == 0.2 and top_row["baseline_accuracy"] == 0.8
    assert top_row["relative_drop"] == pytest.approx(0.75)
    assert top_row["p_value"] == pytest.approx(stats.binomtest(0, 12, 0.5).pvalue) and top_row["significant"]
    same = table.filter(pl.col("seed") == 1).row(0, named=True)
    assert same["difference"] == 0 and same["p_value"] == 1.0 and not same["significant"]
    assert (same["ci_low"], same["ci_high"]) == (0.0, 0.0)

    sweep = sweep_table(table).row(0, named=True)
    assert sweep["top_accuracy"] == 0.2 and sweep["random_seeds"] == 2
    assert sweep["random_accuracy_mean"] == pytest.approx((0.8 + 0.85) / 2)
    assert sweep["random_accuracy_sd"] == pytest.approx(np.std([0.8, 0.85], ddof=1))
    assert sweep["random_significant_seeds"] == 0 and sweep["top_significant"]


def test_paired_table_refuses_prompts_missing_from_the_baseline():
    from neuronmap.errors import NeuronmapError
    baseline = predictions((None, 0, "none", None), [True], ["p0"])
    with pytest.raises(NeuronmapError, match="baseline predictions lack 1 evaluated prompts"):
        paired_table(predictions(("r1", 1, "top_k", None), [True, False], ["p0", "p1"]), baseline)
