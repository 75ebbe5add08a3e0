import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from neuronmap.maths.expertise import average_precision


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 3, 12])
def test_matches_sklearn_with_ties(seed, levels):
    rng = np.random.default_rng(seed)
    n, units = int(rng.integers(5, 200)), 37
    scores = rng.normal(size=(n, units)).astype(np.float32)
    if levels is not None:  # coarse values make many ties, the case where naive AP differs
        scores = np.round(scores * levels / 4) / levels
    labels = rng.random(n) < rng.uniform(0.1, 0.6)
    labels[0] = True
    ours = average_precision(torch.from_numpy(scores), torch.from_numpy(labels)).numpy()
    reference = np.array([average_precision_score(labels, scores[:, u]) for u in range(units)])
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-7)  # float32 precision ratios


def test_constant_scores_and_perfect_separation():
    labels = np.array([True, False, True, False, False])
    scores = np.stack([np.zeros(5), labels.astype(float), -labels.astype(float)], axis=1).astype(np.float32)
    ours = average_precision(torch.from_numpy(scores), torch.from_numpy(labels)).numpy()
    assert ours[0] == pytest.approx(average_precision_score(labels, scores[:, 0]))  # all tied: prevalence
    assert ours[1] == pytest.approx(1.0)
    assert ours[2] == pytest.approx(average_precision_score(labels, scores[:, 2]))


def test_float16_responses_as_stored():
    rng = np.random.default_rng(7)
    scores = rng.normal(size=(300, 50)).astype(np.float16).astype(np.float32)
    labels = rng.random(300) < 0.2
    ours = average_precision(torch.from_numpy(scores), torch.from_numpy(labels)).numpy()
    reference = [average_precision_score(labels, scores[:, u]) for u in range(50)]
    np.testing.assert_allclose(ours, reference, atol=1e-7)


def test_no_positive_is_an_error():
    with pytest.raises(ValueError):
        average_precision(torch.zeros(4, 2), torch.zeros(4, dtype=torch.bool))


def test_shared_sort_with_excluded_prompts_matches_sklearn_per_relation():
    """One sort serves several relations, each counting only its own prompts."""
    from neuronmap.maths.expertise import average_precision_many
    rng = np.random.default_rng(3)
    n, units, relations = 120, 25, 4
    scores = np.round(rng.normal(size=(n, units)) * 3) / 3  # ties
    owner = rng.integers(0, relations, n)  # each prompt is a positive of its own relation only
    positive = owner[:, None] == np.arange(relations)
    included = positive | (rng.random((n, relations)) < 0.5)
    ours = average_precision_many(torch.from_numpy(scores.astype(np.float32)), torch.from_numpy(positive),
                                  torch.from_numpy(included)).numpy()
    for r in range(relations):
        rows = included[:, r]
        reference = [average_precision_score(positive[rows, r], scores[rows, u]) for u in range(units)]
        np.testing.assert_allclose(ours[r], reference, atol=1e-7)


def test_separation_is_the_standardized_difference_of_means():
    from neuronmap.maths.expertise import separation
    rng = np.random.default_rng(3)
    on, off = rng.normal(1.0, 2.0, (30, 5)), rng.normal(0.0, 1.0, (70, 5))
    expected = (on.mean(0) - off.mean(0)) / np.sqrt((on.var(0) + off.var(0)) / 2)
    np.testing.assert_allclose(separation(torch.from_numpy(on), torch.from_numpy(off)).numpy(), expected)
    constant = separation(torch.ones(4, 2), torch.tensor([[0.0, 1.0]] * 3))
    assert constant.tolist() == [float("inf"), 0.0]


def test_ranks_follow_ap_then_separation_then_position():
    import polars as pl
    from neuronmap.maths.expertise import top_ties
    from neuronmap.stats.expertise import rank_units
    scores = pl.DataFrame({
        "site": ["up", "gate", "gate", "act", "act", "down"], "layer": [0, 1, 1, 2, 0, 0],
        "unit": [0, 5, 4, 1, 1, 9], "ap": [1.0, 1.0, 0.5, 1.0, 1.0, 0.9],
        "separation": [2.0, 3.0, 9.0, 2.0, 2.0, 1.0], "on_p50": [0.0] * 6, "on_p90": [0.0] * 6, "off_mean": [0.0] * 6},
        schema_overrides={"layer": pl.Int32, "unit": pl.Int32, "on_p50": pl.Float32, "on_p90": pl.Float32,
                          "off_mean": pl.Float32})
    ranked = rank_units(scores)
    assert ranked.select("site", "layer", "unit").rows() == [
        ("gate", 1, 5), ("act", 0, 1), ("act", 2, 1), ("up", 0, 0), ("down", 0, 9), ("gate", 1, 4)]
    assert ranked["rank"].to_list() == list(range(1, 7))
    assert rank_units(scores.reverse()).equals(ranked)  # the input's order plays no part
    assert top_ties(ranked) == {"at_top_ap": 4, "unresolved": 3}
