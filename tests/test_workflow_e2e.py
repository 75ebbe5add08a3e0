"""The real workflow on the real embedded model, tiny config, to the report; then nothing to redo."""

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import average_precision_score

from neuronmap.io import tables
from neuronmap.io.responses import ResponseReader

from conftest import REPO, run_snakemake

RELATIONS = ["country_capital_city", "verb_past_tense"]
RESPONSES = tables.responses(pa.float16(), {"gate": 1536, "up": 1536, "act": 1536, "down": 576}, 30,
                              ["mean"])  # the default poolings
# Each context's mean response at labels.sites (gate by default), for the AP selection.
CONTEXT_RESPONSES = tables.responses(pa.float16(), {"gate": 1536}, 30, ["mean"])


@pytest.fixture(scope="module")
def run(e2e_run):
    return e2e_run


def test_report_is_written_and_self_contained(run):
    # Static checks only; tests/test_report_browser.py opens it in Chromium.
    page = (run / "report.html").read_text()
    for heading in ("Findings", "Recall per relation", "Per relation: its units against random units",
                    "Ablated × evaluated", "Units shared", "Where the selected units sit", "Stability of the selections",
                    "Neuron atlas"):
        assert heading in page
    assert "<script src" not in page and "<link" not in page and "@import" not in page
    assert len(list((run / "figures").glob("*.svg"))) >= 5


def test_second_dry_run_has_nothing_to_do(run, e2e_config):
    result = run_snakemake(e2e_config, "-n")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


def expected_files(run):
    yield run / "prompts.parquet", tables.PROMPTS
    for relation in RELATIONS:
        for shard in (0, 1):
            yield run / "responses" / relation / f"shard-{shard}.parquet", RESPONSES
            yield run / "responses" / relation / f"shard-{shard}.stats.parquet", tables.NEURON_STATS_PARTIAL
            yield run / "responses" / relation / f"shard-{shard}.top.parquet", tables.TOP_ACTIVATIONS_PARTIAL
        yield run / "expertise" / f"{relation}.parquet", tables.EXPERTISE
        yield run / "expertise" / f"{relation}.prompts.parquet", tables.EXPERTISE_PROMPTS
        yield run / "units" / f"{relation}.parquet", tables.SELECTED_UNITS
        yield run / "ablation" / f"{relation}.predictions.parquet", tables.PREDICTIONS
    yield run / "evaluation" / "baseline.parquet", tables.PREDICTIONS
    yield run / "overlap.parquet", tables.OVERLAP
    yield from analysis_files(run)
    yield run / "neuron_stats.parquet", tables.NEURON_STATS
    yield run / "top_activations.parquet", tables.TOP_ACTIVATIONS
    for block in (0, 1):
        yield run / "expertise" / "blocks" / f"block-{block}.parquet", tables.EXPERTISE_BLOCK
    yield from corpus_files(run)


def corpus_files(run):
    yield run / "corpus" / "contexts.parquet", tables.CONTEXTS
    for shard in (0, 1):
        yield run / "corpus" / "shards" / f"shard-{shard}.units.parquet", tables.RECORDS_PARTIAL
        yield run / "corpus" / "shards" / f"shard-{shard}.extremes.parquet", tables.EXTREMES_PARTIAL
        yield run / "cost" / "corpus" / f"shard-{shard}.parquet", tables.JOB_COST
    yield run / "corpus" / "units.parquet", tables.UNIT_RECORDS
    yield run / "corpus" / "examples.parquet", tables.UNIT_EXAMPLES
    yield run / "corpus" / "peak_tokens.parquet", tables.PEAK_TOKENS
    for shard in (0, 1):
        yield run / "corpus" / "shards" / f"shard-{shard}.labels.parquet", tables.LABEL_RECORDS_PARTIAL
        yield run / "corpus" / "shards" / f"shard-{shard}.responses.parquet", CONTEXT_RESPONSES
    yield run / "labels" / "label_records.parquet", tables.LABEL_RECORDS
    yield run / "labels" / "label_expertise.parquet", tables.LABEL_EXPERTISE
    yield run / "labels" / "label_units.parquet", tables.LABEL_UNITS
    yield run / "labels" / "overlap.parquet", tables.LABEL_OVERLAP
    yield run / "labels" / "perplexity_contexts.parquet", tables.LABEL_PERPLEXITY_CONTEXTS
    yield run / "labels" / "perplexity.parquet", tables.LABEL_PERPLEXITY


def test_corpus_records_cover_every_token_and_read_per_layer(run):
    contexts = pl.read_parquet(run / "corpus" / "contexts.parquet")
    assert set(contexts["label"]) == {"de", "en"} and set(contexts["shard"]) == {0, 1}
    assert contexts["n_tokens"].max() <= 32
    units = pq.ParquetFile(run / "corpus" / "units.parquet")
    assert units.num_row_groups == 30  # one per layer
    layer = pl.from_arrow(units.read_row_group(7))
    assert set(layer["layer"]) == {7} and layer.height == 3 * 1536 + 576
    assert (layer["count"] == contexts.filter(~pl.col("heldout"))["n_tokens"].sum()).all()
    assert (layer["p1"] <= layer["p50"]).all() and (layer["p50"] <= layer["p99_99"]).all()
    assert ((layer["min"] <= layer["p1"]) & (layer["p99_99"] <= layer["max"])).all()
    examples = pl.read_parquet(run / "corpus" / "examples.parquet")
    token_ids = dict(zip(contexts["context_id"], contexts["token_ids"]))
    for row in examples.sample(50, seed=0).iter_rows(named=True):
        assert token_ids[row["context_id"]][row["position"]] == row["token_id"]
        assert row["label"] in {"de", "en"}
    assert examples.group_by("site", "layer", "unit", "kind").len()["len"].max() == 3
    peaks = pl.read_parquet(run / "corpus" / "peak_tokens.parquet")
    assert peaks.group_by("site", "layer", "unit").agg(pl.col("contexts").sum())["contexts"].max() <= 6


def test_labels_stage_selects_and_scores_both_languages(run):
    contexts = pl.read_parquet(run / "corpus" / "contexts.parquet")
    records = pl.read_parquet(run / "labels" / "label_records.parquet")
    assert set(records["label"]) == {"de", "en"} and records.height == 2 * 30 * (3 * 1536 + 576)
    kept = contexts.filter(~pl.col("heldout"))
    for label in ("de", "en"):
        own = records.filter(pl.col("label") == label)
        assert (own["tokens"] == kept.filter(pl.col("label") == label)["n_tokens"].sum()).all()
    units = pl.read_parquet(run / "labels" / "label_units.parquet")
    assert set(units["method"]) == {"lape", "ap"} and set(units["site"]) == {"gate"}
    perplexity = pl.read_parquet(run / "labels" / "perplexity.parquet")
    heldout = contexts.filter(pl.col("heldout"))
    assert set(perplexity["eval_label"]) == set(heldout["label"])
    assert (perplexity["contexts"] <= 3).all()


def test_every_output_matches_its_documented_schema(run):
    documented = (REPO / "docs" / "parquet.md").read_text()
    for path, schema in expected_files(run):
        assert pq.read_schema(path).remove_metadata().equals(schema), path
        for column in schema.names:
            if "/" not in column:  # responses' block columns are documented by their pattern
                assert f"`{column}`" in documented, (path.name, column)


def test_expertise_is_auditable_against_sklearn(run):
    relation = "verb_past_tense"
    expertise = pl.read_parquet(run / "expertise" / f"{relation}.parquet")
    chosen = pl.read_parquet(run / "expertise" / f"{relation}.prompts.parquet")
    assert expertise.height == 30 * (3 * 1536 + 576)  # every unit of SmolLM2-135M's four sites
    assert expertise["rank"].to_list() == list(range(1, expertise.height + 1))
    others = pl.read_parquet(run / "prompts.parquet").filter(
        (pl.col("split") == "identification") & (pl.col("relation") != relation)).height
    assert chosen.filter(~pl.col("label")).height == min(4 * chosen.filter(pl.col("label")).height, others)
    assert (chosen.filter(pl.col("label"))["relation"] == relation).all()
    reader = ResponseReader(sorted((run / "responses").rglob("shard-?.parquet")))
    sample = pl.concat([expertise.head(5), expertise.sample(20, seed=1)])
    for site, layer, unit, ap in sample.select("site", "layer", "unit", "ap").iter_rows():
        values = reader.read_block("mean", site, layer, chosen["prompt_id"].to_list())[:, unit]
        assert ap == pytest.approx(average_precision_score(chosen["label"].to_numpy(), values), abs=1e-7)


def test_ablation_covers_every_configuration(run):
    summary = pl.read_parquet(run / "significance.parquet").filter(pl.col("ablated_relation") == "verb_past_tense")
    # k in [20, 200] x (top_k on every relation + random seeds 1, 2 on the relation's own prompts)
    assert summary.height == 2 * (len(RELATIONS) + 2)
    baseline = pl.read_parquet(run / "evaluation" / "baseline.parquet")
    assert baseline.height == summary.filter((pl.col("k") == 20) & (pl.col("control") == "top_k"))["n"].sum()
    assert 0.3 < baseline["correct"].mean() <= 1.0  # the embedded model does know these relations
    top = summary.filter(pl.col("control") == "top_k")
    units = pl.read_parquet(run / "units" / "verb_past_tense.parquet")
    assert units.height == 200 and top["k"].unique().sort().to_list() == [20, 200]
    drop = top.with_columns(expected=(pl.col("baseline_accuracy") - pl.col("accuracy")) / pl.col("baseline_accuracy"))
    np.testing.assert_allclose(drop["relative_drop"].to_numpy(), drop["expected"].to_numpy())


# --- Analyses: sweep, paired significance, languages, perplexity, shared units, decoding, sparsity ---

def analysis_files(run):
    for relation in RELATIONS:
        yield run / "ablation" / f"{relation}.languages.parquet", tables.LANGUAGE_PREDICTIONS
        yield run / "ablation" / f"{relation}.perplexity.parquet", tables.PERPLEXITY
    yield run / "prompts.languages.parquet", tables.LANGUAGE_PROMPTS
    yield run / "evaluation" / "baseline.languages.parquet", tables.LANGUAGE_PREDICTIONS
    yield run / "significance.parquet", tables.SIGNIFICANCE
    yield run / "sweep.parquet", tables.SWEEP
    yield run / "verdicts.parquet", tables.VERDICTS
    yield run / "versatility.parquet", tables.VERSATILITY
    yield run / "stability.parquet", tables.STABILITY
    for block in (0, 1):
        yield run / "labelings" / f"block-{block}.parquet", tables.LABELING_BLOCK
    yield run / "languages.parquet", tables.LANGUAGE_ABLATION
    yield run / "perplexity.parquet", tables.PERPLEXITY
    yield run / "shared_units.parquet", tables.SHARED_UNITS
    yield run / "decoded.parquet", tables.DECODED
    yield run / "sparsity.parquet", tables.SPARSITY
    yield run / "dead_units.parquet", tables.DEAD_UNITS
    for relation in RELATIONS:
        for shard in (0, 1):
            yield run / "cost" / "extract" / f"{relation}-{shard}.parquet", tables.JOB_COST
        yield run / "cost" / "ablate" / f"{relation}.parquet", tables.JOB_COST
    yield run / "cost" / "baseline.parquet", tables.JOB_COST
    yield run / "cost" / "calibrate.parquet", tables.JOB_COST
    yield run / "cost.parquet", tables.COST


def test_significance_pairs_every_configuration_with_the_baseline(run):
    significance = pl.read_parquet(run / "significance.parquet")
    key = ["ablated_relation", "k", "control", "seed", "eval_relation"]
    # accuracy recounted from every relation's per-prompt predictions
    counted = pl.concat([pl.read_parquet(run / "ablation" / f"{r}.predictions.parquet") for r in RELATIONS]) \
        .group_by(key).agg(accuracy=pl.col("correct").mean(), n=pl.len())
    joined = counted.join(significance, on=key, how="full", nulls_equal=True, suffix="_paired")
    assert joined.height == counted.height == significance.height
    np.testing.assert_allclose(joined["accuracy"], joined["accuracy_paired"])
    assert (joined["n"] == joined["n_paired"]).all()
    # lost and gained are the prompts that flipped: recount them from the predictions.
    baseline = pl.read_parquet(run / "evaluation" / "baseline.parquet").select("prompt_id", base="correct")
    predictions = pl.read_parquet(run / "ablation" / "verb_past_tense.predictions.parquet").join(baseline,
                                                                                                 on="prompt_id")
    flips = predictions.group_by(key).agg(lost=(pl.col("base") & ~pl.col("correct")).sum(),
                                          gained=(~pl.col("base") & pl.col("correct")).sum())
    mine = significance.filter(pl.col("ablated_relation") == "verb_past_tense").join(flips, on=key, nulls_equal=True)
    assert mine.height == 2 * (len(RELATIONS) + 2)
    assert (mine["lost"] == mine["lost_right"]).all() and (mine["gained"] == mine["gained_right"]).all()
    assert ((mine["ci_low"] <= mine["difference"]) & (mine["difference"] <= mine["ci_high"])).all()
    sweep = pl.read_parquet(run / "sweep.parquet")
    assert sweep.height == len(RELATIONS) ** 2 * 2
    own = pl.col("ablated_relation") == pl.col("eval_relation")
    assert (sweep.filter(own)["random_seeds"] == 2).all() and (sweep.filter(~own)["random_seeds"] == 0).all()


def test_languages_and_perplexity(run):
    translated = pl.read_parquet(run / "evaluation" / "baseline.languages.parquet")
    assert set(translated["language"]) == {"fr"} and set(translated["eval_relation"]) == {"country_capital_city"}
    assert translated.height == 12  # half of the 24 translated facts
    languages = pl.read_parquet(run / "languages.parquet")
    # French prompts are country_capital_city's: every top-k ablation, random controls of its own
    assert languages.height == len(RELATIONS) * 2 + 2 * 2
    perplexity = pl.read_parquet(run / "perplexity.parquet")
    assert perplexity.filter(pl.col("control") == "none").height == 1
    assert perplexity.height == 1 + len(RELATIONS) * 2 * 3
    assert (perplexity["perplexity"] > 1).all() and (perplexity["tokens"] > 250).all()
    np.testing.assert_allclose(perplexity["ratio"], perplexity["perplexity"] / perplexity["baseline_perplexity"])


def test_shared_units_agree_with_overlap_counts(run):
    shared = pl.read_parquet(run / "shared_units.parquet")
    overlap = pl.read_parquet(run / "overlap.parquet").filter(pl.col("relation_a") < pl.col("relation_b"))
    counts = shared.group_by("k", "relation_a", "relation_b").len()
    joined = overlap.join(counts, on=["k", "relation_a", "relation_b"], how="left").with_columns(
        pl.col("len").fill_null(0))
    assert (joined["shared"] == joined["len"]).all()


def test_decoded_tokens_match_the_model(run):
    import torch
    from neuronmap.model.loading import load_model
    decoded = pl.read_parquet(run / "decoded.parquet")
    assert decoded.height == 30 * 1536 and set(decoded["site"]) == {"up"} and decoded["norm_gain"].all()
    model, tokenizer = load_model(run / "model", device="cpu", dtype="float32")
    for row in decoded.sample(5, seed=0).iter_rows(named=True):
        vector = model.model.layers[row["layer"]].mlp.up_proj.weight[row["unit"]] * model.model.norm.weight
        with torch.no_grad():
            top = torch.topk(model.lm_head.weight @ vector, 10)
        assert row["token_ids"] == top.indices.tolist()
        assert row["tokens"] == [tokenizer.decode([i]) for i in top.indices.tolist()]


def test_sparsity_summarizes_neuron_stats(run):
    stats = pl.read_parquet(run / "neuron_stats.parquet")
    layers = pl.read_parquet(run / "sparsity.parquet")
    assert layers.height == 4 * 30 and layers["units"].sum() == stats.height
    gate = stats.filter((pl.col("site") == "gate") & (pl.col("layer") == 3))
    row = layers.filter((pl.col("site") == "gate") & (pl.col("layer") == 3)).row(0, named=True)
    assert row["firing_rate_mean"] == pytest.approx(gate["frac_positive"].mean())
    assert row["dead"] == (gate["frac_positive"] == 0).sum()
    dead = pl.read_parquet(run / "dead_units.parquet")
    assert dead.height == stats.filter((pl.col("frac_positive") == 0) | (pl.col("frac_active") == 0)).height


def test_ranks_follow_ap_then_separation(run):
    expertise = pl.read_parquet(run / "expertise" / "country_capital_city.parquet")
    order = expertise.sort(["ap", "separation", "site", "layer", "unit"],
                           descending=[True, True, False, False, False])
    assert order["rank"].to_list() == list(range(1, expertise.height + 1))
    top = expertise.filter(pl.col("ap") == expertise["ap"].max())
    # Separation resolves the ties at the top: no rank there falls to the unit's position.
    assert top["separation"].n_unique() == top.height


def test_cost_counts_what_the_jobs_forwarded(run):
    cost = pl.read_parquet(run / "cost.parquet")
    assert set(cost["stage"]) == {"extract", "baseline", "ablate"}
    extract = cost.filter(pl.col("stage") == "extract").row(0, named=True)
    prompts = pl.read_parquet(run / "prompts.parquet")
    identification = prompts.filter(pl.col("split") == "identification")
    assert extract["jobs"] == 4 and extract["prompts"] == identification.height
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    from neuronmap.model.prefix_cache import split_prompts
    whole = sum(len(ids) for ids in tokenizer(identification["text"].to_list())["input_ids"])
    # Each shard forwards its distinct prefixes once and every query (plus padding): fewer positions
    # than the whole prompts.
    once = 0
    for _, shard in identification.group_by("relation", "shard"):
        split = split_prompts(tokenizer, shard["prefix"].to_list(), shard["text"].to_list())
        once += sum(map(len, split.prefixes)) + sum(map(len, split.queries))
    assert once <= extract["tokens"] < whole
    jobs = pl.read_parquet(run / "cost" / "calibrate.parquet").row(0, named=True)
    assert extract["bare_tokens_per_s"] == pytest.approx(jobs["tokens"] / jobs["seconds"])
    assert extract["ratio_to_bare"] == pytest.approx(jobs["tokens"] / jobs["seconds"] / extract["tokens_per_s"])


def excess_by_hand(cells: pl.DataFrame, k: int) -> float:
    """Random-k mean accuracy minus top-k accuracy, pooled over relations weighted by prompts."""
    total, weight = 0.0, 0
    for relation in sorted(set(cells["eval_relation"])):
        mine = cells.filter((pl.col("eval_relation") == relation) & (pl.col("k") == k))
        top = mine.filter(pl.col("control") == "top_k")
        random = mine.filter(pl.col("control") == "random")["accuracy"].to_list()
        n = top["n"].item()
        total += n * (sum(random) / len(random) - top["accuracy"].item())
        weight += n
    return total / weight


def test_findings_state_the_numbers_of_the_parquet_files(run):
    import re
    page = (run / "report.html").read_text()
    items = {(p, s): text for p, s, text in
             re.findall(r'<li data-property="([^"]*)" data-scope="([^"]*)">(.*?)</li>', page)}
    significance = pl.read_parquet(run / "significance.parquet")
    own = significance.filter(pl.col("ablated_relation") == pl.col("eval_relation"))
    for k in (20, 200):
        sentence = items[("cumulativity", f"k={k}")]
        assert f"excess drop {100 * excess_by_hand(own, k):+.1f} points" in sentence, sentence
        assert re.search(r"\((holds|reversed|undecided)\)", sentence)
    languages = pl.read_parquet(run / "languages.parquet")
    french = languages.filter(pl.col("ablated_relation") == pl.col("eval_relation"))
    assert f"excess drop {100 * excess_by_hand(french, 200):+.1f} points" in items[("cross-language transfer", "fr k=200")]
    # Versatility: the overlap.parquet count, against versatility.parquet's null.
    overlap = pl.read_parquet(run / "overlap.parquet").filter(
        (pl.col("relation_a") < pl.col("relation_b")) & (pl.col("k") == 200))
    pooled = pl.read_parquet(run / "versatility.parquet").filter(
        (pl.col("k") == 200) & pl.col("relation_a").is_null()).row(0, named=True)
    assert pooled["shared"] == overlap["shared"].sum()
    assert (f"together share {pooled['shared']} units, where the selection rerun on permuted relation labels "
            f"shares {pooled['null_mean']:.1f}") in items[("versatility", "k=200")]
    # Cumulativity's numbers are verdicts.parquet's pooled rows.
    verdicts = pl.read_parquet(run / "verdicts.parquet").filter(pl.col("relation").is_null() & (pl.col("k") == 200))
    assert f"excess drop {100 * verdicts['excess_drop'].item():+.1f} points" in items[("cumulativity", "k=200")]
