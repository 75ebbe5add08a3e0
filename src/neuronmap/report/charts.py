"""The report's figures as Vega-Lite charts (altair), one function per figure.

Each takes a frame from report.data and returns a chart; the page embeds its spec (drawn in the
browser by the inlined vega-embed) and vl-convert writes the same spec as SVG and PNG.
"""

from __future__ import annotations

import altair as alt
import polars as pl

TOP_K = "top-k units by AP"
RANDOM = "random units (mean; band: min–max over seeds)"
SITE_COLORS = alt.Scale(domain=["gate", "up", "act", "down"], range=["#4c78a8", "#f58518", "#54a24b", "#b279a2"])


def _data(frame: pl.DataFrame) -> alt.Data:
    # Plain records: no pandas round trip, and integer columns stay integers in the spec.
    return alt.Data(values=frame.to_dicts())


def _signed_cells(base: alt.Chart, frame: pl.DataFrame, field: str, title: str, tooltip: list,
                  text: str) -> alt.LayerChart:
    """A matrix of cells coloured by a signed `field` on a red-blue scale centred on 0 (as far
    either way as the largest magnitude), each cell with its `text`, white on the darkest."""
    limit = float(frame[field].abs().max() or 1.0)
    heat = base.mark_rect().encode(
        color=alt.Color(f"{field}:Q", title=title,
                        scale=alt.Scale(scheme="redblue", reverse=True, domain=[-limit, limit], domainMid=0)),
        tooltip=tooltip)
    label = base.mark_text(fontSize=10).encode(
        text=f"{text}:N", color=alt.condition(f"abs(datum.{field}) > {0.6 * limit}", alt.value("white"),
                                              alt.value("black")))
    return alt.layer(heat, label, data=_data(frame))


def baseline_chart(baseline: pl.DataFrame) -> alt.Chart:
    return alt.Chart(_data(baseline)).mark_bar(color="#4c78a8").encode(
        x=alt.X("relation:N", title=None, sort=None, axis=alt.Axis(labelAngle=-30)),
        y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1]), title="accuracy of the unmodified model"),
        tooltip=["relation:N", alt.Tooltip("accuracy:Q", format=".3f"), alt.Tooltip("correct:Q"),
                 alt.Tooltip("n:Q", title="test prompts")],
    ).properties(width=max(240, 60 * baseline.height), height=200, title="Baseline recall on the test prompts")


def cumulativity_chart(curve: pl.DataFrame, columns: int = 4) -> alt.FacetChart:
    """Accuracy against k, top-k beside the random controls, one panel per relation."""
    data = curve.with_columns(condition=pl.when(pl.col("control") == "top_k").then(pl.lit(TOP_K))
                              .otherwise(pl.lit(RANDOM)))
    ks = sorted(data["k"].unique().to_list())
    color = alt.Color("condition:N", title=None, scale=alt.Scale(domain=[TOP_K, RANDOM], range=["#d62728", "#7f7f7f"]),
                      legend=alt.Legend(orient="top", symbolType="stroke", symbolStrokeWidth=3,
                                      symbolSize=400, labelLimit=400))
    base = alt.Chart().encode(
        x=alt.X("k:Q", title="units switched off (k)", scale=alt.Scale(type="symlog", constant=max(1, ks[1] // 10)
                                                                         if len(ks) > 1 else 1),
                axis=alt.Axis(values=ks, labelAngle=-45, grid=False)))
    band = base.transform_filter(alt.datum.control != "top_k").mark_area(opacity=0.22).encode(
        y=alt.Y("accuracy_min:Q"), y2="accuracy_max:Q", color=color)
    tooltip = ["relation:N", "k:Q", "condition:N", alt.Tooltip("accuracy:Q", format=".3f"),
               alt.Tooltip("accuracy_min:Q", format=".3f", title="min over seeds"),
               alt.Tooltip("accuracy_max:Q", format=".3f", title="max over seeds"), alt.Tooltip("seeds:Q")]
    y = alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1]), title="accuracy")
    # The random line is drawn last and dashed, so it stays visible where the two coincide.
    top = base.transform_filter(alt.datum.control == "top_k").mark_line(point=True, strokeWidth=2.5).encode(
        y=y, color=color, tooltip=tooltip)
    random = base.transform_filter(alt.datum.control != "top_k").mark_line(
        point=alt.OverlayMarkDef(filled=False), strokeDash=[5, 3]).encode(y=y, color=color, tooltip=tooltip)
    return alt.layer(band, top, random, data=_data(data)).properties(width=200, height=160).facet(
        facet=alt.Facet("relation:N", title=None), columns=columns,
    ).properties(title="Cumulativity: recall on a relation's test prompts with its own units off")


def drop_matrix_chart(cells: pl.DataFrame, subtitle: str) -> alt.FacetChart:
    """Relative drop, ablated (rows) × evaluated (columns), one matrix per k."""
    base = alt.Chart().encode(
        x=alt.X("eval_relation:N", title="evaluated relation", axis=alt.Axis(labelAngle=-40)),
        y=alt.Y("ablated_relation:N", title="ablated relation"))
    tooltip = [alt.Tooltip("ablated_relation:N", title="ablated"), alt.Tooltip("eval_relation:N", title="evaluated"),
               "k:Q", alt.Tooltip("relative_drop:Q", format=".3f"),
               alt.Tooltip("random_drop:Q", format=".3f", title="random control drop"),
               alt.Tooltip("accuracy:Q", format=".3f"), alt.Tooltip("baseline_accuracy:Q", format=".3f"),
               alt.Tooltip("n:Q", title="test prompts"), alt.Tooltip("p_value:Q", format=".3g"),
               alt.Tooltip("q_value:Q", format=".3g")]
    side = 38 * cells["eval_relation"].n_unique()
    return _signed_cells(base, cells, "relative_drop", "relative drop", tooltip, "label").properties(
        width=side, height=side).facet(
        column=alt.Column("k:O", title="units switched off (k)"),
    ).properties(title=alt.TitleParams("Relative drop: (baseline − ablated) / baseline; blue: recall rose",
                                       subtitle=subtitle))


def language_chart(cells: pl.DataFrame) -> alt.FacetChart:
    """Relative drop of each relation's recall per language with its own units off."""
    base = alt.Chart().encode(x=alt.X("language:N", title="language", axis=alt.Axis(labelAngle=0)),
                              y=alt.Y("relation:N", title=None))
    tooltip = ["relation:N", "language:N", "k:Q", alt.Tooltip("relative_drop:Q", format=".3f"),
               alt.Tooltip("accuracy:Q", format=".3f"), alt.Tooltip("baseline_accuracy:Q", format=".3f"),
               alt.Tooltip("n:Q", title="test prompts")]
    return _signed_cells(base, cells, "relative_drop", "relative drop", tooltip, "label").properties(
        width=40 * cells["language"].n_unique(), height=24 * cells["relation"].n_unique()).facet(
        column=alt.Column("k:O", title="units switched off (k)"),
    ).properties(title="Recall across languages with a relation's own units off (* significant)")


def perplexity_chart(perplexity: pl.DataFrame) -> alt.LayerChart:
    """Perplexity of neutral text relative to the unmodified model, per ablation (1 = unchanged)."""
    ablated = perplexity.filter(pl.col("ablated_relation").is_not_null() & (pl.col("k") > 0))  # not the baseline row
    bars = ablated.group_by("ablated_relation", "k", "control").agg(
        ratio=pl.col("ratio").mean(), perplexity=pl.col("perplexity").mean(),
        baseline_perplexity=pl.col("baseline_perplexity").first()).sort("ablated_relation", "k", "control")
    # Dots, not bars: the ratios sit near 1, and the differences are what matters.
    bar = alt.Chart().mark_point(filled=True, size=90).encode(
        x=alt.X("ablated_relation:N", title=None, axis=alt.Axis(labelAngle=-30)),
        xOffset=alt.XOffset("control:N"),
        y=alt.Y("ratio:Q", title="perplexity / unmodified perplexity", scale=alt.Scale(zero=False)),
        color=alt.Color("control:N", scale=alt.Scale(domain=["top_k", "random"], range=["#d62728", "#7f7f7f"])),
        tooltip=["ablated_relation:N", "k:Q", "control:N", alt.Tooltip("ratio:Q", format=".3f"),
                 alt.Tooltip("perplexity:Q", format=".2f"), alt.Tooltip("baseline_perplexity:Q", format=".2f")])
    unchanged = alt.Chart().mark_rule(strokeDash=[4, 3]).encode(y=alt.datum(1))
    return alt.layer(bar, unchanged, data=_data(bars)).properties(
        width=max(200, 60 * bars["ablated_relation"].n_unique()), height=180).facet(
        column=alt.Column("k:O", title="units switched off (k)"),
    ).properties(title="Perplexity of neutral text with a relation's units off (random: mean over seeds)")


def overlap_chart(overlap: pl.DataFrame) -> alt.FacetChart:
    base = alt.Chart().encode(x=alt.X("relation_a:N", title=None, axis=alt.Axis(labelAngle=-40)),
                              y=alt.Y("relation_b:N", title=None))
    heat = base.mark_rect().encode(
        color=alt.Color("jaccard:Q", scale=alt.Scale(scheme="blues", domain=[0, 1]), title="Jaccard"),
        tooltip=["relation_a:N", "relation_b:N", "k:Q", "shared:Q", alt.Tooltip("jaccard:Q", format=".3f")])
    text = base.mark_text(fontSize=10).encode(
        text="shared:Q", color=alt.condition("datum.jaccard > 0.6", alt.value("white"), alt.value("black")))
    side = 38 * overlap["relation_a"].n_unique()
    return alt.layer(heat, text, data=_data(overlap)).properties(width=side, height=side).facet(
        column=alt.Column("k:O", title="units per relation (k)"),
    ).properties(title="Units shared between relations' top-k sets (number; color: Jaccard)")


def placement_chart(counts: pl.DataFrame, n_layers: int, k: int) -> alt.FacetChart:
    return alt.Chart(_data(counts)).mark_bar().encode(
        x=alt.X("layer:O", scale=alt.Scale(domain=list(range(n_layers))), axis=alt.Axis(labelAngle=0)),
        y=alt.Y("units:Q", title="units"), color=alt.Color("site:N", scale=SITE_COLORS),
        tooltip=["relation:N", "layer:O", "site:N", "units:Q"],
    ).properties(width=max(400, 18 * n_layers), height=70).facet(
        row=alt.Row("relation:N", title=None, header=alt.Header(labelAngle=0, labelAlign="left")),
    ).properties(title=f"Layer and site of each relation's top {k} units")


def sparsity_chart(per_layer: pl.DataFrame) -> alt.FacetChart:
    measures = {"firing_rate": "fraction of tokens > 0", "active_rate": "fraction of tokens |value| > threshold"}
    present = [m for m in measures if m in per_layer.columns]
    long = per_layer.unpivot(on=present, index=["site", "layer", "dead_units", "units"], variable_name="measure",
                             value_name="rate").with_columns(pl.col("measure").replace(measures))
    return alt.Chart(_data(long)).mark_line(point=True).encode(
        x=alt.X("layer:Q", axis=alt.Axis(tickMinStep=1)),
        y=alt.Y("rate:Q", title="mean over the layer's units"),
        color=alt.Color("site:N", scale=SITE_COLORS),
        tooltip=["site:N", "layer:Q", "measure:N", alt.Tooltip("rate:Q", format=".3f"), "dead_units:Q", "units:Q"],
    ).properties(width=420, height=200).facet(column=alt.Column("measure:N", title=None)).properties(
        title="Sparsity per layer (every token of the identification prompts)")


def label_placement_chart(counts: pl.DataFrame, n_layers: int) -> alt.FacetChart:
    """Units each label's selections chose per layer (bars by site), one row per label, one column
    per method: the placement chart of the labelled corpora."""
    data = counts.with_columns(pl.col("method").replace({"lape": "LAPE", "ap": "AP"}))
    return alt.Chart(_data(data)).mark_bar().encode(
        x=alt.X("layer:O", scale=alt.Scale(domain=list(range(n_layers))), axis=alt.Axis(labelAngle=0)),
        y=alt.Y("units:Q", title="units"), color=alt.Color("site:N", scale=SITE_COLORS),
        tooltip=["method:N", "label:N", "layer:O", "site:N", "units:Q"],
    ).properties(width=max(300, 12 * n_layers), height=70).facet(
        row=alt.Row("label:N", title=None, header=alt.Header(labelAngle=0, labelAlign="left")),
        column=alt.Column("method:N", title=None, sort=["LAPE", "AP"]),
    ).properties(title="Layer and site of each label's selected units")


def label_perplexity_chart(cells: pl.DataFrame, subtitle: str) -> alt.FacetChart:
    """Excess NLL of the selection over matched random units, ablated label (rows) × evaluated
    label (columns), one matrix per method; each cell reads selected ratio / random ratio."""
    data = cells.with_columns(pl.col("method").replace({"lape": "LAPE", "ap": "AP"}))
    base = alt.Chart().encode(
        x=alt.X("eval_label:N", title="evaluated label (held-out text)", axis=alt.Axis(labelAngle=-40)),
        y=alt.Y("ablated_label:N", title="label whose units are off"))
    tooltip = ["method:N", alt.Tooltip("ablated_label:N", title="off"),
               alt.Tooltip("eval_label:N", title="evaluated"),
               alt.Tooltip("units:Q", title="units off"), alt.Tooltip("selected_ratio:Q", format=".4f"),
               alt.Tooltip("random_ratio:Q", format=".4f"), alt.Tooltip("excess:Q", format=".4f"),
               alt.Tooltip("ci_low:Q", format=".4f"), alt.Tooltip("ci_high:Q", format=".4f"),
               alt.Tooltip("excess_per_unit:Q", format=".3g"), alt.Tooltip("contexts:Q"),
               alt.Tooltip("q_value:Q", format=".3g")]
    side = 80 * data["eval_label"].n_unique()
    return _signed_cells(base, data, "excess", "excess (nats/token)", tooltip, "text").properties(
        width=side, height=side * 0.5).facet(
        column=alt.Column("method:N", title=None, sort=["LAPE", "AP"]),
    ).properties(title=alt.TitleParams(
        "Perplexity with a label's units off: selected ×ratio / random ×ratio; red: the selection hurts more",
        subtitle=subtitle))


def explain_scores_chart(counts: pl.DataFrame) -> alt.Chart:
    """Units per balanced accuracy, one row per explainer: the descriptions against the shuffled
    control (chance: 0.5)."""
    return alt.Chart(_data(counts)).mark_bar(size=8).encode(
        x=alt.X("balanced_accuracy:Q", scale=alt.Scale(domain=[0, 1]), title="balanced accuracy (0.5: chance)"),
        y=alt.Y("units:Q", title="units"),
        color=alt.Color("explainer:N", legend=None),
        row=alt.Row("explainer:N", title=None, header=alt.Header(labelAngle=0, labelAlign="left")),
        tooltip=["explainer:N", "balanced_accuracy:Q", "units:Q"],
    ).properties(width=360, height=70, title="Detection scores of the descriptions on held-out contexts")
