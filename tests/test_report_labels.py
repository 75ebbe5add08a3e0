"""The report's corpus and labelled-corpora sections, from stand-in label tables
(report_fixtures.write_label_analyses, in the labels stage's schemas): the numbers shown equal a
recomputation from the tables, the findings' verdicts follow constructed numbers, and a report of a
run without the relation study builds through the command, renders in headless Chromium without
console errors, and names its inputs in the workflow as the config says."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from scipy.stats import norm

from conftest import REPO, run_snakemake
from report_browser import browser, open_report, unavailable_reason
from report_fixtures import KEY, label_perplexity_table, write_label_analyses

from neuronmap import cli
from neuronmap.config.schema import validated
from neuronmap.report import labels
from neuronmap.report.inputs import INPUTS, options
from neuronmap.report.label_findings import label_findings

LABELS = ("de", "en", "es")
LABEL_FIGURES = {"label_placement", "label_perplexity"}


@pytest.fixture(scope="module")
def label_files(tmp_path_factory, smollm2_dir):
    from neuronmap.model.loading import read_manifest
    n_layers = read_manifest(smollm2_dir)["n_layers"]
    return write_label_analyses(tmp_path_factory.mktemp("labels"), n_layers=n_layers, width=1536)


def config(**changes) -> dict:
    return validated({"run": "labels", "relation_study": False, "corpus": {"path": "tests/data/corpus"}, **changes})


def report(tmp: Path, model_dir: Path, files: dict[str, Path], run_config: dict, *options: str) -> int:
    return cli.main(["report", "--config-json", json.dumps(run_config, sort_keys=True), "--model-dir", str(model_dir),
                     *options, "--out", str(tmp / "report.html"), "--figures-dir", str(tmp / "figures")])


def payload(html_path: Path) -> dict:
    text = html_path.read_text()
    found = re.search(r'<script type="application/json" id="neuronmap-data">(.*?)</script>', text, re.S)
    return json.loads(found.group(1))


# ------------------------------------------------------------------ the numbers shown

def test_section_numbers_equal_a_recomputation(label_files):
    units = pl.read_parquet(label_files["label_units"])
    records = pl.read_parquet(label_files["label_records"])
    contexts = pl.read_parquet(label_files["contexts"])

    # Units per method, label, layer and site: a plain count of the rows.
    counted = Counter(units.select("method", "label", "layer", "site").iter_rows())
    placement = labels.label_placement(units)
    assert {(m, lab, layer, s): n for m, lab, layer, s, n in placement.iter_rows()} == counted

    # Each selection's size, layers and firing rates, from a dictionary of the records.
    rate = {(s, layer, u, lab): r for s, layer, u, lab, r in
            records.select(*KEY, "label", "firing_rate").iter_rows()}
    selections = labels.label_selections(units, records)
    assert selections.height == len(LABELS) * 2
    for row in selections.iter_rows(named=True):
        chosen = units.filter((pl.col("method") == row["method"]) & (pl.col("label") == row["label"]))
        layers = chosen["layer"].to_numpy()
        assert row["units"] == chosen.height
        assert (row["layer_min"], row["layer_max"]) == (layers.min(), layers.max())
        assert row["layer_median"] == pytest.approx(np.median(layers))
        own = [rate[(*unit, row["label"])] for unit in chosen.select(KEY).iter_rows()]
        others = [rate[(*unit, other)] for unit in chosen.select(KEY).iter_rows() for other in LABELS
                  if other != row["label"]]
        assert row["firing_rate_own"] == pytest.approx(np.mean(own), rel=1e-12)
        assert row["firing_rate_others"] == pytest.approx(np.mean(others), rel=1e-12)

    # The records' contexts and tokens per label are those of the contexts not held out.
    kept = contexts.filter(~pl.col("heldout"))
    for label, n_contexts, tokens in labels.label_tokens(records).iter_rows():
        mine = kept.filter(pl.col("label") == label)
        assert (n_contexts, tokens) == (mine.height, mine["n_tokens"].sum())

    # The corpus summary, by label, from the contexts' rows.
    for label, documents, n_contexts, tokens, heldout in labels.corpus_summary(contexts).iter_rows():
        rows = [r for r in contexts.iter_rows(named=True) if r["label"] == label]
        assert documents == len({r["document"] for r in rows}) and n_contexts == len(rows)
        assert tokens == sum(r["n_tokens"] for r in rows) and heldout == sum(r["heldout"] for r in rows)
    assert dict(labels.corpus_units(pl.read_parquet(label_files["corpus_units"])).select("site", "units")
                .iter_rows()) == {"gate": 30 * 1536, "down": 30 * 576}

    # The overlap: shared units and Jaccard index from the two sets of each label.
    for row in labels.label_overlap(pl.read_parquet(label_files["label_overlap"])).iter_rows(named=True):
        sets = [set(units.filter((pl.col("method") == m) & (pl.col("label") == row["label"])).select(KEY)
                    .iter_rows()) for m in ("lape", "ap")]
        assert row["shared"] == len(sets[0] & sets[1])
        assert row["jaccard"] == pytest.approx(len(sets[0] & sets[1]) / len(sets[0] | sets[1]))

    # The perplexity matrix: one cell per method, ablated and evaluated label; the mark is the test's.
    perplexity = pl.read_parquet(label_files["label_perplexity"])
    cells = labels.perplexity_cells(perplexity)
    assert cells.height == 2 * len(LABELS) ** 2
    for cell in cells.iter_rows(named=True):
        source = perplexity.filter(
            (pl.col("method") == cell["method"]) & (pl.col("ablated_label") == cell["ablated_label"])
            & (pl.col("eval_label") == cell["eval_label"])).row(0, named=True)
        mark = "*" if source["significant"] else ""
        assert cell["mark"] == mark
        assert cell["text"] == f"{source['selected_ratio']:.2f}/{source['random_ratio']:.2f}{mark}"
        assert cell["excess"] == source["excess"] and cell["q_value"] == source["q_value"]


# ------------------------------------------------------------------ the findings

def diagonal_cells(diagonal: dict, off=(0.0, -0.02, 0.02, 0.9)) -> dict:
    """Every (method, ablated, evaluated) cell: `diagonal` for the own label, `off` elsewhere."""
    return {(m, a, e): diagonal[m, a] if a == e else off for m in ("lape", "ap") for a in LABELS for e in LABELS
            if (m, a) in diagonal}


def selections(sizes: dict) -> pl.DataFrame:
    """label_units with `sizes[(method, label)]` gate units each."""
    rows = [{"method": m, "label": lab, "site": "gate", "layer": 3, "unit": u, "score": 0.0, "rank": u + 1}
            for (m, lab), n in sizes.items() for u in range(n)]
    return pl.DataFrame(rows)


def verdicts(rows: pl.DataFrame, prop: str) -> dict[str, str]:
    return dict(rows.filter(pl.col("property") == prop).select("scope", "verdict").iter_rows())


def test_lape_clearly_hurts_more_per_unit():
    sizes = {(m, lab): 40 for m in ("lape", "ap") for lab in LABELS}
    diagonal = {**{("lape", lab): (0.40, 0.35, 0.45, 1e-6) for lab in LABELS},
                **{("ap", lab): (0.10, 0.06, 0.14, 1e-5) for lab in LABELS}}
    rows = label_findings(label_perplexity_table(selections(sizes), diagonal_cells(diagonal)), 0.95, 0.05)
    assert set(verdicts(rows, "own-label perplexity").values()) == {"holds"}
    assert set(verdicts(rows, "specificity").values()) == {"specific"}
    assert verdicts(rows, "LAPE vs AP per unit") == {**{lab: "LAPE" for lab in LABELS}, "all labels": "LAPE"}
    de = rows.filter((pl.col("property") == "LAPE vs AP per unit") & (pl.col("scope") == "de")).row(0, named=True)
    assert de["estimate"] == pytest.approx(0.40 / 40 - 0.10 / 40)
    # The sentence quotes the numbers it decided from.
    assert "+1.00e-02" in de["statement"] and "+2.50e-03" in de["statement"]
    assert "LAPE's selection hurts it more" in de["statement"]
    summary = rows.filter(pl.col("scope") == "all labels")["statement"][0]
    assert "more per unit in 3, AP's in 0, and the numbers do not decide in 0" in summary

    # Specificity: own excess minus the others' mean, its interval from the cells' (independent) errors.
    z = norm.ppf(0.975)
    se_own, se_other = 0.05 / z, 0.02 / z
    spec = rows.filter((pl.col("property") == "specificity") & (pl.col("scope") == "LAPE de")).row(0, named=True)
    half = z * math.sqrt(se_own ** 2 + 2 * se_other ** 2 / 4)
    assert spec["estimate"] == pytest.approx(0.40) and spec["ci_low"] == pytest.approx(0.40 - half)
    assert spec["ci_high"] == pytest.approx(0.40 + half)


def test_per_unit_not_total_decides_which_selection_hurts_more():
    # LAPE's 40 units raise the excess twice as much as AP's 10, so AP hurts more per unit.
    sizes = {**{("lape", lab): 40 for lab in LABELS}, **{("ap", lab): 10 for lab in LABELS}}
    diagonal = {**{("lape", lab): (0.40, 0.36, 0.44, 1e-6) for lab in LABELS},
                **{("ap", lab): (0.20, 0.18, 0.22, 1e-6) for lab in LABELS}}
    rows = label_findings(label_perplexity_table(selections(sizes), diagonal_cells(diagonal)), 0.95, 0.05)
    assert verdicts(rows, "LAPE vs AP per unit") == {**{lab: "AP" for lab in LABELS}, "all labels": "AP"}


def test_overlapping_intervals_leave_the_comparison_undecided():
    sizes = {(m, lab): 40 for m in ("lape", "ap") for lab in LABELS}
    diagonal = {**{("lape", lab): (0.30, 0.10, 0.50, 1e-4) for lab in LABELS},
                **{("ap", lab): (0.25, 0.05, 0.45, 1e-4) for lab in LABELS}}
    rows = label_findings(label_perplexity_table(selections(sizes), diagonal_cells(diagonal)), 0.95, 0.05)
    assert set(verdicts(rows, "own-label perplexity").values()) == {"holds"}
    assert verdicts(rows, "LAPE vs AP per unit") == {**{lab: "undecided" for lab in LABELS},
                                                      "all labels": "undecided"}
    assert all("intervals overlap" in s for s in rows.filter(
        (pl.col("property") == "LAPE vs AP per unit") & (pl.col("scope") != "all labels"))["statement"])


def test_nothing_significant_decides_nothing():
    sizes = {(m, lab): 40 for m in ("lape", "ap") for lab in LABELS}
    diagonal = {(m, lab): (0.01, -0.05, 0.07, 0.6) for m in ("lape", "ap") for lab in LABELS}
    rows = label_findings(label_perplexity_table(selections(sizes), diagonal_cells(diagonal)), 0.95, 0.05)
    assert set(rows["verdict"].to_list()) == {"undecided"}
    assert rows.height == 2 * len(LABELS) * 2 + len(LABELS) + 1
    rise = rows.filter(pl.col("property") == "own-label perplexity").row(0, named=True)
    assert rise["q_value"] == pytest.approx(0.9) and "is not told apart from" in rise["statement"]


def test_a_significant_fall_is_reversed_and_an_empty_selection_undecided():
    # LAPE selected nothing for es; AP's units for de lower de's perplexity against random units.
    sizes = {**{("lape", lab): 20 for lab in ("de", "en")}, **{("ap", lab): 20 for lab in LABELS}}
    diagonal = {("lape", "de"): (0.2, 0.1, 0.3, 1e-6), ("lape", "en"): (0.2, 0.1, 0.3, 1e-6),
                ("lape", "es"): (0.0, 0.0, 0.0, 1.0), ("ap", "de"): (-0.2, -0.3, -0.1, 1e-6),
                ("ap", "en"): (0.1, 0.05, 0.15, 1e-6), ("ap", "es"): (0.1, 0.05, 0.15, 1e-6)}
    rows = label_findings(label_perplexity_table(selections(sizes), diagonal_cells(diagonal)), 0.95, 0.05)
    rise = verdicts(rows, "own-label perplexity")
    assert rise["AP de"] == "reversed" and rise["LAPE de"] == "holds" and rise["LAPE es"] == "undecided"
    assert verdicts(rows, "specificity")["AP de"] == "reversed"
    comparison = verdicts(rows, "LAPE vs AP per unit")
    assert comparison["de"] == "LAPE" and comparison["es"] == "undecided"
    empty = rows.filter((pl.col("property") == "LAPE vs AP per unit") & (pl.col("scope") == "es"))["statement"][0]
    assert "LAPE selected no units" in empty


# ------------------------------------------------------------------ the report of a run without the relation study

@pytest.fixture(scope="module")
def labels_report(label_files, smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("labels-report")
    assert report(out, smollm2_dir, label_files, config(), *options(label_files)) == 0
    return out


def test_labels_only_report_shows_the_section(labels_report, label_files):
    text = (labels_report / "report.html").read_text()
    anchors = re.findall(r'<h2 id="([^"]+)"', text)
    assert anchors == ["summary", "corpus", "labels", "run"]
    assert {p.stem for p in (labels_report / "figures").glob("*.svg")} == LABEL_FIGURES
    assert {p.stem for p in (labels_report / "figures").glob("*.png")} == LABEL_FIGURES

    data = payload(labels_report / "report.html")
    assert data["atlas"] is None
    figures = {f["name"]: f["spec"]["data"]["values"] for f in data["figures"]}
    # The figures draw the tables' numbers: units per layer, and each cell's excess and ratios.
    units = pl.read_parquet(label_files["label_units"])
    drawn = Counter({(r["method"], r["label"], r["layer"]): 0 for r in figures["label_placement"]})
    for r in figures["label_placement"]:
        drawn[r["method"], r["label"], r["layer"]] += r["units"]
    names = {"lape": "LAPE", "ap": "AP"}
    assert drawn == Counter((names[m], lab, layer) for m, lab, layer in units.select("method", "label", "layer")
                            .iter_rows())
    perplexity = pl.read_parquet(label_files["label_perplexity"])
    expected = {(names[r["method"]], r["ablated_label"], r["eval_label"]): (r["excess"], r["selected_ratio"],
                r["random_ratio"]) for r in perplexity.iter_rows(named=True)}
    assert {(c["method"], c["ablated_label"], c["eval_label"]): (c["excess"], c["selected_ratio"], c["random_ratio"])
            for c in figures["label_perplexity"]} == expected

    # One stated finding per row the findings compute, in the page.
    settings = config()["significance"]
    rows = label_findings(perplexity, settings["confidence"], settings["alpha"])
    items = re.findall(r'<li data-property="[^"]*" data-scope="[^"]*"><b>[^<]*</b> \(([^)]*)\): ', text)
    assert items == rows["verdict"].to_list()


@pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or "")
def test_labels_only_report_opens_in_chromium(labels_report):
    with browser() as context, open_report(context, labels_report / "report.html") as opened:
        assert opened.page.get_attribute("body", "data-rendered") == "true", opened.console_errors
        assert opened.console_errors == [] and opened.foreign_requests == []
        sizes = opened.page.eval_on_selector_all(".figure", """figures => figures.map(f => {
            const box = f.querySelector("svg").getBoundingClientRect(); return [box.width, box.height]; })""")
        assert len(sizes) == len(LABEL_FIGURES) and all(w > 50 and h > 50 for w, h in sizes)
        assert opened.page.locator("ul.label-findings li").count() > 0


def test_corpus_only_report_summarises_the_corpus(label_files, smollm2_dir, tmp_path):
    assert report(tmp_path, smollm2_dir, label_files, config(labels={"enabled": False}),
                  "--contexts", str(label_files["contexts"])) == 0
    text = (tmp_path / "report.html").read_text()
    assert re.findall(r'<h2 id="([^"]+)"', text) == ["summary", "corpus", "run"]
    contexts = pl.read_parquet(label_files["contexts"])
    assert f"{contexts.height} contexts" in text and f"{contexts['n_tokens'].sum()} tokens in all" in text
    assert not list((tmp_path / "figures").glob("*.svg"))


def test_labels_without_ap_report_lapes_alone(label_files, smollm2_dir, tmp_path):
    """labels.ap false: LAPE's selection only, no overlap file; the comparison says AP was not checked."""
    lape = {}
    for name in ("label_records", "label_units", "label_perplexity"):
        frame = pl.read_parquet(label_files[name])
        lape[name] = tmp_path / label_files[name].name
        (frame.filter(pl.col("method") == "lape") if "method" in frame.columns else frame).write_parquet(lape[name])
    assert report(tmp_path, smollm2_dir, label_files, config(labels={"ap": False}), *options(lape)) == 0
    text = (tmp_path / "report.html").read_text()
    assert "AP: not run" in text and "units both selections chose" not in text
    rows = label_findings(pl.read_parquet(lape["label_perplexity"]), 0.95, 0.05)
    comparison = rows.filter(pl.col("property") == "LAPE vs AP per unit")
    assert set(comparison["verdict"]) == {"undecided"}
    assert all("AP's selection was not checked" in s for s in comparison.filter(pl.col("scope") != "all labels")
               ["statement"])


def test_report_command_wants_whole_parts(label_files, smollm2_dir, tmp_path, capsys):
    assert report(tmp_path, smollm2_dir, label_files, config(), "--label-units",
                  str(label_files["label_units"])) == 2
    assert "missing --label-records, --label-perplexity" in capsys.readouterr().err
    assert report(tmp_path, smollm2_dir, label_files, config(), "--prompts", "prompts.parquet") == 2
    assert "the relation study needs every one of its files; missing --baseline" in capsys.readouterr().err
    assert report(tmp_path, smollm2_dir, label_files, config()) == 2
    assert "nothing to report" in capsys.readouterr().err


# ------------------------------------------------------------------ the workflow's report job

@pytest.mark.parametrize("case", ["corpus", "everything"])
def test_report_job_reads_what_the_config_runs(case, tmp_path):
    """A dry run lists the report job with the options of the parts the config runs: those of the
    corpus pass alone, or every input the report declares (neuronmap.report.inputs), each from
    the rule that writes it (a name declared on one side only stops the workflow)."""
    if case == "corpus":
        run_config = {"run": "report-corpus", "relation_study": False, "corpus": {"path": "tests/data/corpus"},
                      "labels": {"enabled": False}}
        parts = {"model", "corpus"}
    else:
        run_config = {**yaml.safe_load((REPO / "tests" / "data" / "tiny.yaml").read_text()), "run": "report-all",
                      "explain": {"enabled": True}}
        parts = {"model", "study", "corpus", "labels", "explain"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(run_config))
    result = run_snakemake(path, "--dry-run", "--printshellcmds", "--forceall", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    command = next(line for line in result.stdout.splitlines() if "neuronmap report " in line)
    named = re.findall(r" (--[a-z-]+)", command.split("}'", 1)[1])
    assert named == [*options({i.name: [] for i in INPUTS if i.part in parts}), "--out", "--figures-dir"]
