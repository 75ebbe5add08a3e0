"""The atlas server on a run of the default model's shape: time to start, time per request.

    .venv/bin/python bench/atlas.py [--requests 50] [--keep DIR] [--smoke]

Builds a synthetic run with every file the atlas reads, shaped like SmolLM2-135M's records: 30
layers x (gate, up, act: 1536; down: 576) = 155,520 units, each with a histogram of about 120
bins, 10 top and 10 bottom contexts with windows (3.1M example rows), 5 peak tokens, decoded
tokens (up, gate, act; both norm_gain variants), AP for 7 relations and records for 4 labels with
LAPE and AP selections. Values are random (the cost of serving depends on the sizes, not on the
values). Then builds the index (`atlas-index`), starts `neuronmap atlas --port 0` in a fresh
process and times: the start (process start to the first answered request, and the index load
alone, in process), card requests for random units (most read a layer not yet cached), card
requests within one layer (cached), and table requests (sorts, range filters, token and label
searches, deep pages), each the median over --requests. Prints a table, then one JSON line.
`--smoke` does the same on 2 small layers (the test that keeps this script working).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from neuronmap.atlas.index import AtlasSources, build_index, write_index  # noqa: E402
from neuronmap.atlas.query import Index  # noqa: E402
from neuronmap.io import tables  # noqa: E402
from neuronmap.io.histogram import HALF, QUANTILES  # noqa: E402
from neuronmap.io.parquet import write_row_groups, write_table  # noqa: E402

RELATIONS = ["adj_comparative", "country_capital_city", "landmark_in_country", "object_superclass",
             "star_constellation", "verb_past_tense", "word_first_letter"]
LABELS = ["de", "en", "es", "it"]
STATISTICS = ["mean", "var", "skewness", "kurtosis", "max", "frac_positive", "p99", "ap:country_capital_city",
              "rate:en"]


def unit_keys(widths: dict[str, int], layer: int) -> pa.Table:
    sites = [s for s, w in widths.items() for _ in range(w)]
    units = [u for w in widths.values() for u in range(w)]
    return pa.table({"site": pa.array(sites), "layer": pa.array([layer] * len(sites), pa.int32()),
                     "unit": pa.array(units, pa.int32())})


def lists(n: int, per: int, values: pa.Array) -> pa.ListArray:
    offsets = pa.array(np.arange(0, (n + 1) * per, per, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values)


class Synthetic:
    def __init__(self, run: Path, layers: int, width: int, down: int, examples: int, seed: int = 0):
        self.run, self.layers, self.examples = run, layers, examples
        self.widths = {"act": width, "down": down, "gate": width, "up": width}
        self.rng = np.random.default_rng(seed)
        words = ["".join(self.rng.choice(list("abcdefghijklmnopqrstuvwxyzäöüñ"), self.rng.integers(1, 9)))
                 for _ in range(5000)]
        self.tokens = pa.array([(" " if i % 2 else "") + w for i, w in enumerate(words)])
        self.texts = pa.array([" ".join(self.rng.choice(words, 8)) for _ in range(2000)])

    def token_ids(self, n: int) -> np.ndarray:  # roughly Zipf: a few tokens peak often
        return np.minimum(self.rng.zipf(1.3, n) - 1, len(self.tokens) - 1)

    def units_layer(self, layer: int) -> pa.Table:
        keys = unit_keys(self.widths, layer)
        n, bins = keys.num_rows, 120
        columns = {"count": pa.array(np.full(n, 74_281, np.int64))}
        for name in ("mean", "var", "skewness", "kurtosis", "frac_positive", "frac_active", *QUANTILES):
            columns[name] = pa.array(self.rng.normal(size=n))
        columns["min"] = pa.array(-self.rng.random(n, dtype=np.float32) * 4)
        columns["max"] = pa.array(self.rng.random(n, dtype=np.float32) * 8)
        start = HALF - self.rng.integers(40, 80, n)
        hist = (start[:, None] + np.arange(bins)).astype(np.int16).ravel()
        columns["hist_bins"] = lists(n, bins, pa.array(hist))
        columns["hist_counts"] = lists(n, bins, pa.array(self.rng.integers(1, 5000, n * bins)))
        return pa.table({**{c: keys[c] for c in keys.column_names}, **columns})

    def examples_layer(self, layer: int) -> pa.Table:
        keys = unit_keys(self.widths, layer)
        per = 2 * self.examples
        index = np.repeat(np.arange(keys.num_rows), per)
        n = len(index)
        token = self.token_ids(n)
        return pa.table({
            "site": keys["site"].take(index), "layer": keys["layer"].take(index), "unit": keys["unit"].take(index),
            "kind": pa.array(np.tile(["top"] * self.examples + ["bottom"] * self.examples, keys.num_rows)),
            "rank": pa.array(np.tile(np.r_[1:self.examples + 1, 1:self.examples + 1], keys.num_rows).astype(np.int32)),
            "value": pa.array(self.rng.normal(size=n).astype(np.float32)),
            "context_id": pa.array(self.rng.integers(0, 2000, n)),
            "document": pa.array([f"en.jsonl:{i}" for i in self.rng.integers(0, 400, n)]),
            "label": pa.array(np.array(LABELS)[self.rng.integers(0, 4, n)]),
            "position": pa.array(self.rng.integers(0, 64, n).astype(np.int32)),
            "token_id": pa.array(token.astype(np.int32)), "token": self.tokens.take(pa.array(token)),
            "before": self.texts.take(pa.array(self.rng.integers(0, len(self.texts), n))),
            "after": self.texts.take(pa.array(self.rng.integers(0, len(self.texts), n)))})

    def peak_layer(self, layer: int) -> pa.Table:
        keys = unit_keys(self.widths, layer)
        index = np.repeat(np.arange(keys.num_rows), 5)
        token = self.token_ids(len(index))
        return pa.table({
            "site": keys["site"].take(index), "layer": keys["layer"].take(index), "unit": keys["unit"].take(index),
            "rank": pa.array(np.tile(np.arange(1, 6, dtype=np.int32), keys.num_rows)),
            "token_id": pa.array(token.astype(np.int32)), "token": self.tokens.take(pa.array(token)),
            "contexts": pa.array(self.rng.integers(1, 10, len(index))),
            "mean_value": pa.array(self.rng.random(len(index)))})

    def all_keys(self) -> pa.Table:
        return pa.concat_tables([unit_keys(self.widths, layer) for layer in range(self.layers)])

    def write(self) -> None:
        run, rng = self.run, self.rng
        layers = range(self.layers)
        write_row_groups((self.units_layer(l) for l in layers), run / "corpus" / "units.parquet", tables.UNIT_RECORDS)
        write_row_groups((self.examples_layer(l) for l in layers), run / "corpus" / "examples.parquet",
                         tables.UNIT_EXAMPLES)
        write_row_groups((self.peak_layer(l) for l in layers), run / "corpus" / "peak_tokens.parquet",
                         tables.PEAK_TOKENS)
        keys = self.all_keys()
        n = keys.num_rows
        stats = {"count": np.full(n, 5000), "mean": rng.normal(size=n), "var": rng.random(n),
                 "min": -rng.random(n, dtype=np.float32), "max": rng.random(n, dtype=np.float32),
                 "frac_positive": rng.random(n), "frac_active": rng.random(n)}
        write_table(pa.table({**{c: keys[c] for c in keys.column_names}, **stats}), run / "neuron_stats.parquet",
                    tables.NEURON_STATS)
        for relation in RELATIONS:
            ap = rng.random(n)
            write_table(keys.append_column("ap", pa.array(ap)).append_column("separation", pa.array(rng.normal(size=n)))
                        .append_column("on_p50", pa.array(rng.random(n, dtype=np.float32)))
                        .append_column("on_p90", pa.array(rng.random(n, dtype=np.float32)))
                        .append_column("off_mean", pa.array(rng.random(n, dtype=np.float32)))
                        .append_column("rank", pa.array(np.argsort(np.argsort(-ap)) + 1)),
                        run / "expertise" / f"{relation}.parquet", tables.EXPERTISE)
        decoded = keys.filter(pc.not_equal(keys["site"], "down"))
        parts = []
        for gain in (False, True):
            m = decoded.num_rows
            token = self.token_ids(m * 10)
            parts.append(decoded.append_column("norm_gain", pa.array([gain] * m))
                         .append_column("token_ids", lists(m, 10, pa.array(token.astype(np.int32))))
                         .append_column("tokens", lists(m, 10, self.tokens.take(pa.array(token))))
                         .append_column("scores", lists(m, 10, pa.array(rng.random(m * 10, dtype=np.float32)))))
        write_table(pa.concat_tables(parts), run / "decoded.parquet", tables.DECODED)
        self.write_labels(keys)

    def write_labels(self, keys: pa.Table) -> None:
        run, rng, n = self.run, self.rng, keys.num_rows
        parts = []
        for label in LABELS:
            positive = rng.integers(0, 20_000, n)
            parts.append(keys.append_column("label", pa.array([label] * n))
                         .append_column("tokens", pa.array(np.full(n, 20_000)))
                         .append_column("contexts", pa.array(np.full(n, 500)))
                         .append_column("mean", pa.array(rng.normal(size=n)))
                         .append_column("firing_rate", pa.array(positive / 20_000))
                         .append_column("n_positive", pa.array(positive)))
        write_table(pa.concat_tables(parts), run / "labels" / "label_records.parquet", tables.LABEL_RECORDS)
        gate = keys.filter(pc.equal(keys["site"], "gate"))
        parts, selected = [], []
        for label in LABELS:
            m = gate.num_rows
            parts.append(gate.append_column("label", pa.array([label] * m)).append_column("ap", pa.array(rng.random(m)))
                         .append_column("separation", pa.array(rng.normal(size=m)))
                         .append_column("rank", pa.array(np.arange(1, m + 1))))
            for method in ("lape", "ap"):
                rows = rng.choice(m, max(1, m // 100), replace=False)
                chosen = gate.take(pa.array(rows))
                selected.append(pa.table({"method": [method] * len(rows), "label": [label] * len(rows),
                                          "site": chosen["site"], "layer": chosen["layer"], "unit": chosen["unit"],
                                          "score": rng.random(len(rows)),
                                          "rank": np.arange(1, len(rows) + 1, dtype=np.int32)}))
        write_table(pa.concat_tables(parts), run / "labels" / "label_expertise.parquet", tables.LABEL_EXPERTISE)
        write_table(pa.concat_tables(selected), run / "labels" / "label_units.parquet", tables.LABEL_UNITS)


def timed_get(url: str) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        response.read()
        assert response.status == 200, url
    return time.perf_counter() - start


def start_server(run: Path) -> tuple[subprocess.Popen, str, float]:
    """`neuronmap atlas` in a fresh process: seconds from its start to its first answer."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "neuronmap", "atlas", "--run", str(run), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    line = process.stdout.readline()
    url = line.split(": ", 1)[1].split(" ", 1)[0]
    timed_get(url + "api/columns")
    return process, url, time.perf_counter() - start


def summary(seconds: list[float]) -> dict:
    ms = sorted(1000 * s for s in seconds)
    return {"median_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * (len(ms) - 1))], "max_ms": ms[-1], "n": len(ms)}


def table_queries(rng, index: Index, n: int) -> list[str]:
    tokens = index.frame["peak_token"].drop_nulls().sample(n, seed=1, with_replacement=True).to_list()
    queries = []
    for i in range(n):
        column = STATISTICS[i % len(STATISTICS)]
        kind = i % 6
        if kind == 0:
            q = {"sort": column, "desc": "1"}
        elif kind == 1:
            q = {"filter": f"{column}:0:0.5", "sort": STATISTICS[(i + 1) % len(STATISTICS)]}
        elif kind == 2:
            q = {"token": tokens[i], "sort": column, "desc": "1"}
        elif kind == 3:
            q = {"label": LABELS[i % len(LABELS)], "sort": "rate:" + LABELS[i % len(LABELS)], "desc": "1"}
        elif kind == 4:
            q = {"site": "gate", "layer": str(i % index.frame["layer"].max()), "unit": str(i)}
        else:
            q = {"sort": column, "offset": str(int(rng.integers(0, index.frame.height - 50)))}
        queries.append(urllib.parse.urlencode({**q, "limit": "50"}))
    return queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--keep", help="build the synthetic run here and keep it (default: a temporary folder)")
    parser.add_argument("--smoke", action="store_true",
                        help="2 layers of 64 units: checks the script, times nothing real")
    args = parser.parse_args()
    shape = dict(layers=2, width=64, down=16, examples=3) if args.smoke else dict(layers=30, width=1536, down=576,
                                                                                 examples=10)
    requests = 5 if args.smoke else args.requests
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.keep) if args.keep else Path(tmp) / "run"
        start = time.perf_counter()
        Synthetic(run, **shape).write()
        build_files = time.perf_counter() - start
        start = time.perf_counter()
        sources = AtlasSources.found_in(run)
        index, metadata = build_index(sources)
        write_index(index, metadata, run / "atlas" / "units.parquet", sources)
        build_index_s = time.perf_counter() - start
        loads = [Index.load(run / "atlas" / "units.parquet").seconds_to_load for _ in range(3)]
        loaded = Index.load(run / "atlas" / "units.parquet")
        process, url, start_s = start_server(run)
        try:
            rng = np.random.default_rng(7)
            keys = loaded.frame.select("site", "layer", "unit").sample(requests, seed=3).rows()
            cards = [timed_get(url + "api/unit/{}/{}/{}".format(*k)) for k in keys]
            layer = keys[0][1]
            same = loaded.frame.filter(loaded.frame["layer"] == layer).sample(requests, seed=4).rows()
            warm = [timed_get(url + "api/unit/{}/{}/{}".format(*k)) for k in same]
            lists_ = [timed_get(url + "api/units?" + q) for q in table_queries(rng, loaded, requests)]
            page = timed_get(url)
        finally:
            process.terminate()
            process.wait(timeout=30)
        sizes = {p.relative_to(run).as_posix(): p.stat().st_size for p in sorted(run.rglob("*.parquet"))}
    result = {"bench": "atlas", "smoke": args.smoke, "units": loaded.frame.height, "layers": shape["layers"],
              "example_rows": 2 * shape["examples"] * loaded.frame.height,
              "index_mb": sizes["atlas/units.parquet"] / 1e6, "files_mb": sum(sizes.values()) / 1e6,
              "build_files_s": build_files, "build_index_s": build_index_s,
              "index_load_s": statistics.median(loads), "start_s": start_s, "page_ms": 1000 * page,
              "card_random": summary(cards), "card_same_layer": summary(warm), "table": summary(lists_),
              "cpus": os.cpu_count()}
    print(f"{result['units']} units, {result['example_rows']} example rows; files {result['files_mb']:.0f} MB, "
          f"index {result['index_mb']:.1f} MB (built in {build_index_s:.1f} s)")
    print(f"start: {start_s:.2f} s from process start to the first answer; index load {result['index_load_s']:.2f} s")
    for name in ("card_random", "card_same_layer", "table"):
        s = result[name]
        print(f"{name:16s} median {s['median_ms']:7.1f} ms   p90 {s['p90_ms']:7.1f} ms   max {s['max_ms']:7.1f} ms"
              f"   ({s['n']} requests)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
