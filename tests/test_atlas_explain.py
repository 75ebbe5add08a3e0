"""The atlas where the explain stage ran, from hand-made explain tables: the index's explanation
columns against a reference computed here, the search by words in the explanations, the sort by
score, and the card's explanations with the shuffled control (over HTTP as well)."""

import json
import math
import threading
import urllib.parse
import urllib.request

import polars as pl
import pyarrow.parquet as pq
import pytest

from neuronmap import cli
from neuronmap.atlas.server import Atlas, make_server, url_of
from neuronmap.io import tables
from neuronmap.io.parquet import write_table

from report_browser import browser, unavailable_reason
from test_atlas_server import tiny_run

# (unit, model's explanation or None, baseline's, model's scores by scorer, baseline's scores by scorer)
EXPLAINED = [
    (("act", 0, 1), "Capital cities of Europe", "' Paris', ' Rome'", {"tokens": 0.9}, {"tokens": 0.7}),
    (("act", 1, 3), "Past tense verbs", "'ed'", {"tokens": 0.6, "judge": 0.8}, {"tokens": 0.55}),
    (("up", 0, 0), None, "' the' after 'of'", {}, {"tokens": 0.5}),  # explainer backend none
    (("up", 0, 5), "  ", "'Berlin'", {"tokens": 0.99}, {"tokens": 0.65}),  # an empty answer: the baseline's
    (("up", 1, 7), "German words in European texts", "'und'", {"tokens": float("nan")}, {"tokens": 0.6}),
    (("act", 1, 6), "Numbers", "'1', '2'", {}, {}),  # not scored
]
# The shuffled control: each scored unit's score on another unit's explanation.
SHUFFLED = {("act", 0, 1): (("act", 1, 3), 0.52), ("act", 1, 3): (("up", 1, 7), 0.48),
            ("up", 1, 7): (("act", 0, 1), 0.5)}


def name(key):
    return "/".join(map(str, key))


def explain_tables(run):
    texts, scores = [], []
    for key, model, baseline, model_scores, baseline_scores in EXPLAINED:
        unit = dict(zip(("site", "layer", "unit"), key))
        for explainer, text in (("model", model), ("baseline", baseline)):
            if text is not None:
                texts.append({**unit, "explainer": explainer, "explanation": text, "prompt_tokens": 10,
                              "completion_tokens": 3})
        for explainer, by_scorer in (("model", model_scores), ("baseline", baseline_scores)):
            for scorer, accuracy in by_scorer.items():
                scores.append({**unit, "explainer": explainer, "explanation_of": name(key), "scorer": scorer,
                               "contexts": 12, "activating": 6, "true_positive_rate": accuracy,
                               "true_negative_rate": accuracy, "balanced_accuracy": accuracy, "auc": accuracy})
        if key in SHUFFLED:
            other, accuracy = SHUFFLED[key]
            scores.append({**unit, "explainer": "shuffled", "explanation_of": name(other), "scorer": "tokens",
                           "contexts": 12, "activating": 6, "true_positive_rate": accuracy,
                           "true_negative_rate": accuracy, "balanced_accuracy": accuracy, "auc": accuracy})
    (run / "explain").mkdir()
    write_table(pl.DataFrame(texts), run / "explain" / "explanations.parquet", tables.EXPLANATIONS)
    write_table(pl.DataFrame(scores), run / "explain" / "scores.parquet", tables.EXPLAIN_SCORES)


def expected_columns():
    """Per explained unit, the four index columns, computed the plain way."""
    out = {}
    for key, model, baseline, model_scores, baseline_scores in EXPLAINED:
        mean = (lambda s: sum(s.values()) / len(s) if s else None)
        use_model = model is not None and model.strip() != ""
        out[key] = {"explanation": model if use_model else baseline,
                    "explanation_score": mean(model_scores) if use_model else mean(baseline_scores),
                    "baseline_explanation": baseline, "baseline_score": mean(baseline_scores)}
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tiny_run(tmp_path_factory.mktemp("explained"))
    explain_tables(run)
    assert cli.main(["atlas-index", "--run", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def atlas(run):
    return Atlas(run)


def get(atlas, target):
    status, _, body = atlas.answer(target)
    return status, json.loads(body)


def same(a, b):
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) or (
        a is None and isinstance(b, float) and math.isnan(b)) or (b is None and isinstance(a, float) and math.isnan(a))


def test_index_columns(run):
    path = run / "atlas" / "units.parquet"
    assert pq.read_schema(path).remove_metadata() == tables.atlas_units([], [], explained=True)
    assert json.loads(pq.read_schema(path).metadata[b"neuronmap.atlas"])["explained"] is True
    index = pl.read_parquet(path)
    expected = expected_columns()
    for row in index.iter_rows(named=True):
        key = (row["site"], row["layer"], row["unit"])
        want = expected.get(key, dict.fromkeys(("explanation", "explanation_score", "baseline_explanation",
                                                "baseline_score")))
        for column, value in want.items():
            assert same(row[column], value), (key, column, row[column], value)
    # The same index from the files given one by one, as the rule gives them.
    out = run / "atlas" / "by-rule.parquet"
    assert cli.main(["atlas-index", "--neuron-stats", str(run / "neuron_stats.parquet"), "--units", "--examples",
                     "--peak-tokens", "--decoded", "--expertise", "--label-records", "--label-units",
                     "--label-expertise", "--explanations", str(run / "explain" / "explanations.parquet"),
                     "--explain-scores", str(run / "explain" / "scores.parquet"), "--out", str(out)]) == 0
    assert pl.read_parquet(out).equals(index)


def test_search_by_words_and_sort_by_score(atlas):
    def keys(query):
        status, page = get(atlas, f"/api/units?{query}&limit=1000")
        assert status == 200, page
        return [tuple(r[:3]) for r in page["rows"]]

    assert keys("explanation=EUROPE") == [("act", 0, 1), ("up", 1, 7)]  # any case, inside a word too
    assert keys("explanation=" + urllib.parse.quote("texts GERMAN")) == [("up", 1, 7)]
    assert keys("explanation=" + urllib.parse.quote("' the'")) == [("up", 0, 0)]  # the baseline's text too
    assert keys("explanation=berlin") == [("up", 0, 5)]
    assert keys("explanation=nothing%20like%20this") == []
    expected = expected_columns()
    scored = sorted((k for k, v in expected.items() if v["explanation_score"] is not None
                     and not math.isnan(v["explanation_score"])), key=lambda k: (-expected[k]["explanation_score"], k))
    assert keys("sort=explanation_score&desc=1")[:len(scored)] == scored
    assert keys("filter=explanation_score:0.6:") == sorted(k for k in scored if expected[k]["explanation_score"] >= 0.6)
    status, page = get(atlas, "/api/units?sort=baseline_score&limit=3")
    assert status == 200 and page["columns"][-4:] == ["explanation", "explanation_score", "baseline_explanation",
                                                      "baseline_score"]
    assert get(atlas, "/api/columns")[1]["explained"] is True


def test_card_shows_both_explanations_and_the_control(atlas):
    status, card = get(atlas, "/api/unit/act/1/3")
    assert status == 200
    rows = [(e["explainer"], e["explanation"], e["explanation_of"], e["scorer"], e["balanced_accuracy"])
            for e in card["explanations"]]
    assert rows == [("model", "Past tense verbs", "act/1/3", "judge", 0.8),
                    ("model", "Past tense verbs", "act/1/3", "tokens", 0.6),
                    ("baseline", "'ed'", "act/1/3", "tokens", 0.55),
                    ("shuffled", "German words in European texts", "up/1/7", "tokens", 0.48)]
    assert card["row"]["explanation_score"] == pytest.approx(0.7)
    # Not scored: the explanations with null scores; a NaN score goes out as null.
    assert [(e["explainer"], e["balanced_accuracy"]) for e in get(atlas, "/api/unit/act/1/6")[1]["explanations"]] \
        == [("model", None), ("baseline", None)]
    assert get(atlas, "/api/unit/up/1/7")[1]["explanations"][0]["balanced_accuracy"] is None
    assert get(atlas, "/api/unit/up/0/2")[1]["explanations"] == []  # a unit not explained


def test_over_http(atlas):
    server = make_server(atlas, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page = json.loads(urllib.request.urlopen(url_of(server) + "api/units?explanation=verbs", timeout=30).read())
        assert page["total"] == 1 and page["rows"][0][:3] == ["act", 1, 3]
    finally:
        server.shutdown()
        server.server_close()


def test_a_run_without_explanations(tmp_path):
    atlas = Atlas(tiny_run(tmp_path))
    status, body = get(atlas, "/api/units?explanation=anything")
    assert status == 400 and "explanation" in body["error"]
    assert "explanation" not in atlas.index.columns and get(atlas, "/api/unit/act/0/0")[1]["explanations"] is None


@pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or "")
def test_page_searches_explanations_and_shows_them(atlas):
    server = make_server(atlas, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    errors = []
    try:
        with browser() as context:
            page = context.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "assert", "warning") else None)
            page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
            page.goto(url_of(server))
            page.wait_for_selector("body[data-ready]", state="attached", timeout=30_000)
            headers = page.eval_on_selector_all("#units th", "ths => ths.map(t => t.dataset.column)")
            assert headers[3:5] == ["explanation", "explanation_score"]  # no peak or decoded tokens here
            page.select_option("#search-in", "explanation")
            page.fill("#search", "europe")
            page.press("#search", "Enter")
            page.wait_for_selector('#units[data-query*="explanation=europe"]', timeout=30_000)
            rows = page.eval_on_selector_all("#units tbody tr", "rows => rows.map(r => r.dataset.unit)")
            assert rows == ["act/0/1", "up/1/7"]
            page.click('#units tbody tr[data-unit="act/0/1"]')
            page.wait_for_selector('#card[data-loaded][data-unit="act/0/1"]', timeout=30_000)
            texts = page.eval_on_selector_all("#card span.explanation", "nodes => nodes.map(x => x.textContent)")
            assert texts == ["Capital cities of Europe", "' Paris', ' Rome'", "Past tense verbs (of act/1/3)"]
    finally:
        server.shutdown()
        server.server_close()
    assert errors == []
