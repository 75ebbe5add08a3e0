"""The report stage: one self-contained HTML file with the run's findings and the neuron atlas,
and every figure as SVG and PNG beside it.

The workflow produces every input, so each section reads its files and draws them; one function
per section. Modules: data (numbers), charts (figures), atlas (the atlas payload), page (HTML
assembly), assets/ (the page's stylesheet and script).
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from .. import __version__
from ..errors import NeuronmapError
from ..io.parquet import read_table, write_text
from ..maths.expertise import top_ties
from ..model.loading import load_tokenizer, read_manifest
from . import charts, data, labels
from . import explain as explain_numbers
from .findings import findings
from .inputs import ReportFiles
from .label_findings import label_findings
from .atlas import build_atlas
from .page import Page, note, table, write_figures

log = logging.getLogger(__name__)

DEACTIVATED = {"zero": "set to 0", "mean": "set to their mean on negatives", "clamp": "clamped"}


@dataclass(frozen=True)
class Run:
    """What several sections read, loaded once. `config` is the validated config (every key)."""
    inputs: ReportFiles
    config: dict
    manifest: dict
    prompts: pl.DataFrame
    units: pl.DataFrame
    baseline: pl.DataFrame
    ties: pl.DataFrame  # per relation: units at the top AP, and those separation leaves tied
    n_units: int

    @classmethod
    def load(cls, inputs: ReportFiles, config: dict) -> Run:
        ties = []
        for path in inputs.expertise:
            expertise = read_table(path, ["site", "layer", "unit", "ap", "separation"])
            ties.append({"relation": path.name.removesuffix(".parquet"), "units": expertise.height,
                         "top AP": expertise["ap"].max(), **top_ties(expertise)})
        return cls(inputs=inputs, config=config, manifest=read_manifest(inputs.model_dir),
                   prompts=read_table(inputs.prompts), units=pl.concat([read_table(p) for p in inputs.units]),
                   baseline=data.baseline_accuracy(read_table(inputs.baseline)),
                   ties=pl.DataFrame(ties).sort("relation"), n_units=ties[0]["units"])


@dataclass(frozen=True)
class CorpusRun:
    """What the corpus and labels sections read, loaded once (the label records are read in their section)."""
    inputs: ReportFiles
    config: dict
    manifest: dict
    contexts: pl.DataFrame | None
    label_units: pl.DataFrame | None
    perplexity: pl.DataFrame | None

    @classmethod
    def load(cls, inputs: ReportFiles, config: dict) -> CorpusRun:
        def optional(path, columns=None):
            return read_table(path, columns) if path is not None else None
        return cls(inputs=inputs, config=config, manifest=read_manifest(inputs.model_dir),
                   contexts=optional(inputs.contexts, ["document", "label", "n_tokens", "heldout"]),
                   label_units=optional(inputs.label_units), perplexity=optional(inputs.label_perplexity))


def model_fact(manifest: dict) -> tuple[str, str]:
    return ("model", f"<b>{html.escape(manifest['source'])}</b> ({html.escape(manifest['model_type'])}, "
                     f"{manifest['n_layers']} layers)")


def run_facts(config: dict, times: pl.DataFrame) -> list[tuple[str, str]]:
    """The facts every summary ends with: the config, the version, the run time, the date."""
    return [
        ("config sha256", f'<span class="digest" id="config-digest">{data.config_digest(config)}</span>'),
        ("neuronmap", __version__),
        ("run time", f"{times['seconds'].sum():.0f} s over {times['jobs'].sum()} jobs "
                     f"(wall-clock of each job, summed)" if times.height else "no benchmark files"),
        ("generated", f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC"),
    ]


def facts_list(facts: list[tuple[str, str]]) -> str:
    return '<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"


def summary_section(page: Page, run: Run) -> None:
    config, manifest = run.config, run.manifest
    times = data.stage_times(run.inputs.prompts.parent / "benchmarks")
    relations = sorted(run.prompts["relation"].unique().to_list())
    n_prompts = run.prompts.group_by("split").len()
    split = dict(zip(n_prompts["split"].to_list(), n_prompts["len"].to_list()))
    page.add(f"<h1>neuronmap report: {html.escape(config['run'])}</h1>")
    page.section("summary", "Summary")
    facts = [
        model_fact(manifest),
        ("units", f"sites {', '.join(config['sites'])}; response pooled by {config['pooling']}"),
        ("relations", f"{len(relations)}: {', '.join(html.escape(r) for r in relations)}"),
        ("prompts", f"{split.get('identification', 0)} identification, {split.get('test', 0)} test "
                    f"({config['few_shot']} demonstrations each, from {config['few_shot_sets']} fixed sets per "
                    f"relation, {config['test_few_shot_sets']} for test prompts; responses pooled over the {'asked fact' if config['pool_span'] == 'query' else 'whole prompt'})"),
        *run_facts(config, times),
    ]
    page.add(facts_list(facts))
    page.add('<div class="tables">', table(data.prompt_counts(run.prompts), "prompts per relation"),
             table(times, "run time per stage (benchmark files)", digits=1),
             table(data.cost_summary(read_table(run.inputs.cost)),
                   "what the model-running stages cost: token positions forwarded (padding included) and "
                   "their rate, against bare forward passes of the stage's own regime (cached prefixes, query "
                   "batches; its floor) measured in this run", digits=2),
             table(data.plan_against_cost(json.loads(run.inputs.plan.read_text()), read_table(run.inputs.cost), times,
                                          read_table(run.inputs.calibration) if run.inputs.calibration else None),
                   "the plan made before the run (plan.json, from the model's config alone) beside what the run "
                   "measured; host memory flagged where the largest job's peak (its own high-water mark; decode's, "
                   "sampled by Snakemake's benchmark) is more than "
                   f"{data.PEAK_TOLERANCE:.0%} off the plan", digits=2),
             table(data.package_versions(), "package versions (report job)"), "</div>")


def findings_section(page: Page, run: Run) -> None:
    significance = run.config["significance"]
    rows = findings(read_table(run.inputs.significance), read_table(run.inputs.verdicts),
                    read_table(run.inputs.versatility), read_table(run.inputs.languages),
                    significance["confidence"], significance["alpha"], significance["power"])
    page.section("findings", "Findings")
    page.add(note("Stated from this run's numbers. Excess drop: the random units' mean accuracy minus the top-k "
                  "units' accuracy on the relation's own test prompts (positive: the selected units matter more "
                  "than random ones). Cumulativity pools every relation's facts into the per-relation verdicts' "
                  "test (the table below: an exact permutation test, a bootstrap interval over facts); "
                  "versatility tests the overlap of the selections against the selection rerun on permuted "
                  "relation labels. A property the numbers cannot decide is undecided."))
    page.add('<ul class="findings">' + "".join(
        f'<li data-property="{html.escape(p)}" data-scope="{html.escape(s)}"><b>{html.escape(p)}</b> '
        f'({html.escape(v)}): {html.escape(t)}</li>'
        for p, s, v, t in rows.select("property", "scope", "verdict", "statement").iter_rows()) + "</ul>")
    page.add("<details><summary>the numbers</summary>",
             table(_readable_p(rows.drop("statement"), "p_value"), "findings", digits=4), "</details>")


def verdicts_section(page: Page, run: Run) -> None:
    significance = run.config["significance"]
    page.section("verdicts", "Per relation: its units against random units")
    page.add(note(
        "For each relation and k: accuracy on its own test prompts with its top-k units off, against as many "
        f"random units from the same layers and sites (mean and sd over seeds {run.config['random_seeds']}). "
        "Excess drop: random minus top-k, paired by prompt and clustered by fact, with a "
        f"{significance['confidence']:.0%} bootstrap interval over facts; p: exact permutation test in which any "
        "of the top-k and random sets may be the top-k one, fact by fact; q: Benjamini-Hochberg over the "
        f"relation × k table; the verdict holds or is reversed at q < {significance['alpha']}. Detectable drop: "
        f"the smallest excess drop this relation's prompts would show at p < {significance['alpha']} with "
        f"{significance['power']:.0%} probability (simulated; – : not even losing every answer would)."))
    page.add(table(_readable_p(data.verdict_rows(read_table(run.inputs.verdicts)), "p_value", "q_value"),
                   "the top-k units against random units, relation by relation", digits=3))


def recall_section(page: Page, run: Run) -> None:
    curve = data.cumulativity(read_table(run.inputs.sweep), run.baseline)
    page.section("recall", "Recall per relation and cumulativity")
    page.add(note("Accuracy on each relation's held-out test prompts: the unmodified model, and with the "
                  f"relation's own top-k units (by AP) {DEACTIVATED[run.config['ablation']['value']]}, against as "
                  f"many random units from the same layers and sites (seeds {run.config['random_seeds']}; the band "
                  "spans them)."))
    page.add(page.figure("baseline_accuracy", charts.baseline_chart(run.baseline), "baseline accuracy per relation"))
    page.add(page.figure("cumulativity", charts.cumulativity_chart(curve), "accuracy against k per relation"))
    page.add(table(data.recall_summary(run.baseline, curve), "accuracy on the relation's own test prompts"))


def drop_section(page: Page, run: Run) -> None:
    cells = data.drop_cells(read_table(run.inputs.significance))
    page.section("drop", "Ablated × evaluated relation")
    page.add(note("Relative drop (baseline − ablated) / baseline of recall on the evaluated relation when the "
                  "ablated relation's top-k units are off; negative (blue) means recall rose: interference."))
    page.add(page.figure("drop_matrix", charts.drop_matrix_chart(cells, data.SIGNIFICANCE_RULE),
                         "relative drop matrix per k"))


def overlap_section(page: Page, run: Run) -> None:
    page.section("overlap", "Units shared between relations")
    page.add(page.figure("overlap", charts.overlap_chart(read_table(run.inputs.overlap)), "overlap matrix per k"))
    versatility = read_table(run.inputs.versatility)
    permutations = versatility.filter(pl.col("reading") == "selection")["permutations"].max()
    page.add(note(
        "Each relation's AP counts the other relations' prompts among its negatives, so two selections are not "
        "independent draws: the chance level is the overlap of the same pair when the selection is rerun on "
        f"permuted relation labels ({permutations} permutations; mean and sd), not what two independent random "
        "sets would share (shown for scale). Verdict at Benjamini-Hochberg q < "
        f"{run.config['significance']['alpha']} over the pairs of each k."
        + (" Rows <code>leave_pair_out</code>: each relation ranked without the other's prompts among its "
           "negatives (the reference study's reading; a count, not a test)."
           if (versatility["reading"] == "leave_pair_out").any() else "")))
    page.add(table(_readable_p(data.versatility_rows(versatility), "p_value", "q_value"),
                   "units shared by each pair of relations against chance", digits=1))


def placement_section(page: Page, run: Run) -> None:
    k = max(run.config["top_k"])
    page.section("placement", "Where the selected units sit")
    page.add(page.figure("placement", charts.placement_chart(data.placement(run.units, k), run.manifest["n_layers"], k),
                         "layer by site histogram per relation"))


def sparsity_section(page: Page, run: Run) -> None:
    per_layer = data.sparsity(read_table(run.inputs.sparsity))
    per_site = per_layer.group_by("site").agg(pl.col("dead_units").sum(), pl.col("units").sum(),
                                              pl.col("firing_rate").mean(), pl.col("active_rate").mean()).sort("site")
    page.section("sparsity", "Sparsity per layer")
    page.add(note("Fraction of tokens on which a unit's value is above 0, averaged over the layer's units "
                  "(for gate: how often the gate opens); dead units are never above 0."))
    page.add(page.figure("sparsity", charts.sparsity_chart(per_layer), "firing rate per layer and site"))
    page.add(table(per_site, "per site"))


def languages_section(page: Page, run: Run) -> None:
    cells = data.language_cells(read_table(run.inputs.languages))
    page.section("languages", "Across languages")
    page.add(note("Units identified on the source-language prompts, switched off while the model answers "
                  "the same relation's test prompts in other languages."))
    page.add(page.figure("languages", charts.language_chart(cells), "relative drop per relation and language"))


def side_effects_section(page: Page, run: Run) -> None:
    perplexity = read_table(run.inputs.perplexity)
    page.section("side-effects", "Side effects on neutral text")
    page.add(page.figure("perplexity", charts.perplexity_chart(perplexity), "perplexity ratio per ablation"))
    page.add("<details><summary>the table</summary>", table(perplexity, "perplexity of neutral text", digits=3),
             "</details>")


def expertise_section(page: Page, run: Run) -> None:
    page.section("expertise", "Expertise")
    page.add(note("Average Precision of the selected units. Units are ranked by AP, ties broken by separation "
                  "(the standardized difference of a unit's mean response on positives and on negatives), then "
                  "by site, layer and unit; the second table says how many units share the top AP and how many "
                  "of those separation leaves tied."))
    page.add(table(data.expertise_summary(run.units, sorted(run.config["top_k"]))))
    page.add(table(run.ties.rename({"at_top_ap": "units at the top AP", "unresolved": "still tied after separation"}),
                   "ties at the top of each ranking", digits=4))


def stability_section(page: Page, run: Run) -> None:
    stability = read_table(run.inputs.stability)
    page.section("stability", "Stability of the selections")
    if stability.height == 0:
        page.add(note("Not computed (<code>stability.splits: 0</code>)."))
        return
    page.add(note(
        "Each relation's identification facts (and its negatives' facts) dealt at random into two halves, each "
        "half selecting its own top-k as the selection does: the units both halves select (fraction of k), "
        "against what two independent random sets would share (hypergeometric p-value), and Spearman's "
        "correlation of every unit's AP in the two halves. Halves have half the prompts, so they understate "
        "how well the full selection reproduces."))
    page.add(table(_readable_p(data.stability_rows(stability), "p_value"), "split-half stability", digits=3))


def corpus_summary_section(page: Page, corpus: CorpusRun) -> None:
    """The summary of a run without the relation study: the model, the corpus, the config."""
    config, manifest = corpus.config, corpus.manifest
    times = data.stage_times(corpus.inputs.model_dir.parent / "benchmarks")
    page.add(f"<h1>neuronmap report: {html.escape(config['run'])}</h1>")
    page.section("summary", "Summary")
    facts = [
        model_fact(manifest),
        ("corpus", html.escape(str(config["corpus"]["path"]))),
        ("relation study", "not run (<code>relation_study: false</code>)"),
        *run_facts(config, times),
    ]
    page.add(facts_list(facts))
    page.add('<div class="tables">', table(times, "run time per stage (benchmark files)", digits=1),
             table(data.package_versions(), "package versions (report job)"), "</div>")


def corpus_section(page: Page, corpus: CorpusRun) -> None:
    contexts = corpus.contexts
    page.section("corpus", "Corpus")
    heldout = int(contexts["heldout"].sum())
    page.add(note(f"{contexts.height} contexts of at most {corpus.config['corpus']['context_tokens']} tokens, "
                  f"{int(contexts['n_tokens'].sum())} tokens in all, from {contexts['document'].n_unique()} "
                  "documents" + (f"; {heldout} held-out contexts are kept out of the label records for the "
                                 "perplexity check." if heldout else ".")))
    parts = ['<div class="tables">', table(labels.corpus_summary(contexts), "contexts per label")]
    if corpus.inputs.corpus_units is not None:
        parts.append(table(labels.corpus_units(read_table(corpus.inputs.corpus_units, ["site", "layer"])),
                           "units recorded per site (corpus/units.parquet)"))
    page.add(*parts, "</div>")


def labels_section(page: Page, corpus: CorpusRun) -> None:
    settings, significance = corpus.config["labels"], corpus.config["significance"]
    inputs, selected = corpus.inputs, corpus.label_units
    records = read_table(inputs.label_records, ["site", "layer", "unit", "label", "tokens", "contexts", "firing_rate"])
    page.section("labels", "Labelled corpora")
    ap_units = "as many per label as LAPE chose" if settings["ap_units"] == "match" \
        else f"{settings['ap_units']} per label"
    page.add(note(
        f"Two selections of units per label among the units of sites {', '.join(settings['sites'])}, from the "
        "records of the contexts not held out. LAPE: of the units whose firing rate on some label is above the "
        f"{settings['filter_rate']} quantile of all (unit, label) rates, the {settings['top_rate']:.2%} of lowest "
        "entropy of the firing rate across labels, each belonging to every label on which its rate is above the "
        f"{settings['activation_bar_ratio']} quantile. "
        + ("AP: the units whose mean response over a context best ranks the label's contexts above the "
           f"others' (Average Precision), {ap_units}. " if settings["ap"]
           else "AP: not run (<code>labels.ap</code>). ")
        + "The firing rate is the fraction of a label's tokens on which the unit is above 0."))
    selections = labels.label_selections(selected, records)
    page.add(table(labels.label_summary(records, selections),
                   "per label: the records' contexts and tokens; per selection its units and their mean firing "
                   "rate on the label's tokens and on the other labels'"))
    page.add(page.figure("label_placement", charts.label_placement_chart(
        labels.label_placement(selected), corpus.manifest["n_layers"]), "layer histogram per label and method"))
    page.add(table(selections.select(
        "label", pl.col("method").replace(labels.METHODS), "units", "layer_min", "layer_median", "layer_max"),
        "the layers of each selection"))
    if inputs.label_overlap is not None:
        page.add(table(_readable_p(labels.label_overlap(read_table(inputs.label_overlap)), "p_value"),
                       "units both selections chose, against the number two random sets of as many units would "
                       "share (hypergeometric p-value)", digits=4))

    cells = labels.perplexity_cells(corpus.perplexity)
    page.add("<h3>Perplexity with a label's units off</h3>", note(
        "Each label's held-out text scored with one label's selected units set to 0, against as many random "
        f"units from the same sites and layers (seeds {settings['random_seeds']}). Ratio: perplexity over the "
        "unmodified model's. Excess: per context, the selection's mean NLL minus the random units' (nats per "
        f"token), averaged over contexts, with a {significance['confidence']:.0%} bootstrap interval."))
    page.add(page.figure("label_perplexity", charts.label_perplexity_chart(cells, labels.PERPLEXITY_RULE),
                         "excess perplexity matrix per method"))
    page.add("<details><summary>the table</summary>",
             table(_readable_p(labels.perplexity_table(cells), "q_value"), "perplexity with a label's units off",
                   digits=4), "</details>")

    rows = label_findings(corpus.perplexity, significance["confidence"], significance["alpha"])
    page.add("<h3>Findings</h3>", note("Stated from this run's numbers; what they cannot decide is undecided."))
    page.add('<ul class="findings label-findings">' + "".join(
        f'<li data-property="{html.escape(p)}" data-scope="{html.escape(s)}"><b>{html.escape(p)}</b> '
        f'({html.escape(v)}): {html.escape(t)}</li>'
        for p, s, v, t in rows.select("property", "scope", "verdict", "statement").iter_rows()) + "</ul>")
    page.add("<details><summary>the numbers</summary>",
             table(_readable_p(rows.drop("statement"), "p_value", "q_value"), "findings", digits=4), "</details>")


def explain_section(page: Page, corpus: CorpusRun) -> None:
    settings, significance = corpus.config["explain"], corpus.config["significance"]
    scores = read_table(corpus.inputs.explain_scores)
    explanations = read_table(corpus.inputs.explanations)
    page.section("explain", "Explanations")
    scorer = ", ".join(sorted(scores["scorer"].unique().to_list()))
    page.add(note(
        f"{explanations.select('site', 'layer', 'unit').n_unique()} units ({html.escape(settings['units'])}) "
        "described by the model-free baseline (the tokens carrying their peaks and the words around them) and by "
        f"the text model ({html.escape(settings['explainer']['backend'])}), from the contexts of one half of the "
        "documents; each description judged by the scorer "
        f"({html.escape(scorer)}) on held-out contexts of the other half, up to {settings['score_contexts']} "
        "activating and as many non-activating. Shuffled: another unit's description, the control. Balanced "
        "accuracy reads the scorer's yes/no answers, AUC its odds of yes (where the scorer gives them; else the "
        f"answers): 0.5 is chance for both; intervals: {significance['confidence']:.0%} bootstrap over units, differences "
        "paired by unit."))
    page.add(table(explain_numbers.summary_table(scores, significance["bootstrap_resamples"],
                                                 significance["confidence"], significance["seed"]),
                   "mean score per explainer, and paired differences"))
    page.add(page.figure("explain_scores", charts.explain_scores_chart(explain_numbers.distribution(scores)),
                         "balanced accuracy per explainer"))
    page.add("<details><summary>the descriptions</summary>",
             table(explain_numbers.unit_table(explanations, scores, 100), "per unit, best text-model score first"),
             "</details>")


def _readable_p(frame: pl.DataFrame, *columns: str) -> pl.DataFrame:
    """p- and q-values in three significant digits: fixed decimals would print 1e-9 as 0.0000."""
    return frame.with_columns(pl.col(c).map_elements(lambda p: f"{p:.3g}", return_dtype=pl.String) for c in columns)


def atlas_link(config: dict) -> str:
    """Where the atlas of every unit (`neuronmap atlas`) is served, and how to start it."""
    port = config["atlas"]["port"]
    url = f"http://127.0.0.1:{port}/"
    return note("Every unit of the model, with its corpus records, contexts and label selectivity: "
                "<code>snakemake --cores 2 atlas_index</code>, then <code>neuronmap atlas --config "
                "&lt;config&gt;</code> serves the atlas on a local page, "
                + (f'<a href="{url}">{url}</a>.' if port else "at the address it prints."))


def atlas_section(page: Page, run: Run) -> dict:
    """The atlas's place on the page; returns its payload, which the page embeds as JSON."""
    settings, inputs = run.config["report"], run.inputs
    atlas = build_atlas(
        expertise={path.name.removesuffix(".parquet"): path for path in inputs.expertise}, prompts=run.prompts,
        units_per_relation=settings["atlas_units_per_relation"], prompts_per_unit=settings["atlas_prompts_per_unit"],
        neuron_stats=inputs.neuron_stats, top_activations=inputs.top_activations, decoded=inputs.decoded,
        tokenizer=load_tokenizer(inputs.model_dir, run.config["trust_remote_code"]))
    page.section("atlas", "Neuron atlas")
    page.add(note(f"The top {settings['atlas_units_per_relation']} units of each relation by AP "
                  f"({len(atlas['site'])} distinct units; <code>report.atlas_units_per_relation</code> in the "
                  "config). Bold AP: the unit is among that relation's top units. Click a column to sort, a row "
                  "for the unit's card; the search matches unit names (<code>gate L13 #1272</code>), decoded "
                  "tokens and the peak tokens of top-activating prompts."))
    page.add(atlas_link(run.config))
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
    return atlas


def run_details_section(page: Page, run: Run) -> None:
    page.section("run", "Run details")
    page.add("<h3>Model</h3>", f"<pre>{html.escape(json.dumps(run.manifest, indent=2))}</pre>",
             "<details><summary>Configuration (the JSON whose sha256 is above)</summary>"
             f"<pre>{html.escape(json.dumps(run.config, indent=2, sort_keys=True))}</pre></details>")


def build_report(files: ReportFiles, config: dict, out: str | Path, figures_dir: str | Path) -> None:
    """`config` is the run's validated config (every default filled in); `files` the files of the
    parts of the run that ran (inputs.report_files): the relation study, the corpus pass, the labels stage."""
    if not (files.ran("study") or files.ran("corpus") or files.ran("labels")):
        raise NeuronmapError("report: nothing to report (neither the relation study's files nor the corpus's)")
    run = Run.load(files, config) if files.ran("study") else None
    corpus_run = CorpusRun.load(files, config) if files.ran("corpus") or files.ran("labels") else None
    page = Page(f"neuronmap: {config['run']}")
    if run is not None:
        for section in (summary_section, findings_section, recall_section, verdicts_section, drop_section,
                        overlap_section, placement_section, sparsity_section, languages_section,
                        side_effects_section, expertise_section, stability_section):
            section(page, run)
    else:
        corpus_summary_section(page, corpus_run)
    if files.ran("corpus"):
        corpus_section(page, corpus_run)
    if files.ran("labels"):
        labels_section(page, corpus_run)
    if files.ran("explain"):
        explain_section(page, corpus_run)
    atlas = atlas_section(page, run) if run is not None else None
    if run is None:  # a corpus-only report has no atlas section: the link goes after the corpus
        page.add(atlas_link(config))
    run_details_section(page, run if run is not None else corpus_run)

    text = page.render({"atlas": atlas, "config_sha256": data.config_digest(config)})
    write_figures(page.figures, Path(figures_dir))
    write_text(text, out)
    log.info("wrote %s (%.2f MB, %d figures, %d atlas units)", out, len(text.encode()) / 1e6, len(page.figures),
             len(atlas["site"]) if atlas else 0)
