"""The report stage: one self-contained HTML file with the run's findings and the neuron atlas,
and every figure as SVG and PNG beside it.

Inputs of analyses that a run may not have (per-token statistics, decoded tokens, paired
significance, perplexity) are optional: the page says "Not yet run" in their place.
Modules: report_data (numbers), report_charts (figures), report_atlas (the atlas payload),
report_page (HTML assembly), report_assets/ (the page's stylesheet and script).
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from . import __version__
from . import report_charts as charts
from . import report_data as data
from .model_loading import read_manifest
from .parquet_io import read_table, write_text
from .report_atlas import build_atlas, load_tokenizer
from .report_page import Page, missing, note, table, write_figures

log = logging.getLogger(__name__)

# Mirrors schemas/config.schema.yaml, for callers that pass a config without the report section.
REPORT_DEFAULTS = {"atlas_units_per_relation": 200, "atlas_prompts_per_unit": 5}


@dataclass(frozen=True)
class ReportInputs:
    prompts: Path
    model_dir: Path
    baseline: Path
    ablation: list[Path]
    units: list[Path]
    expertise: list[Path]
    overlap: Path
    benchmarks: Path | None = None          # default: benchmarks/ beside prompts.parquet
    neuron_stats: Path | None = None
    top_activations: Path | None = None
    decoded: Path | None = None
    significance: Path | None = None
    perplexity: Path | None = None
    sweep: Path | None = None
    sparsity: Path | None = None
    languages: Path | None = None

    @property
    def benchmarks_dir(self) -> Path:
        return self.benchmarks or self.prompts.parent / "benchmarks"


def _relation_of(path: Path) -> str:
    return path.name.removesuffix(".parquet")


def build_report(inputs: ReportInputs, config_json: str, out: str | Path, figures_dir: str | Path) -> None:
    config = json.loads(config_json)
    settings = {**REPORT_DEFAULTS, **config.get("report", {})}
    top_k = sorted(config["top_k"])
    prompts = read_table(inputs.prompts)
    manifest = read_manifest(inputs.model_dir)
    ablation = pl.concat([read_table(path) for path in inputs.ablation])
    units = pl.concat([read_table(path) for path in inputs.units])
    overlap = read_table(inputs.overlap)
    baseline = data.baseline_accuracy(read_table(inputs.baseline))
    # A sweep, where the workflow runs one, holds the same curve over more k and seeds.
    curve = data.cumulativity_from_sweep(read_table(inputs.sweep), baseline) if inputs.sweep \
        else data.cumulativity(ablation, baseline)
    significance = read_table(inputs.significance) if inputs.significance else None
    marks = data.significance_marks(significance)
    times = data.stage_times(inputs.benchmarks_dir)
    digest = data.config_digest(config_json)
    relations = sorted(prompts["relation"].unique().to_list())
    n_prompts = prompts.group_by("split").len()
    split = dict(zip(n_prompts["split"].to_list(), n_prompts["len"].to_list()))
    page = Page(f"neuronmap: {config['run']}")
    toc = []

    def section(anchor: str, heading: str) -> None:
        toc.append((anchor, heading))
        page.section(anchor, heading)

    # ------------------------------------------------------------------ summary
    page.add(f"<h1>neuronmap report: {html.escape(config['run'])}</h1>")
    section("summary", "Summary")
    facts = [
        ("model", f"<b>{html.escape(manifest['source'])}</b> ({html.escape(manifest['model_type'])}, "
                  f"{manifest['n_layers']} layers)"),
        ("units", f"sites {', '.join(config['sites'])}; response pooled by {config['pooling']}"),
        ("relations", f"{len(relations)}: {', '.join(html.escape(r) for r in relations)}"),
        ("prompts", f"{split.get('identification', 0)} identification, {split.get('test', 0)} test "
                    f"({config['few_shot']} demonstrations each)"),
        ("config sha256", f'<span class="digest" id="config-digest">{digest}</span>'),
        ("neuronmap", __version__),
        ("run time", f"{times['seconds'].sum():.0f} s over {times['jobs'].sum()} jobs "
                     f"(wall-clock of each job, summed)" if times.height else "no benchmark files"),
        ("generated", f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC"),
    ]
    page.add('<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>")
    page.add('<div class="tables">', table(data.prompt_counts(prompts), "prompts per relation"),
             table(times, "run time per stage (benchmark files)", digits=1),
             table(data.package_versions(), "package versions (report job)"), "</div>")

    # ------------------------------------------------------------------ recall
    section("recall", "Recall per relation and cumulativity")
    switched_off = {"zero": "set to 0", "mean": "set to their mean on negatives", "clamp": "clamped"}.get(
        config.get("ablation", {}).get("value", "zero"), "switched off")
    page.add(note("Accuracy on each relation's held-out test prompts: the unmodified model, and with the "
                  f"relation's own top-k units (by AP) {switched_off}, against as many random units from the same "
                  f"layers and sites (seeds {config['random_seeds']}; the band spans them)."))
    page.add(page.figure("baseline_accuracy", charts.baseline_chart(baseline), "baseline accuracy per relation"))
    page.add(page.figure("cumulativity", charts.cumulativity_chart(curve), "accuracy against k per relation"))
    page.add(table(data.recall_summary(baseline, curve), "accuracy on the relation's own test prompts"))

    # ------------------------------------------------------------------ drop matrix
    section("drop", "Ablated × evaluated relation")
    page.add(note("Relative drop (baseline − ablated) / baseline of recall on the evaluated relation when the "
                  "ablated relation's top-k units are off; negative (blue) means recall rose: interference."))
    if marks is None:
        page.add(missing("Significance of each cell (paired test of per-prompt predictions): this run has no "
                         "<code>significance.parquet</code>, so the cells carry no marks."))
    rule = data.significance_rule(significance) if significance is not None else "significance: not yet run"
    page.add(page.figure("drop_matrix", charts.drop_matrix_chart(data.drop_cells(ablation, marks), rule),
                         "relative drop matrix per k"))

    # ------------------------------------------------------------------ overlap
    section("overlap", "Units shared between relations")
    page.add(page.figure("overlap", charts.overlap_chart(overlap), "overlap matrix per k"))

    # ------------------------------------------------------------------ placement
    section("placement", "Where the selected units sit")
    page.add(page.figure("placement", charts.placement_chart(data.placement(units, top_k[-1]), manifest["n_layers"],
                                                             top_k[-1]), "layer by site histogram per relation"))

    # ------------------------------------------------------------------ sparsity
    section("sparsity", "Sparsity per layer")
    if inputs.sparsity or inputs.neuron_stats:
        if inputs.sparsity:
            per_layer = data.sparsity_from_table(read_table(inputs.sparsity))
        else:
            stats = read_table(inputs.neuron_stats)
            per_layer = data.sparsity(stats.select(c for c in ("site", "layer", "frac_positive", "frac_active")
                                                   if c in stats.columns))
        page.add(note("Fraction of tokens on which a unit's value is above 0, averaged over the layer's units "
                      "(for gate: how often the gate opens); dead units are never above 0."))
        page.add(page.figure("sparsity", charts.sparsity_chart(per_layer), "firing rate per layer and site"))
        rates = [c for c in ("firing_rate", "active_rate") if c in per_layer.columns]
        dead = per_layer.group_by("site").agg(pl.col("dead_units").sum(), pl.col("units").sum(),
                                              *(pl.col(c).mean() for c in rates)).sort("site")
        page.add(table(dead, "per site"))
    else:
        page.add(missing("Per-layer firing rates and dead units come from the per-token statistics: this run "
                         "has no <code>neuron_stats.parquet</code> (nor <code>sparsity.parquet</code>)."))

    # ------------------------------------------------------------------ languages
    section("languages", "Across languages")
    if inputs.languages:
        page.add(note("Units identified on the source-language prompts, switched off while the model answers "
                      "the same relation's test prompts in other languages."))
        page.add(page.figure("languages", charts.language_chart(data.language_cells(read_table(inputs.languages))),
                             "relative drop per relation and language"))
    else:
        page.add(missing("Recall in other languages with the units identified in one: this run has no "
                         "<code>languages.parquet</code>."))

    # ------------------------------------------------------------------ side effects
    section("side-effects", "Side effects on neutral text")
    if inputs.perplexity:
        perplexity = read_table(inputs.perplexity)
        if {"ablated_relation", "k", "control", "ratio", "perplexity", "baseline_perplexity"} <= set(perplexity.columns):
            page.add(page.figure("perplexity", charts.perplexity_chart(perplexity), "perplexity ratio per ablation"))
        page.add("<details><summary>the table</summary>", table(perplexity, "perplexity of neutral text", digits=3),
                 "</details>")
    else:
        page.add(missing("Perplexity of neutral text with and without each relation's units: this run has no "
                         "<code>perplexity.parquet</code>."))

    # ------------------------------------------------------------------ expertise
    section("expertise", "Expertise")
    page.add(note("Average Precision of the selected units. When more units reach AP = 1 than are selected, the "
                  "choice among them is a seeded random tie-break: more identification prompts (or fewer "
                  "demonstrations) sharpen the ranking."))
    page.add(table(data.expertise_summary(units, top_k)))

    # ------------------------------------------------------------------ atlas
    section("atlas", "Neuron atlas")
    tokenizer = load_tokenizer(inputs.model_dir, config.get("trust_remote_code", False)) \
        if inputs.top_activations else None
    atlas = build_atlas(
        expertise={_relation_of(path): path for path in inputs.expertise}, prompts=prompts,
        units_per_relation=settings["atlas_units_per_relation"], prompts_per_unit=settings["atlas_prompts_per_unit"],
        neuron_stats=inputs.neuron_stats, top_activations=inputs.top_activations, decoded=inputs.decoded,
        tokenizer=tokenizer)
    absent = {
        "neuron_stats": "Not yet run: this run has no neuron_stats.parquet (per-token statistics).",
        "top_activations": "Not yet run: this run has no top_activations.parquet.",
        "decoded": "Not yet run: this run has no decoded.parquet (units decoded through the LM head).",
    }
    page.add(note(f"The top {settings['atlas_units_per_relation']} units of each relation by AP "
                  f"({len(atlas['site'])} distinct units; <code>report.atlas_units_per_relation</code> in the "
                  "config). Bold AP: the unit is among that relation's top units. Click a column to sort, a row "
                  "for the unit's card; the search matches unit names (<code>gate L13 #1272</code>), decoded "
                  "tokens and the peak tokens of top-activating prompts."))
    for name, path in (("neuron_stats", inputs.neuron_stats), ("top_activations", inputs.top_activations),
                       ("decoded", inputs.decoded)):
        if path is None:
            page.add(missing(html.escape(absent[name].removeprefix("Not yet run: "))))
    page.add(
        '<div id="atlas-app"><div class="atlas-controls">'
        '<input type="search" id="atlas-search" placeholder="search a token or a unit, e.g. gate L13 #1272" '
        'aria-label="search the atlas">'
        '<select id="atlas-relation" aria-label="relation"><option value="">all relations</option></select>'
        '<select id="atlas-layer" aria-label="layer"><option value="">all layers</option></select>'
        '<select id="atlas-site" aria-label="site"><option value="">all sites</option></select>'
        '<span id="atlas-count"></span></div>'
        '<div class="atlas-body"><div class="atlas-scroll"><table class="atlas"></table>'
        '<button class="more" hidden>show more</button></div>'
        '<aside id="atlas-card" class="card"><p class="empty">Click a unit for its card.</p></aside></div></div>')

    # ------------------------------------------------------------------ run details
    section("run", "Run details")
    page.add("<h3>Model</h3>", f"<pre>{html.escape(json.dumps(manifest, indent=2))}</pre>",
             "<details><summary>Configuration (the JSON whose sha256 is above)</summary>"
             f"<pre>{html.escape(json.dumps(config, indent=2, sort_keys=True))}</pre></details>")

    text = page.render({"atlas": atlas, "missing": absent, "config_sha256": digest}, toc)
    write_figures(page.figures, Path(figures_dir))
    write_text(text, out)
    log.info("wrote %s (%.2f MB, %d figures, %d atlas units)", out, len(text.encode()) / 1e6, len(page.figures),
             len(atlas["site"]))
