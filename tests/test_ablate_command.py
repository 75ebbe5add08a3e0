"""The baseline and ablate commands end to end on the embedded model, with options the tiny
workflow run does not use: deactivation to each unit's mean on negatives, and a translation."""

import dataclasses

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from neuronmap.io import tables
from neuronmap.cli import main
from neuronmap.io.parquet import write_table
from neuronmap.ablate.settings import AblationSettings, BaselineSettings
from neuronmap.prepare.languages import translation_files
from neuronmap.prepare.prompts import build_prompts
from neuronmap.prepare.relations import find_relation_file, load_relation
from neuronmap.prepare.settings import PromptSettings

from conftest import REPO, RELATIONS

NAMES = ["country_capital_city", "verb_past_tense"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate")
    relations = [load_relation(find_relation_file(RELATIONS, n), n) for n in NAMES]
    settings = PromptSettings.defaults(max_facts=12, test_facts=3)
    write_table(build_prompts(relations, settings), out / "prompts.parquet", tables.PROMPTS)
    translations = translation_files(REPO / "data" / "languages", ["fr"], NAMES)
    assert main(["prepare-languages", "--settings", settings.to_json(), "--translations", *map(str, translations),
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
                                                         rank=pl.int_range(1, 61, dtype=pl.Int64), ap=pl.lit(1.0),
                                                         separation=pl.lit(2.0))
    write_table(selected, out / "units.parquet", tables.SELECTED_UNITS)
    return out


def settings(command_settings, **changes) -> list[str]:
    """--settings for the embedded model on the CPU, batches of 4 prompts."""
    base = command_settings.defaults()
    model = dataclasses.replace(base.model, device="cpu")
    evaluation = dataclasses.replace(base.evaluation, batch_size=4)
    return ["--settings", dataclasses.replace(base, model=model, evaluation=evaluation, **changes).to_json()]


def ablate_args(inputs, smollm2_dir, out_prefix: str) -> list[str]:
    return ["--model-dir", str(smollm2_dir), "--prompts", str(inputs / "prompts.parquet"),
            "--language-prompts", str(inputs / "languages.parquet"),
            "--units", str(inputs / "units.parquet"), "--expertise", str(inputs / "expertise.parquet"),
            "--relation", "country_capital_city", "--neutral-text", str(REPO / "data" / "neutral_text.txt"),
            "--out-predictions", str(inputs / f"{out_prefix}predictions.parquet"),
            "--out-language-predictions", str(inputs / f"{out_prefix}predictions.fr.parquet"),
            "--out-perplexity", str(inputs / f"{out_prefix}perplexity.parquet"),
            "--out-cost", str(inputs / f"{out_prefix}cost.parquet")]


def test_baseline_and_mean_valued_sweep(smollm2_dir, inputs):
    assert main(["baseline", *settings(BaselineSettings), "--model-dir", str(smollm2_dir),
                 "--prompts", str(inputs / "prompts.parquet"),
                 "--language-prompts", str(inputs / "languages.parquet"),
                 "--out", str(inputs / "baseline.parquet"),
                 "--out-languages", str(inputs / "baseline.fr.parquet"),
                 "--out-cost", str(inputs / "baseline.cost.parquet")]) == 0
    sweep = settings(AblationSettings, top_k=(10, 60), seeds=(1,), value="mean", configs_per_batch=3,
                     perplexity_max_tokens=64)
    assert main(["ablate", *sweep, *ablate_args(inputs, smollm2_dir, "")]) == 0
    for name, schema in (("baseline", tables.PREDICTIONS), ("baseline.fr", tables.LANGUAGE_PREDICTIONS),
                         ("predictions", tables.PREDICTIONS), ("predictions.fr", tables.LANGUAGE_PREDICTIONS),
                         ("perplexity", tables.PERPLEXITY), ("cost", tables.JOB_COST),
                         ("baseline.cost", tables.JOB_COST)):
        assert pq.read_schema(inputs / f"{name}.parquet").remove_metadata().equals(schema), name
    baseline = pl.read_parquet(inputs / "baseline.parquet")
    assert baseline.height == 6 and set(baseline["eval_relation"]) == set(NAMES)
    french = pl.read_parquet(inputs / "predictions.fr.parquet")
    assert french.height == 4 * 3 and set(french["language"]) == {"fr"}  # 4 configurations x 3 prompts
    assert all(pid.startswith("fr:") for pid in french["prompt_id"])
    predictions = pl.read_parquet(inputs / "predictions.parquet")
    cells = predictions.select("k", "control", "seed", "eval_relation").unique()
    # top-k on both relations, the random control (seed 1) on the ablated relation's own prompts
    assert cells.height == 2 * (len(NAMES) + 1) and set(cells["control"]) == {"top_k", "random"}
    assert set(cells.filter(pl.col("control") == "random")["eval_relation"]) == {"country_capital_city"}
    perplexity = pl.read_parquet(inputs / "perplexity.parquet")
    assert perplexity["control"].to_list() == ["none", "top_k", "random", "top_k", "random"]
    assert perplexity["tokens"].to_list() == [63] * 5 and perplexity["ratio"][0] == 1.0


def test_unknown_deactivation_value_is_a_clear_error(smollm2_dir, inputs, capsys):
    code = main(["ablate", *settings(AblationSettings, value="median"), *ablate_args(inputs, smollm2_dir, "x-")])
    assert code == 2 and "ablation.value: unknown 'median'" in capsys.readouterr().err
    assert not list(inputs.glob("x-*"))
