"""The report stage: one self-contained HTML file with the figures a paper would show.

Figures are Vega-Lite charts (altair) rendered to inline SVG by vl-convert, so the file
needs no script and makes no network request.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import altair as alt
import polars as pl
import vl_convert

from . import __version__
from .model_loading import read_manifest
from .parquet_io import read_table, write_text

log = logging.getLogger(__name__)

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;line-height:1.45}
h1{margin-bottom:.2rem}h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.92rem}
td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
.figure{margin:1rem 0}.note{color:#555;font-size:.92rem}pre{background:#f7f7f7;padding:.8rem;overflow:auto}
"""


def svg(chart: alt.TopLevelMixin) -> str:
    return vl_convert.vegalite_to_svg(chart.to_json())


def _table(frame: pl.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    rows = []
    for row in frame.iter_rows():
        cells = "".join(
            f"<td>{'' if v is None else (f'{v:.3f}' if isinstance(v, float) else html.escape(str(v)))}</td>"
            for v in row)
        rows.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def self_ablation(ablation: pl.DataFrame) -> pl.DataFrame:
    """Accuracy on each relation when its own units (or their random controls) are off."""
    own = ablation.filter(pl.col("ablated_relation") == pl.col("eval_relation"))
    return own.group_by("eval_relation", "k", "control").agg(
        accuracy=pl.col("accuracy").mean(), accuracy_sd=pl.col("accuracy").std(),
        baseline_accuracy=pl.col("baseline_accuracy").first(), n=pl.col("n").first(),
    ).rename({"eval_relation": "relation"}).sort("relation", "k", "control")


def accuracy_chart(own: pl.DataFrame, baseline: pl.DataFrame) -> alt.Chart:
    bars = pl.concat([
        baseline.select("relation", pl.lit("baseline").alias("condition"), "accuracy"),
        own.select("relation", (pl.col("control").replace({"top_k": "top"}) + pl.lit(" k=")
                                + pl.col("k").cast(pl.String)).alias("condition"), "accuracy"),
    ])
    order = bars["condition"].unique(maintain_order=True).to_list()
    return alt.Chart(bars.to_pandas()).mark_bar().encode(
        x=alt.X("relation:N", title=None), xOffset=alt.XOffset("condition:N", sort=order),
        y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1]), title="accuracy on its test prompts"),
        color=alt.Color("condition:N", sort=order, title="units off"),
        tooltip=["relation", "condition", alt.Tooltip("accuracy:Q", format=".3f")],
    ).properties(width=max(300, 90 * bars["relation"].n_unique()), height=260)


def drop_matrix_chart(ablation: pl.DataFrame, k: int) -> alt.LayerChart:
    cells = ablation.filter((pl.col("control") == "top_k") & (pl.col("k") == k)) \
        .select("ablated_relation", "eval_relation", "relative_drop").to_pandas()
    base = alt.Chart(cells).encode(x=alt.X("eval_relation:N", title="evaluated relation"),
                                   y=alt.Y("ablated_relation:N", title="ablated relation"))
    heat = base.mark_rect().encode(color=alt.Color("relative_drop:Q", title="relative drop",
                                                   scale=alt.Scale(scheme="redblue", domainMid=0, reverse=True)))
    text = base.mark_text(fontSize=11).encode(text=alt.Text("relative_drop:Q", format=".2f"))
    return (heat + text).properties(title=f"top {k} units off", width=320, height=320)


def placement_chart(units: pl.DataFrame, k: int) -> alt.Chart:
    counts = units.filter(pl.col("rank") <= k).group_by("relation", "layer", "site").len("units").to_pandas()
    return alt.Chart(counts).mark_bar().encode(
        x=alt.X("layer:O"), y=alt.Y("units:Q", title="selected units"), color=alt.Color("site:N"),
        row=alt.Row("relation:N", title=None),
    ).properties(width=640, height=90, title=f"layer and site of the top {k} units")


def overlap_chart(overlap: pl.DataFrame, k: int) -> alt.LayerChart:
    cells = overlap.filter(pl.col("k") == k).to_pandas()
    base = alt.Chart(cells).encode(x=alt.X("relation_a:N", title=None), y=alt.Y("relation_b:N", title=None))
    heat = base.mark_rect().encode(color=alt.Color("jaccard:Q", scale=alt.Scale(scheme="blues", domain=[0, 1])))
    text = base.mark_text(fontSize=11).encode(text=alt.Text("shared:Q"))
    return (heat + text).properties(title=f"shared units among the top {k} (color: Jaccard)", width=320, height=320)


def expertise_summary(units: pl.DataFrame, top_k: list[int]) -> pl.DataFrame:
    """AP at each cutoff; many units at AP = 1 mean the ranking among them is a tie-break."""
    return units.group_by("relation").agg(
        *(pl.col("ap").filter(pl.col("rank") == k).first().alias(f"AP at rank {k}") for k in top_k),
        pl.col("ap").filter(pl.col("ap") >= 1.0).len().alias(f"units with AP = 1 (of top {top_k[-1]})"),
    ).sort("relation")


def stage_times(run_dir: Path) -> pl.DataFrame:
    rows = []
    for path in sorted((run_dir / "benchmarks").rglob("*.tsv")):
        frame = pl.read_csv(path, separator="\t")
        stage = path.relative_to(run_dir / "benchmarks").parts[0].removesuffix(".tsv")
        rows.append({"stage": stage, "seconds": float(frame["s"][0])})
    if not rows:
        return pl.DataFrame({"stage": [], "jobs": [], "seconds": []})
    return pl.DataFrame(rows).group_by("stage", maintain_order=True).agg(
        jobs=pl.len(), seconds=pl.col("seconds").sum())


@dataclass(frozen=True)
class ReportInputs:
    prompts: Path
    model_dir: Path
    baseline: Path
    ablation: list[Path]
    units: list[Path]
    overlap: Path

    @property
    def run_dir(self) -> Path:
        return self.prompts.parent


def build_report(inputs: ReportInputs, config: dict, out: str | Path) -> None:
    prompts = read_table(inputs.prompts)
    manifest = read_manifest(inputs.model_dir)
    baseline_predictions = read_table(inputs.baseline)
    ablation = pl.concat([read_table(path) for path in inputs.ablation])
    units = pl.concat([read_table(path) for path in inputs.units])
    overlap = read_table(inputs.overlap)
    run_dir = inputs.run_dir
    top_k = sorted(config["top_k"])

    baseline = baseline_predictions.group_by("eval_relation").agg(
        accuracy=pl.col("correct").mean(), n=pl.len()).rename({"eval_relation": "relation"}).sort("relation")
    own = self_ablation(ablation)
    summary = own.pivot(on=["control", "k"], index="relation", values="accuracy").sort("relation")
    summary = baseline.select("relation", "n", pl.col("accuracy").alias("baseline")).join(summary, on="relation")
    summary.columns = [c.replace('{"top_k",', "top k=").replace('{"random",', "random k=").rstrip("}")
                       for c in summary.columns]
    counts = prompts.group_by("relation", "split").len().pivot(on="split", index="relation", values="len") \
        .sort("relation")

    sections = [
        f"<h1>neuronmap report: {html.escape(config['run'])}</h1>",
        f"<p class=note>model <b>{html.escape(manifest['source'])}</b> ({html.escape(manifest['model_type'])}, "
        f"{manifest['n_layers']} layers) · sites {', '.join(config['sites'])} · pooling {config['pooling']} · "
        f"{config['few_shot']}-shot prompts · neuronmap {__version__} · "
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC</p>",
        "<h2>Prompts</h2>", _table(counts),
        "<h2>Factual recall with each relation's own units off</h2>",
        "<p class=note>Accuracy on a relation's held-out test prompts: unmodified model, its top-k units by "
        "expertise (AP) set to 0, and as many random units drawn from the same layers and sites "
        f"(mean over seeds {config['random_seeds']}).</p>",
        _table(summary), f"<div class=figure>{svg(accuracy_chart(own, baseline))}</div>",
        "<h2>Relative drop: ablated × evaluated relation</h2>",
        "<p class=note>(baseline − ablated) / baseline accuracy on the evaluated relation; negative values "
        "mean recall rose (interference).</p>",
        *(f"<div class=figure>{svg(drop_matrix_chart(ablation, k))}</div>" for k in top_k),
        "<h2>Expertise</h2>",
        "<p class=note>Average Precision of the selected units. When more units reach AP = 1 than are "
        "selected, the selection among them is a seeded random tie-break: more identification prompts "
        "(or fewer demonstrations) make the ranking sharper.</p>",
        _table(expertise_summary(units, top_k)),
        "<h2>Where the selected units are</h2>",
        f"<div class=figure>{svg(placement_chart(units, top_k[-1]))}</div>",
        "<h2>Units shared between relations</h2>",
        *(f"<div class=figure>{svg(overlap_chart(overlap, k))}</div>" for k in top_k),
        "<h2>Run</h2>", _table(stage_times(run_dir)),
        "<h3>Model</h3>", f"<pre>{html.escape(json.dumps(manifest, indent=2))}</pre>",
        "<h3>Configuration</h3>", f"<pre>{html.escape(json.dumps(config, indent=2))}</pre>",
    ]
    page = (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>neuronmap: "
            f"{html.escape(config['run'])}</title><style>{STYLE}</style></head><body>{''.join(sections)}"
            "</body></html>")
    write_text(page, out)
    log.info("wrote %s (%.1f kB)", out, len(page) / 1024)
