"""The baseline and ablate commands end to end on the embedded model, with options the tiny
workflow run does not use: deactivation to each unit's mean on negatives, and a translation."""

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from neuronmap import schemas
from neuronmap.cli import main
from neuronmap.parquet_io import write_table
from neuronmap.prompts import PromptSettings, build_prompts
from neuronmap.relations import find_relation_file, load_relation

from conftest import REPO, RELATIONS

NAMES = ["country_capital_city", "verb_past_tense"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate")
    relations = [load_relation(find_relation_file(RELATIONS, n), n) for n in NAMES]
    prompts = build_prompts(relations, PromptSettings(max_facts=12, test_facts=3))
    write_table(prompts, out / "prompts.parquet", schemas.PROMPTS)
    assert main(["prepare-languages", "--dir", str(REPO / "data" / "languages"), "--languages", "fr",
                 "--relations", *NAMES, "--max-facts", "12", "--test-facts", "3",
                 "--out", str(out / "languages.parquet")]) == 0
    rng = np.random.default_rng(0)
    points = [("gate", 5), ("act", 12), ("up", 20)]
    # Every unit of those points with an off_mean, as an expertise table has them; the top 60 selected.
    expertise = pl.DataFrame({"site": [s for s, _ in points for _ in range(1536)],
                              "layer": [l for _, l in points for _ in range(1536)],
                              "unit": [u for _ in points for u in range(1536)],
                              "off_mean": rng.normal(0, 0.5, 3 * 1536)},
                             schema_overrides={"layer": pl.Int32, "unit": pl.Int32, "off_mean": pl.Float32})
    expertise.write_parquet(out / "expertise.parquet")
    selected = expertise.sample(60, seed=1).with_columns(relation=pl.lit("country_capital_city"),
                                                         rank=pl.int_range(1, 61, dtype=pl.Int64), ap=pl.lit(1.0))
    write_table(selected, out / "units.parquet", schemas.SELECTED_UNITS)
    return out


def test_baseline_and_mean_valued_sweep(smollm2_dir, inputs):
    model = ["--model-dir", str(smollm2_dir), "--device", "cpu", "--batch-size", "4"]
    languages = ["--language-prompts", str(inputs / "languages.parquet")]
    assert main(["baseline", *model, "--prompts", str(inputs / "prompts.parquet"), *languages,
                 "--out", str(inputs / "baseline.parquet"),
                 "--out-languages", str(inputs / "baseline.fr.parquet")]) == 0
    assert main(["ablate", *model, "--prompts", str(inputs / "prompts.parquet"), *languages,
                 "--units", str(inputs / "units.parquet"), "--expertise", str(inputs / "expertise.parquet"),
                 "--baseline", str(inputs / "baseline.parquet"), "--relation", "country_capital_city",
                 "--top-k", "10", "60", "--seeds", "1", "--value", "mean", "--configs-per-batch", "3",
                 "--neutral-text", str(REPO / "data" / "neutral_text.txt"), "--perplexity-max-tokens", "64",
                 "--out-summary", str(inputs / "summary.parquet"),
                 "--out-predictions", str(inputs / "predictions.parquet"),
                 "--out-language-predictions", str(inputs / "predictions.fr.parquet"),
                 "--out-perplexity", str(inputs / "perplexity.parquet")]) == 0
    for name, schema in (("baseline", schemas.PREDICTIONS), ("baseline.fr", schemas.LANGUAGE_PREDICTIONS),
                         ("summary", schemas.ABLATION), ("predictions", schemas.PREDICTIONS),
                         ("predictions.fr", schemas.LANGUAGE_PREDICTIONS), ("perplexity", schemas.PERPLEXITY)):
        assert pq.read_schema(inputs / f"{name}.parquet").remove_metadata().equals(schema), name
    baseline = pl.read_parquet(inputs / "baseline.parquet")
    assert baseline.height == 6 and set(baseline["eval_relation"]) == set(NAMES)
    french = pl.read_parquet(inputs / "predictions.fr.parquet")
    assert french.height == 4 * 3 and set(french["language"]) == {"fr"}  # 4 configurations x 3 prompts
    assert all(pid.startswith("fr:") for pid in french["prompt_id"])
    summary = pl.read_parquet(inputs / "summary.parquet")
    # top-k on both relations, the random control (seed 1) on the ablated relation's own prompts
    assert summary.height == 2 * (len(NAMES) + 1) and set(summary["control"]) == {"top_k", "random"}
    assert set(summary.filter(pl.col("control") == "random")["eval_relation"]) == {"country_capital_city"}
    perplexity = pl.read_parquet(inputs / "perplexity.parquet")
    assert perplexity["control"].to_list() == ["none", "top_k", "random", "top_k", "random"]
    assert perplexity["tokens"].to_list() == [63] * 5 and perplexity["ratio"][0] == 1.0


def test_mean_value_without_expertise_is_a_clear_error(smollm2_dir, inputs, capsys):
    code = main(["ablate", "--model-dir", str(smollm2_dir), "--prompts", str(inputs / "prompts.parquet"),
                 "--units", str(inputs / "units.parquet"), "--baseline", str(inputs / "prompts.parquet"),
                 "--relation", "country_capital_city", "--top-k", "10", "--value", "mean",
                 "--neutral-text", str(REPO / "data" / "neutral_text.txt"),
                 "--out-summary", str(inputs / "x.parquet"), "--out-predictions", str(inputs / "y.parquet"),
                 "--out-language-predictions", str(inputs / "z.parquet"),
                 "--out-perplexity", str(inputs / "w.parquet")])
    assert code == 2 and "ablation.value mean needs the relation's expertise table" in capsys.readouterr().err
    assert not (inputs / "x.parquet").exists()
