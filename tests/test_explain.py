"""The explain stage's parts on fabricated data: activations read by hooks, the excerpts, the
planted-rule acceptance test of the scoring, the control's derangement, the journal's resume,
the unit selection and the summary."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch

from neuronmap.errors import NeuronmapError
from neuronmap.explain.activations import sample_contexts, scoring_half, unit_values
from neuronmap.explain.backends import Completion
from neuronmap.explain.examples import Excerpt, unit_examples
from neuronmap.explain.explainers import baseline_explanation, clean_explanation, explain_conversation, load_template
from neuronmap.explain.job import controls, explain_units, score_units
from neuronmap.explain.journal import Journal
from neuronmap.explain.scoring import (Judgement, TokenScorer, derangement, detection, quoted_tokens, rank_auc, score,
                                       yes_probability)
from neuronmap.explain.select import select_units, shard_rows
from neuronmap.explain.settings import ExplainSettings
from neuronmap.maths.explain_scores import score_summary
from neuronmap.io import tables


class WordTokenizer:
    """Token i decodes to " w<i>"; 1 is a special token (BOS), 0 the pad."""
    pad_token_id = 0
    all_special_ids = [1]

    def decode(self, ids):
        return "".join(f" w{i}" for i in ids)


def contexts_table(rows: int, tokens: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    ids = [[1, *rng.integers(2, 97, tokens - 1).tolist()] for _ in range(rows)]
    return pl.DataFrame({"context_id": list(range(rows)), "document": [f"doc.txt:{i // 2}" for i in range(rows)],
                         "n_tokens": [len(t) for t in ids], "token_ids": ids},
                        schema={"context_id": pl.Int64, "document": pl.String, "n_tokens": pl.Int32,
                                "token_ids": pl.List(pl.Int32)})


def settings(**changes) -> ExplainSettings:
    return ExplainSettings.defaults(**changes)


def test_unit_values_are_the_sites_columns(tiny_llama):
    """The hooks keep exactly the selected units' per-token values (special tokens and padding
    NaN), also for units of the last layer and when the pass stops early."""
    contexts = contexts_table(5, 9)
    cut = [ids[:n] for ids, n in zip(contexts["token_ids"].to_list(), [9, 4, 9, 6, 9])]
    contexts = contexts.with_columns(pl.Series("token_ids", cut, pl.List(pl.Int32)),
                                     pl.Series("n_tokens", [len(c) for c in cut], pl.Int32))
    units = pl.DataFrame({"site": ["gate", "act", "down"], "layer": [0, 1, 1], "unit": [3, 7, 5]},
                         schema={"site": pl.String, "layer": pl.Int32, "unit": pl.Int32})
    got = unit_values(tiny_llama, contexts, units, batch_size=2, pad_id=0, special_ids=[1])
    seen = {}
    mlps = [layer.mlp for layer in tiny_llama.model.layers]
    hooks = [mlps[0].gate_proj.register_forward_hook(lambda m, a, o: seen.setdefault("gate", o)),
             mlps[1].down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("act", a[0])),
             mlps[1].down_proj.register_forward_hook(lambda m, a, o: seen.setdefault("down", o))]
    try:
        for i, ids in enumerate(contexts["token_ids"].to_list()):
            seen.clear()
            with torch.inference_mode():
                tiny_llama(input_ids=torch.tensor([ids]))
            for j, (site, unit) in enumerate([("gate", 3), ("act", 7), ("down", 5)]):
                want = seen[site][0, :, unit].numpy()
                np.testing.assert_allclose(got.values[i, 1:len(ids), j], want[1:], rtol=1e-4, atol=1e-5)
                assert np.isnan(got.values[i, 0, j]) and np.isnan(got.values[i, len(ids):, j]).all()
                assert got.peaks[i, j] == pytest.approx(want[1:].max(), rel=1e-4, abs=1e-5)
    finally:
        for h in hooks:
            h.remove()


def test_halves_are_stable_and_split_by_document():
    sample = sample_contexts(contexts_table(40, 5), 30, seed=3)
    assert sample.height == 30 and sample["context_id"].is_sorted()
    halves = sample.group_by("document").agg(pl.col("scoring").n_unique())
    assert (halves["scoring"] == 1).all()  # a document's contexts are all on one side
    assert scoring_half("doc.txt:3", 3) == scoring_half("doc.txt:3", 3)
    assert 0 < sample["scoring"].sum() < 30


def planted(n_contexts: int, rule_token: int, seed: int):
    """Contexts of random tokens; the unit's value is 5 on `rule_token`, noise elsewhere."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 60, (n_contexts, 16))
    ids[rng.random(n_contexts) < 0.3, 8] = rule_token  # 30% of contexts hold the token
    values = rng.normal(0, 0.3, ids.shape).astype(np.float32)
    values[ids == rule_token] = 5.0
    return ids, values


def test_planted_rule_scores_high_and_shuffled_explanations_chance():
    """Acceptance: units that fire on a known token get a high score for the true rule, and the
    shuffled control (another unit's rule) scores at chance."""
    s = settings(score_contexts=10)
    decode = WordTokenizer().decode
    scorer, scores = TokenScorer(), {"true": [], "shuffled": []}
    rules = list(range(60, 90))
    perm = derangement(len(rules), seed=1)
    for k, token in enumerate(rules):
        ids, values = planted(400, token, seed=k)
        peaks, positions = values.max(1), values.argmax(1)
        scoring = np.arange(400) % 2 == 1
        ex = unit_examples(values, peaks, positions, ids.tolist(), np.arange(400), scoring, s,
                           lambda t: decode([t]), np.random.default_rng(k))
        assert all(e.context_id % 2 == 1 for e in ex.activating + ex.non_activating)  # held out only
        assert all(e.context_id % 2 == 0 for e in ex.shown)
        assert baseline_explanation(ex.shown) .startswith(f'the tokens "w{token}"')
        scores["true"].append(score(scorer, f'fires on "w{token}"', ex.activating, ex.non_activating))
        scores["shuffled"].append(score(scorer, f'fires on "w{rules[perm[k]]}"', ex.activating, ex.non_activating))
    true = np.mean([d.balanced_accuracy for d in scores["true"]])
    shuffled = np.mean([d.balanced_accuracy for d in scores["shuffled"]])
    assert true == 1.0
    assert abs(shuffled - 0.5) < 0.05


def test_excerpts_highlight_activating_tokens():
    ex = Excerpt(7, 5.0, (" the", " cat", " sat"), (False, True, False))
    assert ex.text(highlight=True) == "the <<cat>> sat"
    assert ex.text(highlight=False) == "the cat sat"
    conv = explain_conversation(load_template(None, "explain.txt"), [ex])
    assert conv[0]["role"] == "system" and "1. the <<cat>> sat" in conv[1]["content"]


def test_custom_template_needs_its_separator(tmp_path):
    bad = tmp_path / "t.txt"
    bad.write_text("no separator here {examples}")
    with pytest.raises(NeuronmapError, match="---"):
        load_template(str(bad), "explain.txt")
    with pytest.raises(NeuronmapError, match="missing.txt"):
        load_template(str(tmp_path / "missing.txt"), "explain.txt")


def judged(*matches):
    return [Judgement(m, float(m)) for m in matches]


def test_detection_rates_and_quotes():
    d = detection(judged(True, True, False, True), judged(False, True))
    assert (d.contexts, d.activating) == (6, 4)
    assert d.true_positive_rate == 0.75 and d.true_negative_rate == 0.5 and d.balanced_accuracy == 0.625
    assert d.auc == 0.625  # yes/no scores: the AUC is the balanced accuracy
    assert np.isnan(detection([], judged(False)).balanced_accuracy) and np.isnan(detection([], judged(False)).auc)
    assert quoted_tokens('the tokens "Der", “und” and <<Haus>>') == {"der", "und", "haus"}
    assert clean_explanation("\nExplanation: German articles.\nMore") == "German articles."


def test_auc_against_sklearn():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(3)
    for _ in range(20):
        pos, neg = rng.integers(0, 5, rng.integers(1, 9)) / 4, rng.integers(0, 5, rng.integers(1, 9)) / 4
        truth = [1] * len(pos) + [0] * len(neg)
        assert rank_auc(list(pos), list(neg)) == pytest.approx(roc_auc_score(truth, [*pos, *neg]))


def test_a_scorer_that_always_says_no_still_ranks_by_its_odds():
    """The embedded model answers "no" to every excerpt: balanced accuracy 0.5, yet its odds of
    "yes" can still tell activating excerpts from the others."""
    odds = {"active": [-1.0, -1.5], "quiet": [-3.0, -2.5]}  # log P(yes); P(no) = 0.5 throughout

    def answer(logp_yes):
        return Judgement(False, yes_probability(((" No", math.log(0.5)), ("Yes", logp_yes), ("yes", -9.0)), False))
    d = detection([answer(x) for x in odds["active"]], [answer(x) for x in odds["quiet"]])
    assert d.balanced_accuracy == 0.5 and d.auc == 1.0
    assert yes_probability(None, True) == 1.0 and yes_probability((("maybe", -0.1),), False) == 0.0


@pytest.mark.parametrize("n", [2, 3, 10, 51])
def test_derangement_moves_every_unit(n):
    perm = derangement(n, seed=4)
    assert sorted(perm) == list(range(n)) and all(p != i for i, p in enumerate(perm))
    assert perm == derangement(n, seed=4)


class CountingExplainer:
    """A TextModel that records what it is asked, and fails after `fail_after` conversations (a
    job killed while explaining)."""
    name = "fake"

    def __init__(self, fail_after=None):
        self.asked, self.fail_after = [], fail_after

    def complete(self, conversations, max_tokens):
        if self.fail_after is not None and len(self.asked) + len(conversations) > self.fail_after:
            raise KeyboardInterrupt("killed")
        self.asked += [c[1]["content"] for c in conversations]
        return [Completion(f'fires on "w{len(self.asked)}"', 10, 3) for _ in conversations]


def schema_of(schema: pa.Schema) -> pl.Schema:
    return pl.from_arrow(schema.empty_table()).schema


def unit_frame(rows):
    return pl.DataFrame(rows, schema={"site": pl.String, "layer": pl.Int32, "unit": pl.Int32}, orient="row")


def test_killed_job_resumes_without_asking_again(tiny_llama, tmp_path):
    """Acceptance: a job killed mid-way, run again, asks the explainer only about the units it had
    not finished, and writes the tables an uninterrupted job writes."""
    units = unit_frame([("gate", 0, 1), ("gate", 1, 2), ("up", 2, 3), ("act", 2, 4), ("down", 1, 5)])
    contexts = contexts_table(24, 10)
    s = settings(batch_size=2, contexts=24)
    template = load_template(None, "explain.txt")
    header = {"settings": s.to_json()}
    journal_path = tmp_path / "explain-0.jsonl"
    with pytest.raises(KeyboardInterrupt):
        explain_units(units, contexts, tiny_llama, WordTokenizer(), CountingExplainer(fail_after=2), template, s,
                      Journal(journal_path, header))
    # The first batch (2 units) was journalled before the kill; a partial last line is ignored.
    with journal_path.open("a") as out:
        out.write('{"key": "gate/9/9", "explan')
    again = CountingExplainer()
    explanations, sets = explain_units(units, contexts, tiny_llama, WordTokenizer(), again, template, s,
                                       Journal(journal_path, header))
    assert len(again.asked) == 3
    clean = CountingExplainer()
    want, want_sets = explain_units(units, contexts, tiny_llama, WordTokenizer(), clean, template, s,
                                    Journal(tmp_path / "clean.jsonl", header))
    assert clean.asked[2:] == again.asked  # the same prompts for the units left
    assert explanations.drop("explanation").equals(want.drop("explanation"))
    assert sets.equals(want_sets)
    assert explanations.schema == schema_of(tables.EXPLANATIONS)
    assert sets.schema == schema_of(tables.EXPLAIN_SETS)
    assert explanations.height == 10 and set(explanations["explainer"]) == {"baseline", "model"}
    # Run again on a complete journal: nothing is asked, nothing forwarded.
    done = CountingExplainer(fail_after=0)
    explain_units(units, contexts, None, WordTokenizer(), done, template, s, Journal(journal_path, header))
    # A journal of other settings is not reused.
    fresh = CountingExplainer()
    explain_units(units, contexts, tiny_llama, WordTokenizer(), fresh, template, dataclasses.replace(s, window=3),
                  Journal(journal_path, {"settings": "other"}))
    assert len(fresh.asked) == 5


def test_scores_with_control_and_resume(tiny_llama, tmp_path):
    units = unit_frame([("gate", 0, 1), ("gate", 1, 2), ("up", 2, 3)])
    s = settings(batch_size=4, contexts=40, score_contexts=4)
    explanations, sets = explain_units(units, contexts_table(40, 12), tiny_llama, WordTokenizer(), CountingExplainer(),
                                       load_template(None, "explain.txt"), s, Journal(tmp_path / "e.jsonl", {}))
    control = controls(units, explanations, seed=0)
    assert all(whose != key for key, (_, whose) in control.items()) and len(control) == 3
    scores = score_units(units, explanations, sets, control, TokenScorer(), Journal(tmp_path / "s.jsonl", {}))
    assert scores.schema == schema_of(tables.EXPLAIN_SCORES)
    assert scores.group_by("explainer").len().sort("explainer")["len"].to_list() == [3, 3, 3]
    own = scores.filter(pl.col("explainer") != "shuffled")
    assert (own["explanation_of"] == own["site"] + "/" + own["layer"].cast(str) + "/" + own["unit"].cast(str)).all()

    class Refuses(TokenScorer):
        def judge(self, explanation, excerpts):
            raise AssertionError("asked again")
    again = score_units(units, explanations, sets, control, Refuses(), Journal(tmp_path / "s.jsonl", {}))
    assert again.equals(scores)


def test_select_units_caps_each_label():
    label_units = pl.DataFrame({
        "method": ["lape"] * 5 + ["ap"], "label": ["de", "de", "de", "en", "en", "de"],
        "site": ["gate"] * 6, "layer": [3, 1, 2, 1, 5, 9], "unit": [1, 2, 3, 2, 4, 9],
        "score": [0.1] * 6, "rank": [1, 2, 3, 1, 2, 1]})
    got = select_units("labels", 2, 0, ("gate",), label_units=label_units)
    assert got.rows() == [("gate", 1, 2, "de"), ("gate", 3, 1, "de"), ("gate", 5, 4, "en")]
    assert select_units("labels:ap", None, 0, ("gate",), label_units=label_units).height == 1
    assert shard_rows(got, 0, 2).height + shard_rows(got, 1, 2).height == 3
    with pytest.raises(NeuronmapError, match="none of"):
        select_units("best", 2, 0, ("gate",))


def test_select_top_and_all(tmp_path):
    path = tmp_path / "units.parquet"
    pl.DataFrame({"site": ["gate"] * 4 + ["up"], "layer": [0, 0, 1, 1, 0], "unit": [0, 1, 0, 1, 0],
                  "max": [1.0, 4.0, 3.0, 2.0, 9.0]}).write_parquet(path)
    top = select_units("top:max", 2, 0, ("gate",), corpus_units=path)
    assert top.select("layer", "unit").rows() == [(0, 1), (1, 0)]
    assert select_units("all", 3, 0, ("gate",), corpus_units=path).height == 3
    with pytest.raises(NeuronmapError, match="no numeric column"):
        select_units("top:nope", 2, 0, ("gate",), corpus_units=path)


def test_summary_pairs_units():
    rows = []
    for u in range(20):
        for explainer, ba in (("model", 0.8), ("baseline", 0.7), ("shuffled", 0.5)):
            rows.append({"site": "gate", "layer": 0, "unit": u, "explainer": explainer,
                         "balanced_accuracy": ba + (0.01 * (u % 3))})
    table = score_summary(pl.DataFrame(rows), resamples=200, seed=1)
    by = {r["comparison"]: r for r in table.iter_rows(named=True)}
    assert by["model"]["units"] == 20 and by["model - shuffled"]["mean"] == pytest.approx(0.3)
    assert by["model - baseline"]["ci_low"] == pytest.approx(0.1) and by["baseline - shuffled"]["ci_high"] == pytest.approx(0.2)


def test_report_section_shows_the_scores_against_the_control(tmp_path):
    from pathlib import Path
    from types import SimpleNamespace

    from neuronmap.config.schema import validated
    from neuronmap.io.parquet import write_table
    from neuronmap.report.build import explain_section
    from neuronmap.report.page import Page
    key = {"site": ["gate"] * 4, "layer": [1] * 4, "unit": [1, 1, 2, 2]}
    explanations = pl.DataFrame({**key, "explainer": ["baseline", "model"] * 2,
                                 "explanation": ['"a"', "German", '"b"', "Spanish"], "prompt_tokens": [0, 9, 0, 9],
                                 "completion_tokens": [0, 3, 0, 3]})
    scores = pl.DataFrame({"site": ["gate"] * 6, "layer": [1] * 6, "unit": [1, 1, 1, 2, 2, 2],
                           "explainer": ["baseline", "model", "shuffled"] * 2, "explanation_of": ["gate/1/1"] * 6,
                           "scorer": ["tokens"] * 6, "contexts": [4] * 6, "activating": [2] * 6,
                           "true_positive_rate": [1.0] * 6, "true_negative_rate": [0.5] * 6,
                           "balanced_accuracy": [0.75, 1.0, 0.5, 0.5, 0.75, 0.5],
                           "auc": [0.8, 1.0, 0.4, 0.6, 0.75, 0.5]})
    write_table(explanations, tmp_path / "e.parquet", tables.EXPLANATIONS)
    write_table(scores, tmp_path / "s.parquet", tables.EXPLAIN_SCORES)
    config = validated({"corpus": {"path": "data/corpus/fortunes"}, "explain": {"enabled": True}})
    corpus = SimpleNamespace(config=config, inputs=SimpleNamespace(explanations=Path(tmp_path / "e.parquet"),
                                                                   explain_scores=Path(tmp_path / "s.parquet")))
    page = Page("t")
    explain_section(page, corpus)
    text = page.render({"atlas": None, "config_sha256": "x"})
    assert "Explanations" in text and "model - shuffled" in text and "Spanish" in text
