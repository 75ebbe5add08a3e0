"""The real workflow on the real embedded model, tiny config, to the report; then nothing to redo."""

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import average_precision_score

from neuronmap import schemas
from neuronmap.responses import ResponseReader

from conftest import REPO, run_snakemake

RELATIONS = ["country_capital_city", "verb_past_tense"]


@pytest.fixture(scope="module")
def run(e2e_run):
    return e2e_run


def test_report_is_written_and_self_contained(run):
    page = (run / "report.html").read_text()
    for heading in ("Factual recall", "Relative drop", "Where the selected units are", "Units shared"):
        assert heading in page
    assert page.count("<svg") >= 4
    assert "<script" not in page and "<link" not in page and 'src="http' not in page


def test_second_dry_run_has_nothing_to_do(run, e2e_config):
    result = run_snakemake(e2e_config, "-n")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


def expected_files(run):
    yield run / "prompts.parquet", schemas.PROMPTS
    for relation in RELATIONS:
        for shard in (0, 1):
            yield run / "responses" / relation / f"shard-{shard}.parquet", schemas.responses(pa.float16())
        yield run / "expertise" / f"{relation}.parquet", schemas.EXPERTISE
        yield run / "expertise" / f"{relation}.prompts.parquet", schemas.EXPERTISE_PROMPTS
        yield run / "units" / f"{relation}.parquet", schemas.SELECTED_UNITS
        yield run / "ablation" / f"{relation}.parquet", schemas.ABLATION
        yield run / "ablation" / f"{relation}.predictions.parquet", schemas.PREDICTIONS
    yield run / "evaluation" / "baseline.parquet", schemas.PREDICTIONS
    yield run / "overlap.parquet", schemas.OVERLAP


def test_every_output_matches_its_documented_schema(run):
    documented = (REPO / "docs" / "parquet.md").read_text()
    for path, schema in expected_files(run):
        assert pq.read_schema(path).remove_metadata().equals(schema), path
        for column in schema.names:
            assert f"`{column}`" in documented, (path.name, column)


def test_expertise_is_auditable_against_sklearn(run):
    relation = "verb_past_tense"
    expertise = pl.read_parquet(run / "expertise" / f"{relation}.parquet")
    chosen = pl.read_parquet(run / "expertise" / f"{relation}.prompts.parquet")
    assert expertise.height == 30 * (3 * 1536 + 576)  # every unit of SmolLM2-135M's four sites
    assert expertise["rank"].to_list() == list(range(1, expertise.height + 1))
    assert chosen.filter(~pl.col("label")).height == 4 * chosen.filter(pl.col("label")).height
    assert (chosen.filter(pl.col("label"))["relation"] == relation).all()
    reader = ResponseReader(sorted((run / "responses").rglob("*.parquet")))
    sample = pl.concat([expertise.head(5), expertise.sample(20, seed=1)])
    for site, layer, unit, ap in sample.select("site", "layer", "unit", "ap").iter_rows():
        values = reader.read_block(site, layer, chosen["prompt_id"].to_list())[:, unit]
        assert ap == pytest.approx(average_precision_score(chosen["label"].to_numpy(), values), abs=1e-9)


def test_ablation_covers_every_configuration(run):
    summary = pl.read_parquet(run / "ablation" / "verb_past_tense.parquet")
    assert summary.height == 2 * 2 * len(RELATIONS)  # k in [20, 200] x (top_k, random seed 1) x relations
    baseline = pl.read_parquet(run / "evaluation" / "baseline.parquet")
    assert baseline.height == summary.filter((pl.col("k") == 20) & (pl.col("control") == "top_k"))["n"].sum()
    assert 0.3 < baseline["correct"].mean() <= 1.0  # the embedded model does know these relations
    top = summary.filter(pl.col("control") == "top_k")
    units = pl.read_parquet(run / "units" / "verb_past_tense.parquet")
    assert units.height == 200 and top["k"].unique().sort().to_list() == [20, 200]
    drop = top.with_columns(expected=(pl.col("baseline_accuracy") - pl.col("accuracy")) / pl.col("baseline_accuracy"))
    np.testing.assert_allclose(drop["relative_drop"].to_numpy(), drop["expected"].to_numpy())
