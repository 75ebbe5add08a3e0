"""The report's numbers and atlas payload, checked against hand-made inputs and independent
computations (numpy, sets, the model's own tokenizer)."""

import hashlib
import json

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from neuronmap.ablate.sweep import paired_table, sweep_table
from neuronmap.errors import NeuronmapError
from neuronmap.io import tables
from neuronmap.report import data
from neuronmap.report.atlas import atlas_units, build_atlas, decoded_tokens, peak_span
from neuronmap.report.page import script_json


def significance_rows(rows):
    """Rows of significance.parquet: the accuracy columns, then the paired statistics (made up
    here except `difference`, `significant` and `p_value`, which the tests read)."""
    frame = pl.DataFrame(rows, schema={"ablated_relation": pl.String, "k": pl.Int64, "control": pl.String,
                                       "seed": pl.Int64, "eval_relation": pl.String, "n": pl.Int64,
                                       "correct": pl.Int64, "accuracy": pl.Float64, "baseline_accuracy": pl.Float64,
                                       "relative_drop": pl.Float64, "significant": pl.Boolean,
                                       "p_value": pl.Float64}, orient="row")
    return frame.with_columns(
        lost=pl.lit(0, pl.Int64), gained=pl.lit(0, pl.Int64),
        difference=pl.col("accuracy") - pl.col("baseline_accuracy"), ci_low=pl.lit(-0.1), ci_high=pl.lit(0.1), q_value=pl.col("p_value") * 2,
    ).select(tables.SIGNIFICANCE.names)


@pytest.fixture
def significance():
    # a: baseline 0.8; top 10 -> 0.4; random seeds 1, 2 -> 0.8, 0.6. b evaluated under a's ablation too.
    return significance_rows([
        ("a", 10, "top_k", None, "a", 10, 4, 0.4, 0.8, 0.5, False, 0.2),
        ("a", 10, "random", 1, "a", 10, 8, 0.8, 0.8, 0.0, False, 1.0),
        ("a", 10, "random", 2, "a", 10, 6, 0.6, 0.8, 0.25, False, 0.5),
        ("a", 10, "top_k", None, "b", 5, 5, 1.0, 0.5, -1.0, True, 0.01),
        ("a", 10, "random", 1, "b", 5, 2, 0.4, 0.5, 0.2, False, 0.9),
        ("a", 10, "random", 2, "b", 5, 3, 0.6, 0.5, -0.2, True, 0.02),
    ])


@pytest.fixture
def sweep(significance):
    return sweep_table(significance)


@pytest.fixture
def baseline():
    predictions = pl.DataFrame({"eval_relation": ["a"] * 10 + ["b"] * 4,
                                "correct": [True] * 8 + [False] * 2 + [True, True, False, False]})
    return data.baseline_accuracy(predictions)


def test_baseline_accuracy_counts_correct_predictions(baseline):
    assert baseline.rows() == [("a", 0.8, 10, 8), ("b", 0.5, 4, 2)]


def test_cumulativity_starts_at_baseline_and_spans_the_random_seeds(sweep, baseline):
    curve = data.cumulativity(sweep, baseline)
    rows = {(r["control"], r["k"]): r for r in curve.filter(pl.col("relation") == "a").to_dicts()}
    assert rows[("top_k", 0)]["accuracy"] == rows[("random", 0)]["accuracy"] == 0.8
    assert rows[("top_k", 10)]["accuracy"] == 0.4
    random = rows[("random", 10)]
    assert random["accuracy"] == pytest.approx(0.7)
    assert (random["accuracy_min"], random["accuracy_max"], random["seeds"]) == (0.6, 0.8, 2)
    # Only the relation's own units count for its curve: b was never ablated.
    assert curve["relation"].unique().to_list() == ["a"]


def test_recall_summary_has_one_column_per_condition(sweep, baseline):
    summary = data.recall_summary(baseline, data.cumulativity(sweep, baseline))
    assert summary.columns == ["relation", "test prompts", "baseline", "top 10", "random 10"]
    assert summary.row(0) == ("a", 10, 0.8, 0.4, pytest.approx(0.7))
    assert summary.row(1)[3] is None


def test_drop_cells_carry_the_random_control_and_the_mark(significance):
    cells = data.drop_cells(significance)
    assert cells.columns == ["ablated_relation", "eval_relation", "k", "relative_drop", "accuracy",
                             "baseline_accuracy", "n", "random_drop", "mark", "p_value", "q_value", "label"]
    b = cells.filter(pl.col("eval_relation") == "b").row(0, named=True)
    assert b["relative_drop"] == -1.0 and b["random_drop"] == pytest.approx(0.0) and b["label"] == "-1.0*"
    assert (b["p_value"], b["q_value"]) == (0.01, 0.02)
    a = cells.filter(pl.col("eval_relation") == "a").row(0, named=True)
    assert a["random_drop"] == pytest.approx(0.125) and a["label"] == "0.5"
    # Only the top-k ablation's own test marks a cell, not its random controls'.
    assert cells["label"].to_list() == ["0.5", "-1.0*"]


def test_drop_cells_read_the_numbers_paired_table_computes():
    """The report's drop matrix holds significance.parquet's accuracy and relative drop as they are."""
    predictions = pl.DataFrame({
        "ablated_relation": ["a"] * 8, "k": [1] * 8, "control": ["top_k"] * 4 + ["random"] * 4,
        "seed": [None] * 4 + [3] * 4, "prompt_id": ["p1", "p2", "q1", "q2"] * 2,
        "eval_relation": ["a", "a", "b", "b"] * 2, "correct": [False, True, True, False, True, True, False, False]},
        schema_overrides={"seed": pl.Int64})
    baseline = pl.DataFrame({"prompt_id": ["p1", "p2", "q1", "q2"], "correct": [True, True, True, False]})
    significance = paired_table(predictions, baseline, n_resamples=10)
    cells = data.drop_cells(significance)
    columns = ["ablated_relation", "eval_relation", "k", "relative_drop", "accuracy", "baseline_accuracy", "n"]
    top = significance.filter(pl.col("control") == "top_k").select(columns).sort("k", "ablated_relation",
                                                                                 "eval_relation")
    assert_frame_equal(cells.select(columns), top)
    assert cells["relative_drop"].to_list() == [0.5, 0.0]
    assert cells["random_drop"].to_list() == [0.0, 1.0]


def test_stage_times_sum_jobs_per_stage(tmp_path):
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for name, seconds, rss in (("extract/a-0", 2.5, 100), ("extract/a-1", 3.5, 300), ("overlap", 1.0, 50),
                               ("report", 9.0, 10)):
        path = tmp_path / f"{name}.tsv"
        path.parent.mkdir(exist_ok=True)
        path.write_text(header + f"{seconds}\t0:00:0{int(seconds)}\t{rss}\t1\t1\t1\t0\t0\t50\t{seconds / 2}\n")
    times = data.stage_times(tmp_path)
    assert times.rows() == [("extract", 2, 6.0, 3.0, 300.0), ("overlap", 1, 1.0, 0.5, 50.0)]
    assert data.stage_times(tmp_path / "none").height == 0


def test_config_digest_is_sha256_of_the_json_the_rule_passes():
    text = json.dumps({"run": "x", "top_k": [1, 2], "ablation": {"value": "zero", "clamp_value": 1e-05},
                       "name": "Brasília"}, sort_keys=True)
    assert data.config_digest(json.loads(text)) == hashlib.sha256(text.encode()).hexdigest()


def write_expertise(tmp_path, relations, n_units=60, seed=0):
    """Expertise tables over the same units, each relation with its own random ranking."""
    rng = np.random.default_rng(seed)
    keys = [(site, layer, unit) for site in ("gate", "down") for layer in range(3) for unit in range(n_units // 6)]
    paths, frames = {}, {}
    for relation in relations:
        order = rng.permutation(len(keys))
        ap = np.sort(rng.random(len(keys)))[::-1]
        frame = pl.DataFrame({"site": [keys[i][0] for i in order], "layer": [keys[i][1] for i in order],
                              "unit": [keys[i][2] for i in order], "ap": ap,
                              "on_p50": rng.random(len(keys)).astype(np.float32),
                              "on_p90": rng.random(len(keys)).astype(np.float32),
                              "off_mean": rng.random(len(keys)).astype(np.float32),
                              "rank": np.arange(1, len(keys) + 1)},
                             schema_overrides={"layer": pl.Int32, "unit": pl.Int32})
        paths[relation] = tmp_path / f"{relation}.parquet"
        frame.write_parquet(paths[relation])
        frames[relation] = frame
    return paths, frames


def test_atlas_is_the_union_of_each_relations_top_units(tmp_path):
    paths, frames = write_expertise(tmp_path, ["r1", "r2", "r3"])
    atlas = atlas_units(paths, 7)
    expected = set()
    for frame in frames.values():
        expected |= set(frame.filter(pl.col("rank") <= 7).select("site", "layer", "unit").iter_rows())
    assert set(atlas.select("site", "layer", "unit").iter_rows()) == expected and atlas.height == len(expected)
    for row in atlas.iter_rows(named=True):
        key = (row["site"], row["layer"], row["unit"])
        ranks = {}
        for relation, frame in frames.items():
            source = frame.filter((pl.col("site") == key[0]) & (pl.col("layer") == key[1])
                                  & (pl.col("unit") == key[2])).row(0, named=True)
            assert row[f"ap:{relation}"] == source["ap"] and row[f"rank:{relation}"] == source["rank"]
            ranks[relation] = source["rank"]
        assert row["best_rank"] == min(ranks.values()) and ranks[row["best_relation"]] == row["best_rank"]
    assert atlas["best_rank"].is_sorted()


def test_decoded_tokens_long_or_list_form():
    long = pl.DataFrame({"site": ["up"] * 6, "layer": [1] * 6, "unit": [5] * 6,
                         "direction": ["input"] * 3 + ["output"] * 3, "rank": [2, 1, 3, 1, 3, 2],
                         "token": ["b", "a", "c", "x", "z", "y"], "score": [0.5] * 6})
    tokens = decoded_tokens(long, 2).sort("variant")
    assert tokens["variant"].to_list() == ["direction=input", "direction=output"]
    assert tokens["tokens"].to_list() == [["a", "b"], ["x", "y"]]
    listed = pl.DataFrame({"site": ["up"], "layer": [1], "unit": [5], "tokens": [["p", "q", "r"]]})
    assert decoded_tokens(listed, 2).row(0) == ("up", 1, 5, "", ["p", "q"])
    with pytest.raises(NeuronmapError, match="token"):
        decoded_tokens(listed.drop("tokens"), 2)


def test_peak_span_finds_each_token_of_real_prompts(smollm2_dir):
    """The span of position p must spell the token the extraction records there (its decode)."""
    from neuronmap.model.loading import load_tokenizer
    tokenizer = load_tokenizer(smollm2_dir)
    texts = ["The capital city of France is Paris\nThe capital city of Brazil is Brasília",
             "walk -> walked\nswim -> swam\n  go ->", "Ünïcödé  spaced\ttext"]
    located = total = 0
    for text in texts:
        encoded = tokenizer(text, return_offsets_mapping=True)
        for position, token_id in enumerate(encoded["input_ids"]):
            token = tokenizer.decode([token_id])
            start, end = peak_span(text, encoded["offset_mapping"], position, token)
            total += 1
            if start >= 0:
                located += 1
                assert text[start:end].strip() == token.strip() or token.strip() in text[start:end]
            else:  # only pieces of a character split over tokens decode to something not in the text
                assert "\ufffd" in token or not token.strip()
    assert located >= total - 4
    assert peak_span("abc", [(0, 3)], 0, "xyz") == (-1, -1) and peak_span("abc", [(0, 3)], 5, "abc") == (-1, -1)


def test_atlas_payload_follows_the_unit_order(tmp_path):
    paths, _ = write_expertise(tmp_path, ["r1", "r2"])
    atlas = atlas_units(paths, 5)
    keys = atlas.select("site", "layer", "unit")
    stats = keys.reverse().with_columns(count=pl.lit(10, pl.Int64), mean=pl.col("unit").cast(pl.Float64),
                                        var=pl.lit(4.0), min=pl.lit(-1.0, pl.Float32), max=pl.lit(2.0, pl.Float32),
                                        frac_positive=pl.col("layer") / 10)
    stats.write_parquet(tmp_path / "stats.parquet")
    prompts = pl.DataFrame({"prompt_id": ["p1", "p2"], "relation": ["r1", "r2"], "text": ["hello world", "a b c"]})
    top = keys.head(2).with_columns(rank=pl.lit(1, pl.Int32), prompt_id=pl.Series(["p2", "p1"]),
                                    position=pl.lit(1, pl.Int32), token=pl.Series([" b", " world"]),
                                    value=pl.lit(3.5, pl.Float32))
    top.write_parquet(tmp_path / "top.parquet")
    payload = build_atlas(expertise=paths, prompts=prompts, units_per_relation=5, prompts_per_unit=3,
                          neuron_stats=tmp_path / "stats.parquet", top_activations=tmp_path / "top.parquet")
    assert payload["unit"] == keys["unit"].to_list()
    assert payload["stats"]["mean"] == [float(u) for u in keys["unit"].to_list()]
    assert payload["stats"]["sd"] == [2.0] * keys.height and payload["stats"]["count"] == [10] * keys.height
    # Without a tokenizer the token is shown but not located; the prompts are the ones used.
    assert payload["prompts"]["id"] == ["p1", "p2"]
    assert payload["top"][0] == [[1, 1, " b", 3.5, -1, -1]] and payload["top"][2] == []
    json.loads(script_json(payload))


def test_script_json_cannot_close_the_script_element():
    text = script_json({"token": "</script><script>alert(1)</script>", "amp": "a & b"})
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"token": "</script><script>alert(1)</script>", "amp": "a & b"}


def test_sparsity_table_and_language_cells_read_the_analysis_columns():
    table = pl.DataFrame({"site": ["up", "gate"], "layer": [0, 0], "units": [10, 10], "tokens": [50, 50],
                          "firing_rate_mean": [0.3, 0.5], "firing_rate_median": [0.2, 0.4],
                          "active_rate_mean": [0.1, 0.2], "active_rate_median": [0.1, 0.2], "dead": [1, 0],
                          "never_active": [2, 0], "rare": [3, 1]})
    assert data.sparsity(table).rows() == [("gate", 0, 0.5, 0.2, 0, 10), ("up", 0, 0.3, 0.1, 1, 10)]
    languages = pl.DataFrame({"ablated_relation": ["a", "a", "a", "b"], "eval_relation": ["a", "a", "a", "a"],
                              "control": ["top_k", "top_k", "random", "top_k"], "k": [5] * 4,
                              "language": ["de", "fr", "de", "de"], "n": [10] * 4, "accuracy": [0.2, 0.5, 0.4, 0.1],
                              "baseline_accuracy": [0.4, 0.5, 0.4, 0.4], "relative_drop": [0.5, 0.0, 0.0, 0.75],
                              "significant": [True, False, False, True]})
    cells = data.language_cells(languages)
    assert cells.select("relation", "language", "label").rows() == [("a", "de", "0.5*"), ("a", "fr", "0.0")]
