"""The report of the end-to-end run, opened in real headless Chromium: it renders offline with no
console error and no request but the file itself, every figure has a size, and the atlas filters
as a reader would use it. Then the same run with stand-in analysis files (report_fixtures: random
significance, several languages), and `snakemake --report` over the registered outputs."""

import zipfile
from pathlib import Path

import polars as pl
import pytest
import yaml

from conftest import REPO, run_snakemake
from report_browser import browser, open_report, unavailable_reason

ARTIFACTS = REPO / "tests" / "artifacts"
KEY = ["site", "layer", "unit"]
# One figure per section that draws one; every analysis the workflow runs has its place.
FIGURES = {"baseline_accuracy", "cumulativity", "drop_matrix", "overlap", "placement", "sparsity", "languages",
           "perplexity"}
# The labelled corpora's, where the run has a labelled corpus.
LABEL_FIGURES = {"label_placement", "label_perplexity"}

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or "")


@pytest.fixture(scope="module")
def chromium():
    with browser() as context:
        yield context


def expertise_files(run: Path) -> dict[str, Path]:
    return {p.name.removesuffix(".parquet"): p for p in sorted((run / "expertise").glob("*.parquet"))
            if not p.name.endswith(".prompts.parquet")}


def expected_atlas(run: Path, per_relation: int) -> pl.DataFrame:
    """The atlas units, computed from the expertise tables: the union of each relation's top."""
    return pl.concat([pl.read_parquet(p).filter(pl.col("rank") <= per_relation).select(KEY)
                      for p in expertise_files(run).values()]).unique()


def schema_default(key: str):
    from neuronmap.config.schema import load_schema
    schema = load_schema()
    return schema["properties"]["report"]["properties"][key]["default"]


def atlas_count(page) -> int:
    return int(page.get_attribute("#atlas-count", "data-count"))


def visible_rows(page) -> list[dict]:
    return page.eval_on_selector_all("table.atlas tbody tr", """rows => rows.map(r => ({
        index: Number(r.dataset.index), cells: [...r.cells].map(c => c.textContent)}))""")


def check_rendered_offline(opened, figures_dir: Path) -> dict:
    page = opened.page
    assert page.get_attribute("body", "data-rendered") == "true", opened.console_errors
    assert opened.console_errors == []
    assert opened.foreign_requests == [], "the report must not request anything"
    sizes = page.eval_on_selector_all(".figure", """figures => figures.map(f => {
        const svg = f.querySelector("svg"); const box = svg && svg.getBoundingClientRect();
        return {id: f.id, width: box ? box.width : 0, height: box ? box.height : 0}; })""")
    written = sorted(p.stem for p in figures_dir.glob("*.svg"))
    assert sorted(s["id"].removeprefix("figure-") for s in sizes) == written
    assert sorted(p.stem for p in figures_dir.glob("*.png")) == written
    for size in sizes:
        assert size["width"] > 50 and size["height"] > 50, size
    return page.evaluate("JSON.parse(document.getElementById('neuronmap-data').textContent)")


def search(page, query: str) -> int:
    page.fill("#atlas-search", query)
    return atlas_count(page)


def test_report_of_the_e2e_run_in_chromium(e2e_run, chromium):
    report = e2e_run / "report.html"
    size_mb = report.stat().st_size / 1e6
    with open_report(chromium, report) as opened:
        data = check_rendered_offline(opened, e2e_run / "figures")
        page = opened.page
        print(f"\ne2e report: {size_mb:.2f} MB, rendered in {opened.seconds_to_render:.2f} s")
        assert size_mb < 10

        labelled = (e2e_run / "labels").is_dir()
        assert {figure["name"] for figure in data["figures"]} == FIGURES | (LABEL_FIGURES if labelled else set())

        # The findings are stated in sentences, one per property and scope, with a verdict each.
        findings = page.eval_on_selector_all("ul.findings li", "items => items.map(i => i.innerText)")
        properties = {text.split(" (")[0] for text in findings}
        assert {"cumulativity", "versatility", "interference", "cross-language transfer"} <= properties
        assert all(page.locator("ul.findings li").nth(i).is_visible() for i in range(len(findings)))

        # The atlas holds exactly the union of every relation's top units.
        atlas = data["atlas"]
        assert atlas["units_per_relation"] == schema_default("atlas_units_per_relation")
        expected = expected_atlas(e2e_run, atlas["units_per_relation"])
        assert set(zip(atlas["site"], atlas["layer"], atlas["unit"])) == set(expected.iter_rows())
        assert atlas_count(page) == expected.height

        # Typing into the search filters the rows to the units that match it.
        query = pick_query(atlas) or f"{atlas['site'][0]} L{atlas['layer'][0]} "
        wanted = matching_units(atlas, query)
        assert 0 < search(page, query) == len(wanted) < len(atlas["site"])
        shown = {row["index"] for row in visible_rows(page)}
        assert shown == wanted if len(wanted) <= 200 else shown <= wanted
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "report-e2e-search.png"))
        search(page, "")

        # Filtering by relation leaves that relation's top units; by layer, that layer's.
        relation = atlas["relations"][0]
        page.select_option("#atlas-relation", relation)
        assert atlas_count(page) == min(atlas["units_per_relation"], len(atlas["site"]))
        top = pl.read_parquet(expertise_files(e2e_run)[relation]).sort("rank").row(0, named=True)
        assert visible_rows(page)[0]["cells"][:3] == [top["site"], str(top["layer"]), str(top["unit"])]
        page.select_option("#atlas-relation", "")
        layer = atlas["layer"][0]
        page.select_option("#atlas-layer", str(layer))
        assert atlas_count(page) == expected.filter(pl.col("layer") == layer).height
        page.select_option("#atlas-layer", "")

        # Sorting by a column orders the rows by it; a row opens the unit's card.
        page.click("table.atlas th:has-text('layer')")
        layers = [int(row["cells"][1]) for row in visible_rows(page)]
        assert layers == sorted(layers)
        page.click("table.atlas tbody tr")
        site, layer, unit = visible_rows(page)[0]["cells"][:3]
        assert page.text_content("#atlas-card h3") == f"{site} L{layer} #{unit}"
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "report-e2e.png"), full_page=True)


def unit_tokens(atlas: dict, i: int) -> list[str]:
    tokens = []
    if atlas["decoded"]:
        for variant in atlas["decoded"]["variants"]:
            tokens += atlas["decoded"]["tokens"][variant][i]
    if atlas["top"]:
        tokens += [entry[2] for entry in atlas["top"][i]]
    return tokens


def matching_units(atlas: dict, query: str) -> set[int]:
    """The documented search: every word of the query is in the unit's name, its decoded tokens
    or its peak tokens (case-insensitive)."""
    words = query.lower().split()
    found = set()
    for i, (site, layer, unit) in enumerate(zip(atlas["site"], atlas["layer"], atlas["unit"])):
        texts = [f"{site} L{layer} #{unit}", f"{site} {layer} {unit}", *unit_tokens(atlas, i)]
        if all(any(w in t.lower() for t in texts) for w in words):
            found.add(i)
    return found


def pick_query(atlas: dict) -> str | None:
    """A word-like token that some but not most units have (None when the atlas has no tokens)."""
    n = len(atlas["site"])
    counts = {}
    for i in range(n):
        for token in {t.strip() for t in unit_tokens(atlas, i)}:
            if token.isalpha() and len(token) >= 4:
                counts[token] = counts.get(token, 0) + 1
    if not counts:
        return None
    return max(counts, key=lambda t: (counts[t] < n // 2, counts[t], t))


@pytest.fixture(scope="module")
def complete_report(e2e_run, tmp_path_factory):
    """The e2e run's report rebuilt with stand-ins for every later analysis, the labelled corpora's too."""
    from report_fixtures import write_label_analyses, write_later_analyses

    from neuronmap.config.schema import validated
    from neuronmap.model.loading import read_manifest
    from neuronmap.report.build import build_report
    from neuronmap.report.inputs import report_files
    out = tmp_path_factory.mktemp("complete")
    extra = write_later_analyses(e2e_run, out / "analyses")
    relations = sorted(expertise_files(e2e_run))
    study = dict(
        prompts=e2e_run / "prompts.parquet", model_dir=e2e_run / "model",
        baseline=e2e_run / "evaluation" / "baseline.parquet",
        units=[e2e_run / "units" / f"{r}.parquet" for r in relations],
        expertise=[e2e_run / "expertise" / f"{r}.parquet" for r in relations],
        overlap=e2e_run / "overlap.parquet", verdicts=e2e_run / "verdicts.parquet",
        versatility=e2e_run / "versatility.parquet", stability=e2e_run / "stability.parquet", **extra)
    config = yaml.safe_load((REPO / "tests" / "data" / "tiny.yaml").read_text())
    config.update(sites=["gate", "up", "act", "down"], pooling="mean", few_shot=3, run="complete",
                  report={"atlas_units_per_relation": 150, "atlas_prompts_per_unit": 4})
    corpus = write_label_analyses(out / "labels", n_layers=read_manifest(e2e_run / "model")["n_layers"], width=1536)
    build_report(report_files({**study, **corpus}), validated(config), out / "report.html", out / "figures")
    return out, extra


def test_report_with_every_analysis_in_chromium(complete_report, chromium):
    out, extra = complete_report
    with open_report(chromium, out / "report.html") as opened:
        data = check_rendered_offline(opened, out / "figures")
        page = opened.page
        assert {p.stem for p in (out / "figures").glob("*.svg")} == FIGURES | LABEL_FIGURES
        atlas = data["atlas"]
        assert atlas["units_per_relation"] == 150

        # Significance marks reach the drop matrix: exactly the top-k cells found significant carry one.
        significance = pl.read_parquet(extra["significance"])
        spec = next(f["spec"] for f in data["figures"] if f["name"] == "drop_matrix")
        marked = {(c["ablated_relation"], c["eval_relation"], c["k"]) for c in spec["data"]["values"]
                  if c["label"].endswith("*")}
        assert marked == set(significance.filter(pl.col("significant") & (pl.col("control") == "top_k"))
                             .select("ablated_relation", "eval_relation", "k").iter_rows()) and marked

        # A token typed into the search leaves exactly the units with that token.
        query = pick_query(atlas)
        wanted = matching_units(atlas, query)
        print(f"\nsearch {query!r}: {len(wanted)} of {len(atlas['site'])} units")
        assert 0 < search(page, query) == len(wanted) < len(atlas["site"])
        assert {row["index"] for row in visible_rows(page)} <= wanted

        # The card marks each peak token inside its prompt.
        page.click("table.atlas tbody tr")
        index = visible_rows(page)[0]["index"]
        marks = page.eval_on_selector_all("#atlas-card pre mark", "ms => ms.map(m => m.textContent)")
        entries = [entry for entry in atlas["top"][index] if entry[4] >= 0]
        assert [m.strip() for m in marks] == [entry[2].strip() for entry in entries] and marks
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator("#atlas-app").screenshot(path=str(ARTIFACTS / "report-atlas-card.png"))
        search(page, "")
        page.screenshot(path=str(ARTIFACTS / "report-complete.png"), full_page=True)


def test_snakemake_report_archive_holds_the_registered_outputs(e2e_run, e2e_config, tmp_path):
    archive = tmp_path / "report.zip"
    result = run_snakemake(e2e_config, "--report", str(archive), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with zipfile.ZipFile(archive) as zipped:
        names = zipped.namelist()
        pages = [name for name in names if "/data/" in name and name.endswith("/report.html")]
        assert len(pages) == 1, names
        assert zipped.read(pages[0]) == (e2e_run / "report.html").read_bytes()
    figures = sorted(p.name for p in (e2e_run / "figures").glob("*.svg"))
    assert figures and all(any(name.endswith(f"/{f}") for name in names) for f in figures), names
