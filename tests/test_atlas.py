"""The atlas of every unit, from the end-to-end run: the index (rule atlas_index) against the files
it joins, checked unit by unit; the API against the Parquet files (a card's examples, histogram and
peak tokens; sort, filter and token search against a reference computed here without polars' sort);
reads are lazy (nothing but the index at start, one layer's row group per card); label sources
from hand-made label tables; a relation-study-only run; then the page in headless Chromium."""

import json
import math
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from neuronmap import cli
from neuronmap.atlas.card import EXAMPLE_COLUMNS
from neuronmap.atlas.index import KEY, STATISTICS, AtlasSources, build_index, write_index
from neuronmap.atlas.server import Atlas, make_server, url_of
from neuronmap.io import tables
from neuronmap.io.histogram import bin_edges
from neuronmap.io.parquet import write_table

from conftest import REPO, run_snakemake
from report_browser import browser, unavailable_reason

ARTIFACTS = REPO / "tests" / "artifacts"
RELATIONS = ["country_capital_city", "verb_past_tense"]
LABELS = ["de", "en"]  # tiny.yaml's corpus: tests/data/corpus/{de,en}.jsonl


@pytest.fixture(scope="module")
def run(e2e_run, e2e_config):
    result = run_snakemake(e2e_config, "atlas_index")
    assert result.returncode == 0, result.stderr[-5000:]
    return e2e_run


@pytest.fixture(scope="module")
def index(run):
    return pl.read_parquet(run / "atlas" / "units.parquet")


@pytest.fixture(scope="module")
def atlas(run):
    return Atlas(run)


def get(atlas, target):
    status, _, body = atlas.answer(target)
    return status, json.loads(body)


def all_pages(atlas, query: str) -> tuple[list[tuple], dict]:
    """Every row a /api/units query selects, page by page (keys), and the first page."""
    keys, offset, first = [], 0, None
    while True:
        status, page = get(atlas, f"/api/units?{query}&offset={offset}&limit=1000")
        assert status == 200, page
        first = first or page
        keys += [tuple(r[:3]) for r in page["rows"]]
        offset += 1000
        if offset >= page["total"]:
            assert len(keys) == page["total"]
            return keys, first


def sample_units(frame: pl.DataFrame, n: int, seed: int = 0) -> list[tuple]:
    rows = np.random.default_rng(seed).choice(frame.height, n, replace=False)
    return [tuple(frame.row(int(i))[:3]) for i in rows]


def unit_rows(path: Path, key: tuple) -> pl.DataFrame:
    site, layer, unit = key
    return pl.read_parquet(path).filter((pl.col("site") == site) & (pl.col("layer") == layer)
                                        & (pl.col("unit") == unit))


# --- the index --------------------------------------------------------------------------------

def test_index_schema_and_metadata(run, index):
    parquet = pq.ParquetFile(run / "atlas" / "units.parquet")
    assert parquet.schema_arrow.remove_metadata() == tables.atlas_units(RELATIONS, LABELS)
    metadata = json.loads(parquet.schema_arrow.metadata[b"neuronmap.atlas"])
    assert metadata["records"] == "corpus" and metadata["relations"] == RELATIONS
    assert metadata["sources"]["examples"] == "corpus/examples.parquet"
    assert metadata["sources"]["expertise"] == {r: f"expertise/{r}.parquet" for r in RELATIONS}
    lower, upper = bin_edges()
    assert [(-math.inf if v is None else v) for v in metadata["hist_lower"]] == list(lower)
    assert [(math.inf if v is None else v) for v in metadata["hist_upper"]] == list(upper)
    assert index.height == 155_520 and index.select(KEY).is_duplicated().sum() == 0


def test_index_equals_its_sources(run, index):
    units = pl.read_parquet(run / "corpus" / "units.parquet")
    assert index.select(KEY).sort(KEY).equals(units.select(KEY).sort(KEY))
    joined = index.join(units, on=KEY, suffix="_src")
    for column in STATISTICS:  # the whole table at once: equal, NaN where NaN
        mine, source = joined[column].to_numpy(), joined[f"{column}_src"].to_numpy()
        np.testing.assert_array_equal(mine, source, err_msg=column)
    for relation in RELATIONS:
        expertise = pl.read_parquet(run / "expertise" / f"{relation}.parquet")
        both = index.join(expertise, on=KEY)
        assert both.height == expertise.height
        np.testing.assert_array_equal(both[f"ap:{relation}"].to_numpy(), both["ap"].to_numpy())
    records = pl.read_parquet(run / "labels" / "label_records.parquet")
    for label in LABELS:
        both = index.join(records.filter(pl.col("label") == label), on=KEY)
        assert both.height == records.filter(pl.col("label") == label).height > 0
        np.testing.assert_array_equal(both[f"rate:{label}"].to_numpy(), both["firing_rate"].to_numpy())
    selected = pl.read_parquet(run / "labels" / "label_units.parquet")
    for method, column in (("lape", "lape"), ("ap", "ap_label")):
        expected = {}
        for site, layer, unit, label in selected.filter(pl.col("method") == method).select(*KEY, "label").rows():
            expected.setdefault((site, layer, unit), []).append(label)
        mine = index.filter(pl.col(column).is_not_null()).select(*KEY, column).rows()
        assert {tuple(row[:3]): row[3] for row in mine} == {k: sorted(v) for k, v in expected.items()}
        assert expected, method
    decoded = pl.read_parquet(run / "decoded.parquet")
    assert index["decoded_token"].is_not_null().sum() == decoded.select(KEY).unique().height
    assert index.filter(pl.col("site") == "down")["decoded_token"].null_count() == 576 * 30


def test_index_rows_brute_force(run, index):
    """A few units, every column, read from each source file with a plain filter."""
    peak, decoded = run / "corpus" / "peak_tokens.parquet", run / "decoded.parquet"
    for key in sample_units(index.filter(pl.col("site") == "up"), 4) + sample_units(index, 4, seed=1):
        row = unit_rows(run / "atlas" / "units.parquet", key).to_dicts()[0]
        source = unit_rows(run / "corpus" / "units.parquet", key).to_dicts()[0]
        for column in STATISTICS:
            assert row[column] == source[column] or (math.isnan(row[column]) and math.isnan(source[column]))
        tokens = unit_rows(peak, key).sort("rank")["token"].to_list()
        assert row["peak_tokens"] == tokens and row["peak_token"] == tokens[0]
        variants = unit_rows(decoded, key).sort("norm_gain", descending=True)
        expected = variants["tokens"][0].to_list() if variants.height else None
        assert row["decoded_tokens"] == expected
        assert row["decoded_token"] == (expected[0] if expected else None)
        for relation in RELATIONS:
            assert row[f"ap:{relation}"] == unit_rows(run / "expertise" / f"{relation}.parquet", key)["ap"][0]


# --- the API ------------------------------------------------------------------------------------

def test_start_reads_the_index_alone_and_a_card_one_layer(run):
    atlas = Atlas(run)
    cards = atlas.cards
    assert cards.cache.reads == 0
    assert all(f._file is None for f in (cards.units, cards.examples, cards.peak_tokens))
    status, _ = get(atlas, "/api/unit/gate/7/100")
    assert status == 200
    for layered in (cards.units, cards.examples, cards.peak_tokens):
        meta = pq.ParquetFile(layered.path).metadata
        column = meta.schema.to_arrow_schema().get_field_index("layer")
        groups = [g for path, g in cards.cache.groups if path == str(layered.path)]
        assert len(groups) == 1 and meta.row_group(groups[0]).column(column).statistics.min == 7
        assert meta.row_group(groups[0]).column(column).statistics.max == 7
    reads = cards.cache.reads
    assert get(atlas, "/api/unit/up/7/5")[0] == 200 and cards.cache.reads == reads  # same layer: cached


def test_card_equals_the_parquet_files(run, atlas, index):
    lower, upper = bin_edges()
    contexts = dict(pl.read_parquet(run / "corpus" / "contexts.parquet").select("context_id", "token_ids").rows())
    for key in sample_units(index, 5, seed=2):
        status, card = get(atlas, "/api/unit/{}/{}/{}".format(*key))
        assert status == 200
        examples = unit_rows(run / "corpus" / "examples.parquet", key)
        for kind in ("top", "bottom"):
            expected = examples.filter(pl.col("kind") == kind).sort("rank").select(EXAMPLE_COLUMNS).to_dicts()
            assert card["examples"][kind] == expected and len(expected) == 3
        for example in card["examples"]["top"] + card["examples"]["bottom"]:  # the token at the peak
            assert contexts[example["context_id"]][example["position"]] == example["token_id"]
        source = unit_rows(run / "corpus" / "units.parquet", key).to_dicts()[0]
        assert [b["bin"] for b in card["histogram"]["bins"]] == source["hist_bins"]
        assert [b["count"] for b in card["histogram"]["bins"]] == source["hist_counts"]
        for b in card["histogram"]["bins"]:
            assert (b["lower"] is None and lower[b["bin"]] == -math.inf) or b["lower"] == lower[b["bin"]]
            assert (b["upper"] is None and upper[b["bin"]] == math.inf) or b["upper"] == upper[b["bin"]]
        assert card["histogram"]["zero_bin"] == int(np.flatnonzero((lower < 0) & (upper > 0))[0])
        peak = unit_rows(run / "corpus" / "peak_tokens.parquet", key).sort("rank")
        assert card["peak_tokens"] == peak.select("rank", "token_id", "token", "contexts", "mean_value").to_dicts()
        for relation in RELATIONS:
            assert card["relations"][relation] == unit_rows(run / "expertise" / f"{relation}.parquet", key)["ap"][0]
        row = index.filter(pl.col("site") == key[0], pl.col("layer") == key[1], pl.col("unit") == key[2])
        assert card["decoded"] == row["decoded_tokens"].to_list()[0]
        records = unit_rows(run / "labels" / "label_records.parquet", key).sort("label")
        assert [(c["label"], c["firing_rate"], c["mean"]) for c in card["labels"]] == records.select(
            "label", "firing_rate", "mean").rows()


def reference_order(index: pl.DataFrame, mask: np.ndarray, column: str, descending: bool) -> list[tuple]:
    """Keys of the masked rows sorted by `column` (missing and NaN last), ties by site, layer, unit;
    Python's own sort, not polars'."""
    keys = index.select(KEY).rows()
    values = index[column].to_list()
    chosen = [i for i in np.flatnonzero(mask)]

    def order(i):
        v = values[i]
        missing = v is None or (isinstance(v, float) and math.isnan(v))
        return (missing, 0 if missing else (-v if descending else v), keys[i])
    return [keys[i] for i in sorted(chosen, key=order)]


def test_sort_and_filter_equal_a_reference(atlas, index):
    layer = index["layer"].to_numpy()
    mean = index["mean"].to_numpy()
    mask = np.isin(layer, [3, 4]) & (mean >= -0.05) & (mean <= 0.05)
    keys, page = all_pages(atlas, "layer=3,4&filter=mean:-0.05:0.05&sort=kurtosis&desc=1")
    assert keys == reference_order(index, mask, "kurtosis", True) and 0 < len(keys) < index.height
    kurtosis = page["columns"].index("kurtosis")
    assert [r[kurtosis] for r in page["rows"]] == sorted([r[kurtosis] for r in page["rows"]], reverse=True)
    # A relation's AP, open above; ascending; with a site filter.
    ap = index["ap:country_capital_city"].to_numpy()
    mask = (index["site"].to_numpy() == "gate") & (ap >= 0.5)
    keys, _ = all_pages(atlas, "site=gate&filter=ap:country_capital_city:0.5:&sort=ap:country_capital_city")
    assert keys == reference_order(index, mask, "ap:country_capital_city", False)
    # Skewness is NaN for a constant unit: never kept by a range, sorted last.
    skew = index["skewness"].to_numpy()
    keys, _ = all_pages(atlas, "layer=0&filter=skewness::1e9&sort=skewness")
    assert keys == reference_order(index, (layer == 0) & (skew <= 1e9), "skewness", False)


def token_units(path: Path, text: str, exact: bool) -> set[tuple]:
    frame = pl.read_parquet(path, columns=[*KEY, "token"]) if "peak" in path.name else \
        pl.read_parquet(path, columns=[*KEY, "tokens"]).explode("tokens").rename({"tokens": "token"})
    found = set()
    for site, layer, unit, token in frame.rows():
        if (token.strip().lower() == text.strip().lower()) if exact else (text.lower() in token.lower()):
            found.add((site, layer, unit))
    return found


def test_token_search_equals_the_peak_and_decoded_tokens(run, atlas):
    peak, decoded = run / "corpus" / "peak_tokens.parquet", run / "decoded.parquet"
    for text in ("you", " The", "um"):
        keys, _ = all_pages(atlas, f"token={urllib.request.quote(text)}&in=peak")
        expected = token_units(peak, text, exact=True)
        assert set(keys) == expected and len(keys) == len(expected) and expected, text
        assert keys == sorted(keys)  # no sort asked: site, layer, unit
    keys, _ = all_pages(atlas, "token=ing&match=substring&in=peak")
    assert set(keys) == token_units(peak, "ing", exact=False)
    decoded_text = pl.read_parquet(decoded)["tokens"][0][0]
    keys, _ = all_pages(atlas, f"token={urllib.request.quote(decoded_text)}")
    assert set(keys) == token_units(peak, decoded_text, True) | token_units(decoded, decoded_text, True)


def test_lookup_columns_and_errors(atlas, index):
    status, page = get(atlas, "/api/units?site=act&layer=3&unit=7")
    assert status == 200 and page["total"] == 1 and page["rows"][0][:3] == ["act", 3, 7]
    status, columns = get(atlas, "/api/columns")
    assert status == 200 and columns["units"] == index.height and columns["relations"] == RELATIONS
    assert [c["name"] for c in columns["columns"]] == index.columns
    for target, code in (("/api/units?sort=nope", 400), ("/api/units?filter=mean:x:", 400),
                         ("/api/units?filter=site:0:1", 400), ("/api/units?limit=0", 400),
                         ("/api/units?token=a&in=elsewhere", 400), ("/api/unit/act/x/0", 400),
                         ("/api/unit/act/99/0", 404), ("/nowhere", 404)):
        status, body = get(atlas, target)
        assert status == code and body["error"], target


def test_http_server_on_a_free_port(atlas):
    server = make_server(atlas, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = url_of(server)
        assert not url.endswith(":0/")
        page = urllib.request.urlopen(url, timeout=30).read().decode()
        assert "<script>" in page and "<script src" not in page and "<link rel=\"stylesheet\"" not in page
        card = json.loads(urllib.request.urlopen(url + "api/unit/act/3/7", timeout=30).read())
        assert card["site"] == "act" and card["examples"]["top"]
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(url + "api/units?sort=nope", timeout=30)
        assert error.value.code == 400 and "sort" in json.loads(error.value.read())["error"]
    finally:
        server.shutdown()
        server.server_close()


def test_atlas_command_prints_its_url_and_serves(run, tmp_path):
    config = tmp_path / "config.yaml"  # the run by its name, atlas.port 0: a free port
    config.write_text(json.dumps({"run": run.name, "atlas": {"port": 0}}))
    process = subprocess.Popen([sys.executable, "-m", "neuronmap", "atlas", "--config", str(config)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    try:
        line = process.stdout.readline()
        url = line.split(": ", 1)[1].split(" ", 1)[0]
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0/"), line
        assert json.loads(urllib.request.urlopen(url + "api/columns", timeout=30).read())["units"] == 155_520
    finally:
        process.terminate()
        process.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "neuronmap", "atlas", "--run", str(run), "--port", "http"],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert bad.returncode == 2 and "--port" in bad.stderr


# --- other runs: hand-made labels, a relation study alone -----------------------------------------

def linked_run(run: Path, tmp: Path, names) -> Path:
    out = tmp / "results" / "run"
    out.mkdir(parents=True)
    for name in names:
        (out / name).symlink_to(run / name)
    return out


def test_label_sources_from_hand_made_tables(run, tmp_path):
    out = linked_run(run, tmp_path, ["corpus", "decoded.parquet", "expertise", "neuron_stats.parquet"])
    units = pl.read_parquet(run / "corpus" / "units.parquet", columns=KEY)
    rng = np.random.default_rng(3)
    labels = ["de", "en"]
    records = pl.concat([units.with_columns(
        label=pl.lit(label), tokens=pl.lit(500, pl.Int64), contexts=pl.lit(20, pl.Int64),
        mean=pl.Series(rng.normal(size=units.height)), n_positive=pl.Series(rng.integers(0, 500, units.height)))
        .with_columns(firing_rate=pl.col("n_positive") / pl.col("tokens")) for label in labels])
    (out / "labels").mkdir()
    write_table(records, out / "labels" / "label_records.parquet", tables.LABEL_RECORDS)  # one row group
    gate = units.filter(pl.col("site") == "gate")
    chosen = [gate.row(int(i)) for i in rng.choice(gate.height, 40, replace=False)]
    selections = ([("lape", "de", u) for u in chosen[:20]] + [("lape", "en", u) for u in chosen[10:30]]
                  + [("ap", "en", u) for u in chosen[25:40]])
    label_units = pl.DataFrame([{"method": m, "label": label, "site": u[0], "layer": u[1], "unit": u[2],
                                 "score": float(rng.random()), "rank": i + 1}
                                for i, (m, label, u) in enumerate(selections)])
    write_table(label_units, out / "labels" / "label_units.parquet", tables.LABEL_UNITS)
    expertise = pl.concat([gate.with_columns(label=pl.lit(label), ap=pl.Series(rng.random(gate.height)),
                                             separation=pl.lit(0.0), rank=pl.lit(1, pl.Int64)) for label in labels])
    write_table(expertise, out / "labels" / "label_expertise.parquet", tables.LABEL_EXPERTISE)

    assert cli.main(["atlas-index", "--run", str(out)]) == 0
    index = pl.read_parquet(out / "atlas" / "units.parquet")
    assert pq.read_schema(out / "atlas" / "units.parquet").remove_metadata() == tables.atlas_units(RELATIONS, labels)
    for label in labels:
        both = index.join(records.filter(pl.col("label") == label), on=KEY)
        assert both.height == units.height
        np.testing.assert_array_equal(both[f"rate:{label}"].to_numpy(), both["firing_rate"].to_numpy())
    by_unit = {}
    for method, label, u in selections:
        by_unit.setdefault((method, u), set()).add(label)
    for row in index.filter(pl.col("lape").is_not_null() | pl.col("ap_label").is_not_null()).iter_rows(named=True):
        u = (row["site"], row["layer"], row["unit"])
        assert row["lape"] == (sorted(by_unit[("lape", u)]) if ("lape", u) in by_unit else None)
        assert row["ap_label"] == (sorted(by_unit[("ap", u)]) if ("ap", u) in by_unit else None)
    assert len({u for _, _, u in selections}) == index.filter(
        pl.col("lape").is_not_null() | pl.col("ap_label").is_not_null()).height

    atlas = Atlas(out)
    keys, _ = all_pages(atlas, "label=en")
    assert set(keys) == set(chosen[10:40])
    keys, _ = all_pages(atlas, "label=en&method=lape")
    assert set(keys) == set(chosen[10:30])
    keys, _ = all_pages(atlas, "filter=rate:de:0.5:&layer=2")
    assert set(keys) == {r[:3] for r in records.filter((pl.col("label") == "de") & (pl.col("firing_rate") >= 0.5)
                                                        & (pl.col("layer") == 2)).rows()}
    unit = chosen[15]  # LAPE for both labels
    status, card = get(atlas, "/api/unit/{}/{}/{}".format(*unit))
    assert status == 200
    mine = records.filter(pl.col("site") == unit[0], pl.col("layer") == unit[1], pl.col("unit") == unit[2])
    ap = expertise.filter(pl.col("site") == unit[0], pl.col("layer") == unit[1], pl.col("unit") == unit[2])
    expected = [(label, *mine.filter(pl.col("label") == label).select("firing_rate", "mean").row(0),
                 ap.filter(pl.col("label") == label)["ap"][0]) for label in labels]
    assert [(c["label"], c["firing_rate"], c["mean"], c["label_ap"]) for c in card["labels"]] == expected
    assert {(s["method"], s["label"]) for s in card["selections"]} == {("lape", "de"), ("lape", "en")}


def test_relation_study_alone(run, tmp_path):
    out = linked_run(run, tmp_path, ["expertise", "neuron_stats.parquet"])
    # Both decoded variants: the index takes the one through the final norm's gain.
    gained = pl.read_parquet(run / "decoded.parquet")
    assert gained["norm_gain"].all()
    plain = gained.with_columns(norm_gain=pl.lit(False), tokens=pl.col("tokens").list.reverse())
    write_table(pl.concat([plain, gained]), out / "decoded.parquet", tables.DECODED)
    sources = AtlasSources.found_in(out)
    assert sources.units is None and sorted(sources.expertise) == RELATIONS
    frame, metadata = build_index(sources)
    write_index(frame, metadata, out / "atlas" / "units.parquet", sources)
    stats = pl.read_parquet(run / "neuron_stats.parquet")
    index = pl.read_parquet(out / "atlas" / "units.parquet")
    assert metadata["records"] == "prompts" and index.height == stats.height
    both = index.join(stats, on=KEY, suffix="_src")
    for column in ("count", "mean", "var", "min", "max", "frac_positive", "frac_active"):
        np.testing.assert_array_equal(both[column].to_numpy(), both[f"{column}_src"].to_numpy())
    assert index["skewness"].null_count() == index.height and index["peak_token"].null_count() == index.height
    both = index.join(gained, on=KEY)
    assert both.height == gained.height and both["decoded_tokens"].to_list() == both["tokens"].to_list()
    atlas = Atlas(out)
    status, card = get(atlas, "/api/unit/up/4/9")
    assert status == 200 and card["histogram"] is None and card["examples"] is None and card["decoded"]
    assert get(atlas, "/api/columns")[1]["records"] == "prompts"


def test_nothing_to_index_is_a_clear_error(tmp_path):
    (tmp_path / "run").mkdir()
    assert cli.main(["atlas-index", "--run", str(tmp_path / "run")]) == 2
    assert cli.main(["atlas", "--run", str(tmp_path / "run"), "--port", "0"]) == 2


# --- the page in Chromium -------------------------------------------------------------------------

@pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or "")
def test_atlas_page_in_chromium(run, atlas, index):
    server = make_server(atlas, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = url_of(server)
    requests, errors = [], []
    try:
        with browser() as context:
            page = context.new_page()
            page.on("request", lambda request: requests.append(request.url))
            page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "assert", "warning") else None)
            page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
            page.goto(url)
            page.wait_for_selector("body[data-ready]", state="attached", timeout=30_000)

            def search(text):
                page.fill("#search", text)
                page.press("#search", "Enter")

            def rows():
                return page.eval_on_selector_all("#units tbody tr", "rows => rows.map(r => r.dataset.unit)")

            # A unit by name: the table holds it alone and its card opens.
            search("act 3 7")
            page.wait_for_selector('#card[data-loaded][data-unit="act/3/7"]', timeout=30_000)
            assert rows() == ["act/3/7"]

            # Units by a token: exactly those whose peak or decoded tokens are it.
            expected = token_units(run / "corpus" / "peak_tokens.parquet", "you", True) | token_units(
                run / "decoded.parquet", "you", True)
            search("you")
            page.wait_for_selector('#units[data-query*="token=you"]', timeout=30_000)
            assert int(page.get_attribute("#units", "data-total")) == len(expected)
            assert rows() == ["/".join(map(str, k)) for k in sorted(expected)[:50]]

            # Sorted by a statistic: a click on its header, the highest first.
            page.click('#units th[data-column="kurtosis"]')
            page.wait_for_selector('#units[data-query*="sort=kurtosis"][data-query*="desc=1"]', timeout=30_000)
            mask = np.array([k in expected for k in index.select(KEY).rows()])
            assert rows() == ["/".join(map(str, k)) for k in reference_order(index, mask, "kurtosis", True)[:50]]

            # A card from the table: its contexts, the peak token highlighted.
            first = rows()[0]
            page.click(f'#units tbody tr[data-unit="{first}"]')
            page.wait_for_selector(f'#card[data-loaded][data-unit="{first}"]', timeout=30_000)
            examples = unit_rows(run / "corpus" / "examples.parquet",
                                 (first.split("/")[0], int(first.split("/")[1]), int(first.split("/")[2])))
            top = examples.filter(pl.col("kind") == "top").sort("rank")
            texts_of = "nodes => nodes.map(x => x.textContent)"
            marks = page.eval_on_selector_all("#card ol.contexts:first-of-type mark.peak", texts_of)
            assert marks == top["token"].to_list()
            texts = page.eval_on_selector_all("#card ol.contexts:first-of-type .ctx", texts_of)
            assert texts == [b + t + a for b, t, a in top.select("before", "token", "after").rows()]
            assert page.locator("#card svg.hist rect").count() > 3
            headings = page.eval_on_selector_all("#card h3", texts_of)
            assert {"Statistics", "Quantiles", "Top contexts", "Bottom contexts", "Peak tokens", "AP per relation",
                    "Labels"} <= set(headings)
            ARTIFACTS.mkdir(exist_ok=True)
            page.set_viewport_size({"width": 1400, "height": 1600})  # the whole card in the picture
            page.screenshot(path=str(ARTIFACTS / "atlas.png"), full_page=True)
    finally:
        server.shutdown()
        server.server_close()
    assert errors == []
    assert [r for r in requests if not r.startswith(url)] == [], "the page must request nothing but the server"


@pytest.mark.e2e  # a benchmark script as a process: make test only
def test_bench_smoke_prints_its_json_line():
    """bench/atlas.py on 2 small layers, so that the benchmark cannot rot."""
    result = subprocess.run([sys.executable, "bench/atlas.py", "--smoke"], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["bench"] == "atlas" and line["smoke"] and line["units"] == 2 * (3 * 64 + 16)
    for key in ("card_random", "card_same_layer", "table"):
        assert line[key]["n"] == 5 and line[key]["median_ms"] > 0
