"""The corpus pass against brute force: records of real text on the embedded model equal what
numpy and scipy compute from every activation held in memory; shards and resumed jobs give the
same records as one uninterrupted job."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.stats
import torch

from neuronmap.corpus import native as records_kernel
from neuronmap.corpus.contexts import cut_contexts
from neuronmap.corpus.engine import RecordsOutputs, RecordsPass
from neuronmap.corpus.merge import merge_records
from neuronmap.corpus.reading import Document, corpus_files, read_documents
from neuronmap.corpus.reductions import SiteRecords
from neuronmap.corpus.settings import MergeSettings, RecordsSettings
from neuronmap.errors import NeuronmapError
from neuronmap.io import tables
from neuronmap.io.histogram import (ABSOLUTE_FLOOR, BINS, HALF, MIN_EXPONENT, OCTAVES, QUANTILES, RELATIVE_ERROR,
                                    SUB_BITS, bins_of, from_lists, from_runs, to_runs)
from neuronmap.model.architectures import MlpSites
from neuronmap.model.native import compile_kernel

from conftest import REPO

CORPUS = REPO / "data" / "corpus" / "fortunes"
CONTEXT_TOKENS = 16
CHECKED_LAYERS = (0, 13, 29)


@pytest.fixture(scope="module")
def contexts(smollm2):
    _, tokenizer = smollm2
    documents = read_documents(CORPUS)
    picked = [d for label in ("de", "en", "es", "it") for d in documents if d.label == label][::97]
    return cut_contexts(tokenizer, picked, CONTEXT_TOKENS, 5, 0.0)


def run_shards(model, tokenizer, contexts, tmp_path, shards, tag, **changes):
    """Records of `contexts` as `shards` jobs would make them, merged."""
    settings = RecordsSettings.defaults(batch_size=3, **changes)
    contexts = contexts.with_columns(shard=pl.col("context_id") % shards if shards != 5 else pl.col("shard"))
    units, extremes = [], []
    for shard in range(shards):
        part = contexts.filter(pl.col("shard") == shard)
        outputs = RecordsOutputs(tmp_path / f"{tag}-{shard}.units.parquet", tmp_path / f"{tag}-{shard}.ext.parquet",
                                 tmp_path / f"{tag}-{shard}.ckpt")
        RecordsPass(model, part, settings, CONTEXT_TOKENS, tokenizer.pad_token_id).run(outputs)
        units.append(outputs.units)
        extremes.append(outputs.extremes)
    merged = {name: tmp_path / f"{tag}.{name}.parquet" for name in ("units", "examples", "peak_tokens")}
    merge_records(units, extremes, contexts, tokenizer, MergeSettings.defaults(examples=4, window=3, peak_tokens=3,
                                                                               peak_token_contexts=6), merged)
    return {name: pl.read_parquet(path) for name, path in merged.items()}


@pytest.fixture(scope="module")
def merged(smollm2, contexts, tmp_path_factory):
    model, tokenizer = smollm2
    return run_shards(model, tokenizer, contexts, tmp_path_factory.mktemp("records"), 1, "one",
                      examples=4, peak_token_contexts=6)


@pytest.fixture(scope="module")
def activations(smollm2, contexts):
    """Every activation of the checked layers: {(site, layer): [contexts, T, n]} and the valid mask,
    from plain hooks on the same padded batches."""
    model, tokenizer = smollm2
    sites = MlpSites(model)
    seen, handles = {}, []
    for site in ("gate", "up", "act", "down"):
        for layer in CHECKED_LAYERS:
            point = sites.point(site, layer)
            def keep(module, args, output=None, key=(site, layer), is_input=point.is_input):
                seen.setdefault(key, []).append((args[0] if is_input else output).float().clone())
            handles.append(point.register(keep))
    rows = contexts.sort("context_id")["token_ids"].to_list()
    lengths = np.array([len(r) for r in rows])
    try:
        for start in range(0, len(rows), 3):
            batch = rows[start:start + 3]
            ids = torch.full((len(batch), CONTEXT_TOKENS), tokenizer.pad_token_id)
            for i, row in enumerate(batch):
                ids[i, :len(row)] = torch.tensor(row)
            mask = (torch.arange(CONTEXT_TOKENS)[None] < torch.tensor([len(r) for r in batch])[:, None]).long()
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    valid = np.arange(CONTEXT_TOKENS)[None] < lengths[:, None]
    return {key: torch.cat(parts).numpy() for key, parts in seen.items()}, valid


def reference_bins(values: np.ndarray) -> np.ndarray:
    """The histogram layout of histogram.py computed from frexp, independently of the bit trick."""
    magnitude = np.abs(values.astype(np.float64))
    mantissa, exponent = np.frexp(magnitude)  # magnitude = mantissa * 2**exponent, mantissa in [0.5, 1)
    octave = exponent - 1 - MIN_EXPONENT
    sub = np.floor((mantissa * 2 - 1) * (1 << SUB_BITS)).astype(np.int64)
    code = np.minimum(octave * (1 << SUB_BITS) + sub, HALF - 1)
    out = np.where(values < 0, HALF - 1 - code, HALF + 1 + code)
    return np.where(magnitude < 2.0 ** MIN_EXPONENT, HALF, out)


def test_bins_follow_the_documented_layout():
    values = np.array([0, 1e-9, -1e-9, 2 ** -8, -2 ** -8, 0.5, -0.5, 1.0, 1.124, 1.125, 3.3, -3.3, 4095.0,
                       4096.0, 1e30, -1e30], np.float32)
    values = np.concatenate([values, np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 5])
    assert np.array_equal(bins_of(torch.from_numpy(values)).numpy(), reference_bins(values))
    assert BINS == 2 * OCTAVES * (1 << SUB_BITS) + 1


def test_unit_records_equal_brute_force(merged, activations):
    acts, valid = activations
    units = merged["units"]
    for (site, layer), x in acts.items():
        values = x[valid]  # [tokens, n]
        got = units.filter((pl.col("site") == site) & (pl.col("layer") == layer)).sort("unit")
        n = values.shape[0]
        assert (got["count"] == n).all()
        v64 = values.astype(np.float64)
        np.testing.assert_allclose(got["mean"], v64.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got["var"], v64.var(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got["skewness"], scipy.stats.skew(v64, axis=0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(got["kurtosis"], scipy.stats.kurtosis(v64, axis=0), rtol=1e-6, atol=1e-9)
        assert np.array_equal(got["min"].to_numpy(), values.min(0))
        assert np.array_equal(got["max"].to_numpy(), values.max(0))
        assert np.array_equal(got["frac_positive"].to_numpy(), (values > 0).sum(0) / n)
        assert np.array_equal(got["frac_active"].to_numpy(), (np.abs(values) > 0.05).sum(0) / n)
        # Histograms: exact integer counts in the independently computed bins.
        expected = np.zeros((values.shape[1], BINS), np.int64)
        np.add.at(expected, (np.broadcast_to(np.arange(values.shape[1]), values.shape), reference_bins(values)), 1)
        assert np.array_equal(from_lists(got["hist_bins"], got["hist_counts"]), expected)
        # Quantiles within the documented bound of the lower order statistic.
        for name, q in QUANTILES.items():
            truth = np.quantile(v64, q, axis=0, method="inverted_cdf")
            bound = np.maximum(RELATIVE_ERROR * np.abs(truth), ABSOLUTE_FLOOR) + 1e-12
            assert (np.abs(got[name].to_numpy() - truth) <= bound).all(), (site, layer, name)


def test_examples_and_peak_tokens_equal_brute_force(merged, activations, contexts):
    acts, valid = activations
    order = contexts.sort("context_id")
    token_ids = order["token_ids"].to_list()
    examples, peaks = merged["examples"], merged["peak_tokens"]
    for (site, layer), x in acts.items():
        masked_high = np.where(valid[..., None], x, -np.inf)
        masked_low = np.where(valid[..., None], x, np.inf)
        for unit in (0, 7, x.shape[2] - 1):
            got = examples.filter((pl.col("site") == site) & (pl.col("layer") == layer) & (pl.col("unit") == unit))
            for kind, peaks_of, sign in (("top", masked_high[:, :, unit], -1), ("bottom", masked_low[:, :, unit], 1)):
                best = peaks_of.max(1) if kind == "top" else peaks_of.min(1)
                position = peaks_of.argmax(1) if kind == "top" else peaks_of.argmin(1)
                ranked = sorted(range(len(best)), key=lambda c: (sign * best[c], c))[:4]
                rows = got.filter(pl.col("kind") == kind).sort("rank")
                assert rows["context_id"].to_list() == ranked
                assert rows["position"].to_list() == [int(position[c]) for c in ranked]
                np.testing.assert_array_equal(rows["value"].to_numpy(), best[ranked].astype(np.float32))
                assert rows["token_id"].to_list() == [token_ids[c][position[c]] for c in ranked]
            top6 = sorted(range(len(x)), key=lambda c: (-masked_high[c, :, unit].max(), c))[:6]
            counted = {}
            for c in top6:
                token = token_ids[c][int(masked_high[c, :, unit].argmax())]
                counted[token] = counted.get(token, 0) + 1
            got_peaks = peaks.filter((pl.col("site") == site) & (pl.col("layer") == layer) & (pl.col("unit") == unit))
            assert dict(zip(got_peaks["token_id"], got_peaks["contexts"])) == \
                {t: c for t, c in counted.items() if t in set(got_peaks["token_id"])}
            assert got_peaks["contexts"].to_list() == sorted(counted.values(), reverse=True)[:3]


def test_schemas(merged):
    for name, schema in (("units", tables.UNIT_RECORDS), ("examples", tables.UNIT_EXAMPLES),
                         ("peak_tokens", tables.PEAK_TOKENS)):
        assert merged[name].to_arrow().schema.equals(schema, check_metadata=False) or \
            merged[name].to_arrow().cast(schema).schema.names == schema.names


@pytest.mark.parametrize("lanes, scatter", [(None, None), (4, None), (16, True), (16, False)],
                         ids=["this CPU", "4 lanes", "16 lanes, gather and scatter", "16 lanes, increments"])
def test_torch_path_equals_the_native_kernel(lanes, scatter, monkeypatch):
    """The kernel as built for this CPU and, besides, for 4 and 16 lanes (SSE/NEON, AVX-512), with
    both ways of counting the histograms where the build has both (AVX-512)."""
    if lanes is not None:
        kernel = compile_kernel(records_kernel.SOURCE, records_kernel._declare, (f"-DLANES={lanes}",))
        monkeypatch.setattr(records_kernel, "load", lambda: kernel)
    if scatter is not None:
        monkeypatch.setattr(records_kernel, "scatter_histogram", lambda library: scatter and bool(library.records_can_scatter()))
    else:
        assert records_kernel.scatter_histogram(records_kernel.load()) in (True, False)
    rng = np.random.default_rng(1)
    x = torch.from_numpy((rng.standard_normal((5, 7, 40)) * rng.choice([0.001, 1, 300], (5, 7, 40))).astype(np.float32))
    lengths = torch.tensor([7, 3, 0, 5, 1])
    records = [SiteRecords(40, 3, 2, 0.05, torch.device("cpu"), compiled=compiled) for compiled in (True, False)]
    assert records[0].kernel is not None, "the C kernel did not build"
    for r in records:
        for step in range(3):
            r.add(x * (step + 1), lengths, torch.arange(5) + 10 * step)
    native, plain = (r.state() for r in records)
    for name in ("n_positive", "n_active", "minimum", "maximum", "count", "rows"):
        assert torch.equal(torch.as_tensor(native[name]), torch.as_tensor(plain[name])), name
    assert torch.equal(native["hist"].long(), plain["hist"].long())
    for name in ("mean", "m2", "m3", "m4"):
        torch.testing.assert_close(native[name], plain[name], rtol=1e-9, atol=1e-9)
    for kind, (keys, positions) in records[0].extremes().items():
        other_keys, other_positions = records[1].extremes()[kind]
        assert torch.equal(keys, other_keys) and torch.equal(positions, other_positions), kind
        assert keys.shape[0] == (3 if kind == "top" else 2)


def test_shards_give_identical_records(smollm2, contexts, tmp_path):
    model, tokenizer = smollm2
    # Five jobs of unequal sizes (the contexts' own shards) against one: every merge path.
    records = {shards: run_shards(model, tokenizer, contexts, tmp_path, shards, f"s{shards}", examples=4,
                                  peak_token_contexts=6, sites=("gate", "act"))
               for shards in (1, 5)}
    assert_same_records(records[1], records[5])
    assert_compact(tmp_path / "s1-0.units.parquet", ("site",))
    assert_compact(tmp_path / "s1-0.ext.parquet", ("site", "kind"))


def assert_compact(path, strings):
    """A job's partial file as the merge reads it fastest: every part of a row group handed the
    writer the same dictionary (were it to change from one site or kind to the next, the writer
    would fall back to a plain string per row), and its integers delta-encoded."""
    metadata = pq.ParquetFile(path).metadata
    for group in range(metadata.num_row_groups):
        chunks = metadata.row_group(group)
        columns = {chunks.column(i).path_in_schema: chunks.column(i) for i in range(chunks.num_columns)}
        for name in strings:  # run-length indices only: a few bytes, not one string per row
            assert columns[name].total_uncompressed_size < 200 < chunks.num_rows, (path.name, name)
        for name in ("layer", "unit"):
            assert "DELTA_BINARY_PACKED" in columns[name].encodings, (path.name, name)


def assert_same_records(a, b):
    for name in ("examples", "peak_tokens"):
        assert a[name].equals(b[name]), name
    floats = ["mean", "var", "skewness", "kurtosis"]
    exact = [c for c in a["units"].columns if c not in floats]
    assert a["units"].select(exact).equals(b["units"].select(exact))
    for column in floats:
        np.testing.assert_allclose(a["units"][column], b["units"][column], rtol=1e-9, atol=1e-12)


def test_an_interrupted_job_resumes_to_the_same_records(smollm2, contexts, tmp_path, monkeypatch):
    model, tokenizer = smollm2
    shard = contexts.filter(pl.col("shard") == 0)
    settings = RecordsSettings.defaults(batch_size=2, checkpoint_minutes=0, sites=("act",))
    whole = RecordsOutputs(tmp_path / "w.units.parquet", tmp_path / "w.ext.parquet", tmp_path / "w.ckpt")
    RecordsPass(model, shard, settings, CONTEXT_TOKENS, tokenizer.pad_token_id).run(whole)
    resumed = RecordsOutputs(tmp_path / "r.units.parquet", tmp_path / "r.ext.parquet", tmp_path / "r.ckpt")
    forward, calls = RecordsPass._forward, []

    def dies_at_the_third(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill would stop it: mid-run, outputs not written
        return forward(self, *args)
    monkeypatch.setattr(RecordsPass, "_forward", dies_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        RecordsPass(model, shard, settings, CONTEXT_TOKENS, tokenizer.pad_token_id).run(resumed)
    monkeypatch.setattr(RecordsPass, "_forward", forward)
    assert resumed.checkpoint.exists() and not resumed.units.exists()
    assert torch.load(resumed.checkpoint, weights_only=True)["batches_done"] == 2
    RecordsPass(model, shard, settings, CONTEXT_TOKENS, tokenizer.pad_token_id).run(resumed)
    assert not resumed.checkpoint.exists()
    for a, b in ((whole.units, resumed.units), (whole.extremes, resumed.extremes)):
        assert pl.read_parquet(a).equals(pl.read_parquet(b))


def test_a_checkpoint_of_other_settings_is_not_resumed(smollm2, contexts, tmp_path):
    model, tokenizer = smollm2
    shard = contexts.filter(pl.col("shard") == 1)
    outputs = RecordsOutputs(tmp_path / "u.parquet", tmp_path / "e.parquet", tmp_path / "c.ckpt")
    first = RecordsPass(model, shard, RecordsSettings.defaults(batch_size=2), CONTEXT_TOKENS, tokenizer.pad_token_id)
    first._save(outputs.checkpoint, 1)
    other = RecordsPass(model, shard, RecordsSettings.defaults(batch_size=3), CONTEXT_TOKENS, tokenizer.pad_token_id)
    assert other._resume(outputs.checkpoint) == 0
    assert first._resume(outputs.checkpoint) == 1


@pytest.mark.e2e  # runs the job's command three times, as the workflow does: make test only
def test_killed_records_job_resumes_to_the_same_records(smollm2_dir, contexts, tmp_path):
    """A real SIGKILL of `neuronmap corpus-records`, then the same command again."""
    contexts_path = tmp_path / "contexts.parquet"
    contexts.write_parquet(contexts_path)
    settings = RecordsSettings.defaults(batch_size=1, checkpoint_minutes=0, sites=("act",)).to_json()

    def command(tag):
        return [sys.executable, "-m", "neuronmap", "corpus-records", "--settings", settings, "--model-dir",
                str(smollm2_dir), "--contexts", str(contexts_path), "--shard", "0", "--threads", "1",
                "--out-units", str(tmp_path / f"{tag}.units.parquet"),
                "--out-extremes", str(tmp_path / f"{tag}.ext.parquet"),
                "--out-cost", str(tmp_path / f"{tag}.cost.parquet"), "--checkpoint", str(tmp_path / f"{tag}.ckpt")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(command("whole"), check=True, env=env, capture_output=True)
    job = subprocess.Popen(command("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (tmp_path / "killed.ckpt").exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert (tmp_path / "killed.ckpt").exists(), "the job ended before its first checkpoint"
    assert not (tmp_path / "killed.units.parquet").exists()
    resumed = subprocess.run(command("killed"), check=True, env=env, capture_output=True, text=True)
    assert "resumed from" in resumed.stderr
    for suffix in ("units", "ext"):
        assert pl.read_parquet(tmp_path / f"whole.{suffix}.parquet").equals(
            pl.read_parquet(tmp_path / f"killed.{suffix}.parquet"))


def test_reading_formats_and_labels(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "fr.txt").write_text("Premier document.\n\nSecond\ndocument.\n \n\nTroisième.", encoding="utf-8")
    (folder / "de.jsonl").write_text(json.dumps({"text": "Ein Satz."}) + "\n\n" + json.dumps({"text": "Noch."}))
    pl.DataFrame({"text": ["one", "two"], "topic": ["a", "b"]}).write_parquet(tmp_path / "topics.parquet")
    documents = read_documents(folder)
    assert [(d.label, d.text) for d in documents] == [
        ("de", "Ein Satz."), ("de", "Noch."), ("fr", "Premier document."), ("fr", "Second\ndocument."),
        ("fr", "Troisième.")]
    labelled = read_documents(tmp_path / "topics.parquet", label_column="topic")
    assert [(d.label, d.text) for d in labelled] == [("a", "one"), ("b", "two")]


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "fine"}\n{"text": oops}\n', "bad.jsonl:2: not valid JSON"),
    ("bad.jsonl", '{"body": "no text field"}\n', "bad.jsonl:1: no string field 'text'"),
    ("bad.txt", b"\xff\xfe latin", "bad.txt: not UTF-8"),
    ("bad.csv", "text\nx\n", "bad.csv: corpus file must be"),
    ("bad.parquet", b"PAR1 truncated", "bad.parquet: not a readable Parquet file"),
])
def test_bad_corpus_files_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(NeuronmapError, match=message.replace(".", r"\.").replace("(", r"\(")):
        read_documents(path)


@pytest.mark.parametrize("content", ["", "\n \n\n"], ids=["zero-bytes", "blank-lines"])
def test_a_label_file_without_documents_is_refused(tmp_path, content):
    """Its label would silently drop out of the labels compared. An empty file is caught from its
    size alone (at every parse of the workflow); blank lines when the contexts job reads it."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "en.txt").write_text("One document.\n\nAnother.")
    (folder / "de.txt").write_text(content)
    message = r"de\.txt: (empty|no document in it holds text), so the label 'de' has no documents"
    if not content:
        with pytest.raises(NeuronmapError, match=message):
            corpus_files(folder)
    with pytest.raises(NeuronmapError, match=message):
        read_documents(folder)


def test_a_label_column_that_cannot_apply_is_refused(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "en.txt").write_text("One document.")
    (folder / "de.jsonl").write_text(json.dumps({"text": "Ein Satz.", "lang": "de"}) + "\n")
    for path in (folder, folder / "en.txt"):  # labels from file names; a .txt file has no columns
        with pytest.raises(NeuronmapError, match=r"corpus\.label_column 'lang' cannot apply to .*(folder|en\.txt)"):
            corpus_files(path, "lang")
        with pytest.raises(NeuronmapError, match=r"corpus\.label_column 'lang' cannot apply"):
            read_documents(path, label_column="lang")
    # A file without that column or field: found when the contexts job reads it.
    pl.DataFrame({"text": ["one"], "topic": ["a"]}).write_parquet(tmp_path / "topics.parquet")
    with pytest.raises(NeuronmapError, match=r"topics\.parquet: no column 'lang' \(corpus\.label_column; it has"):
        read_documents(tmp_path / "topics.parquet", label_column="lang")
    with pytest.raises(NeuronmapError, match=r"de\.jsonl: no line has the field 'topic' \(corpus\.label_column\)"):
        read_documents(folder / "de.jsonl", label_column="topic")
    assert [d.label for d in read_documents(folder / "de.jsonl", label_column="lang")] == ["de"]


def test_shards_stay_put_when_documents_are_added():
    documents = [Document(f"f:{i}", "x", f"document number {i}") for i in range(200)]
    before = {d.document: d.shard(7) for d in documents}
    more = documents[:50] + [Document(f"g:{i}", "y", f"new {i}") for i in range(80)] + documents[50:]
    assert all(before[d.document] == d.shard(7) for d in more if d.document in before)
    assert len({d.shard(7) for d in documents}) == 7


def test_contexts_never_span_documents(smollm2):
    _, tokenizer = smollm2
    documents = [Document("a:0", "en", "word " * 40), Document("a:1", "de", "Wort " * 5)]
    contexts = cut_contexts(tokenizer, documents, 16, 3, 0.0)
    assert contexts["n_tokens"].max() <= 16
    for document, group in contexts.group_by("document"):
        ids = tokenizer(next(d.text for d in documents if d.document == document[0]))["input_ids"]
        assert sum(group.sort("part")["token_ids"].to_list(), []) == ids
    assert contexts["context_id"].to_list() == list(range(contexts.height))


def tiny_records(model, tmp_path, tag, torch_path, chunk_elements=None, monkeypatch=None, dies_after=None):
    """The records, label records and responses of a labelled pass over random contexts on `model`,
    on the C kernel or on the torch path (every site's layers stacked, `chunk_elements` at a time)."""
    from neuronmap.corpus import reductions
    rng = np.random.default_rng(3)
    lengths = [12, 5, 1, 9, 12, 3, 7, 2, 11, 6, 4]
    contexts = pl.DataFrame({"context_id": [3 * i + 1 for i in range(len(lengths))], "n_tokens": lengths,
                             "token_ids": [rng.integers(1, 97, n).tolist() for n in lengths],
                             "label": [("en", "de", "fr")[i % 3] for i in range(len(lengths))]})
    with pytest.MonkeyPatch.context() as patch:
        if torch_path:
            patch.setattr(records_kernel, "load", lambda: None)
        if chunk_elements is not None:
            patch.setattr(reductions, "REDUCE_ELEMENTS", chunk_elements)
        settings = RecordsSettings.defaults(batch_size=3, examples=2, peak_token_contexts=4,
                                            checkpoint_minutes=0 if dies_after else 60)
        outputs = RecordsOutputs(*(tmp_path / f"{tag}.{name}" for name in ("u.parquet", "e.parquet", "ckpt",
                                                                             "l.parquet", "r.parquet")))
        make = lambda: RecordsPass(model, contexts, settings, 12, 0, labels=["de", "en", "fr"], response_sites=("act",))
        if dies_after is not None:
            forward, calls = RecordsPass._forward, []

            def dies(self, *args):
                calls.append(1)
                if len(calls) > dies_after:
                    raise KeyboardInterrupt
                return forward(self, *args)
            patch.setattr(RecordsPass, "_forward", dies)
            with pytest.raises(KeyboardInterrupt):
                make().run(outputs)
            assert torch.load(outputs.checkpoint, weights_only=True)["batches_done"] == dies_after
            patch.setattr(RecordsPass, "_forward", forward)
        job = make()
        assert all(r.kernel is None for r in job.records.values()) == torch_path
        job.run(outputs)
    return {name: pl.read_parquet(getattr(outputs, name)) for name in ("units", "extremes", "labels", "responses")}


def assert_same_tiny_records(a, b):
    floats = {"units": ["mean", "m2", "m3", "m4"], "labels": ["sum"]}
    for name in ("units", "extremes", "labels"):
        exact = [c for c in a[name].columns if c not in floats.get(name, [])]
        # A job writes its extremes in its heaps' order, which is the kernel's or torch's own.
        order = exact if name == "extremes" else []
        assert a[name].select(exact).sort(order).equals(b[name].select(exact).sort(order)), name
        for column in floats.get(name, []):
            np.testing.assert_allclose(a[name][column], b[name][column], rtol=1e-9, atol=1e-9)
    assert a["responses"].columns == b["responses"].columns
    for column in a["responses"].columns:
        if a["responses"][column].dtype != pl.Binary:
            assert a["responses"][column].equals(b["responses"][column]), column
        else:  # float16 rows: the kernel's mean and torch's may round apart by a unit in the last place
            left, right = (np.stack([np.frombuffer(v, np.float16) for v in r["responses"][column]]).astype(np.float32)
                           for r in (a, b))
            np.testing.assert_allclose(left, right, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("chunk_elements", [None, 4000, 1], ids=["all layers at once", "2 layers at once", "per layer"])
def test_stacked_torch_path_equals_the_kernel_through_the_pass(tiny_llama, tmp_path, chunk_elements):
    """Records, label records and responses of the torch path (as on a GPU: a site's layers reduced
    together) equal the C kernel's, whatever the layers reduced per call."""
    native = tiny_records(tiny_llama, tmp_path, "native", False)
    stacked = tiny_records(tiny_llama, tmp_path, "torch", True, chunk_elements)
    assert_same_tiny_records(native, stacked)


def test_the_torch_path_resumes_to_the_same_records(tiny_llama, tmp_path):
    whole = tiny_records(tiny_llama, tmp_path, "whole", True)
    resumed = tiny_records(tiny_llama, tmp_path, "resumed", True, dies_after=2)
    for name in whole:
        assert whole[name].equals(resumed[name]), name


def test_histogram_runs_hold_the_dense_counts():
    """A job's histograms as runs (tables.RECORDS_PARTIAL) give back the dense counts: units with
    one bin, every bin, none, gaps inside the run; also from a slice of the column."""
    rng = np.random.default_rng(5)
    counts = np.where(rng.random((40, BINS)) < 0.05, rng.integers(1, 2 ** 31 - 1, (40, BINS)), 0)
    counts[0] = 0
    counts[1] = 0
    counts[1, 7] = 3
    counts[2] = 1
    counts[3] = 0
    counts[3, [0, BINS - 1]] = 2
    first, runs = to_runs(counts)
    assert first.dtype == np.int16 and runs.type.value_type == pa.int32()
    assert (first[0], len(runs[0])) == (0, 0)
    assert (first[1], runs[1].as_py()) == (7, [3])
    assert len(runs[3]) == BINS and runs[3].as_py()[1:-1] == [0] * (BINS - 2)
    assert np.array_equal(from_runs(first, runs), counts)
    assert np.array_equal(from_runs(first[5:], runs[5:]), counts[5:])
