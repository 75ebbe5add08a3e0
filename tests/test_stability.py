"""Split-half stability (stats/stability.py): halves dealt by fact, a planted relation's
selection reproduces and a relation without units does not, and on noise the overlap's
p-value has its nominal false-positive rate."""

import numpy as np
import polars as pl
import pytest
import scipy.stats

from neuronmap.errors import NeuronmapError
from neuronmap.io import tables
from neuronmap.stats import stability as S
from neuronmap.stats.expertise import choose_prompts
from neuronmap.stats.labelings import ranked, score_values


def synthetic_prompts(facts: dict[str, int], templates: int = 1) -> pl.DataFrame:
    rows = [(f"{r}/{i:05d}/t{t}", r, "identification") for r, n in facts.items() for i in range(n)
            for t in range(templates)]
    return pl.DataFrame(rows, schema=["prompt_id", "relation", "split"], orient="row")


def stability(values: np.ndarray, prompts: pl.DataFrame, top_k, splits=1, layers=2) -> pl.DataFrame:
    relations = sorted(prompts["relation"].unique().to_list())
    chosen = {r: choose_prompts(prompts, r, 4, 0) for r in relations}
    groups = S.half_labelings(prompts, chosen, 0, splits)
    blocks = dict(enumerate(np.split(values, layers, axis=1)))
    scored = score_values(lambda site, layer: blocks[layer], [("up", layer) for layer in blocks],
                          prompts["prompt_id"].to_list(), groups, max(top_k))
    positives = {(lab.relation, lab.draw, lab.half): len(lab.positives) for group in groups for lab in group}
    return S.stability_table(ranked(scored, ["draw", "half", "relation"]), positives, top_k)


def test_halves_keep_a_facts_prompts_together_and_share_no_prompt():
    prompts = synthetic_prompts({"A": 9, "B": 12, "C": 7}, templates=3)
    chosen = {r: choose_prompts(prompts, r, 4, 0) for r in ("A", "B", "C")}
    (group,) = S.half_labelings(prompts, chosen, 0, 1)
    halves = S.fact_halves(prompts, 0, 0)
    assert sorted(sum(h == 0 for f, h in halves.items() if f.startswith(r)) for r in "ABC") == [3, 4, 6]
    for relation in "ABC":
        first, second = [lab for lab in group if lab.relation == relation]
        assert not set(first.positives + first.negatives) & set(second.positives + second.negatives)
        assert len(first.positives) + len(second.positives) == prompts.filter(pl.col("relation") == relation).height
        for lab in (first, second):
            assert {halves[pid.rsplit("/", 1)[0]] for pid in lab.positives + lab.negatives} == {lab.half}
    assert S.fact_halves(prompts, 1, 0) != halves  # another split deals again


def test_a_relation_of_one_fact_cannot_be_halved():
    with pytest.raises(NeuronmapError, match="halves need 2"):
        S.fact_halves(synthetic_prompts({"A": 1, "B": 4}), 0, 0)


def test_a_planted_selection_reproduces_and_noise_does_not():
    """A has 40 units that respond to it; B none: A's halves agree on nearly all 40, B's no more
    than two random sets of 40 units out of 800 would (2 expected)."""
    rng = np.random.default_rng(0)
    prompts = synthetic_prompts({"A": 60, "B": 60, "C": 60})
    values = rng.normal(size=(prompts.height, 800)).astype(np.float32)
    values[(prompts["relation"] == "A").to_numpy()[:, None] & (np.arange(800) < 40)] += 1.5
    table = stability(values, prompts, [40])
    assert table.schema == pl.from_arrow(tables.STABILITY.empty_table()).schema
    a, b = (table.filter(pl.col("relation") == r).row(0, named=True) for r in "AB")
    assert a["fraction"] > 0.9 and a["p_value"] < 1e-50 and a["positives_a"] + a["positives_b"] == 60
    assert a["expected_independent"] == pytest.approx(2.0)
    assert b["fraction"] < 0.25 and b["p_value"] > 1e-3
    assert a["ap_spearman"] > b["ap_spearman"]


def test_false_positive_rate_on_noise():
    """300 noise datasets (exchangeable units: two halves' top-k are then independent random
    sets): the overlap's hypergeometric p < 0.05 at most at the binomial 99% interval's top of
    0.05, and the rate is within that interval of the test's attained size (the hypergeometric
    is discrete)."""
    rng = np.random.default_rng(3)
    datasets, alpha, units, k = 300, 0.05, 400, 40
    prompts = synthetic_prompts({"A": 30, "B": 30})
    from neuronmap.maths.significance import hypergeometric_tail
    critical = next(s for s in range(k + 1) if hypergeometric_tail(s, units, k, k) < alpha)
    size = hypergeometric_tail(critical, units, k, k)
    hits = 0
    for _ in range(datasets):
        table = stability(rng.normal(size=(prompts.height, units)).astype(np.float32), prompts, [k])
        hits += table.filter(pl.col("relation") == "A")["p_value"].item() < alpha
    low, high = scipy.stats.binom.interval(0.99, datasets, size)
    assert size <= alpha and low <= hits <= high


def test_every_column_is_documented():
    """docs/parquet.md's section on `stability.parquet` names every column of tables.STABILITY."""
    from conftest import REPO
    documented = (REPO / "docs" / "parquet.md").read_text().split("## `stability.parquet`")[1].split("\n## ")[0]
    for column in tables.STABILITY.names:
        assert f"`{column}`" in documented, column
