"""The labels stage against brute force on a small labelled corpus (the shipped fortunes in four
languages) and the embedded model: per-label firing rates and means, each context's stored mean
response, LAPE's selection against the authors' algorithm, AP on contexts against scikit-learn;
the per-label records survive a resumed job unchanged."""

import subprocess
import sys

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import average_precision_score

from neuronmap.corpus.contexts import cut_contexts
from neuronmap.corpus.engine import RecordsOutputs, RecordsPass
from neuronmap.corpus.reading import read_documents
from neuronmap.corpus.reductions import SiteRecords
from neuronmap.corpus.settings import RecordsSettings
from neuronmap.io import tables
from neuronmap.io.responses import ResponseReader
from neuronmap.labels.expertise import label_expertise
from neuronmap.labels.lape import entropy, lape_selection
from neuronmap.labels.records import label_records, rate_matrix
from neuronmap.model.architectures import MlpSites

from conftest import REPO

CORPUS = REPO / "data" / "corpus" / "fortunes"
CONTEXT_TOKENS = 12
LABELS = ["de", "en", "es", "it"]
SITES = ("gate", "act")


@pytest.fixture(scope="module")
def contexts(smollm2):
    _, tokenizer = smollm2
    documents = read_documents(CORPUS)
    picked = [d for label in LABELS for d in documents if d.label == label][::53]
    return cut_contexts(tokenizer, picked, CONTEXT_TOKENS, 2, 0.25)


def record(model, tokenizer, contexts, tmp_path, tag, batch_size=4, shards=(0, 1), sites=SITES, **changes):
    """The shards' records with labels and context responses at the gate site."""
    settings = RecordsSettings.defaults(batch_size=batch_size, sites=sites, **changes)
    outputs = []
    for shard in shards:
        part = contexts.filter((pl.col("shard") == shard) & ~pl.col("heldout"))
        out = RecordsOutputs(*(tmp_path / f"{tag}-{shard}.{kind}" for kind in ("units", "ext", "ckpt", "labels",
                                                                               "responses")))
        RecordsPass(model, part, settings, CONTEXT_TOKENS, tokenizer.pad_token_id, LABELS, ("gate",)).run(out)
        outputs.append(out)
    return outputs


@pytest.fixture(scope="module")
def recorded(smollm2, contexts, tmp_path_factory):
    model, tokenizer = smollm2
    return record(model, tokenizer, contexts, tmp_path_factory.mktemp("labels"), "run")


@pytest.fixture(scope="module")
def activations(smollm2, contexts):
    """Every gate and act activation of the recorded contexts, from plain hooks on the same padded
    batches as the records jobs: {(site, layer): [one [tokens, n] per context]}, contexts in that order."""
    model, tokenizer = smollm2
    sites = MlpSites(model)
    parts = [contexts.filter((pl.col("shard") == shard) & ~pl.col("heldout")).sort("context_id") for shard in (0, 1)]
    seen, handles, lengths = {}, [], []
    for site in SITES:
        for layer in range(sites.n_layers):
            point = sites.point(site, layer)
            def keep(module, args, output=None, key=(site, layer), is_input=point.is_input):
                x = (args[0] if is_input else output).float()
                seen.setdefault(key, []).extend(x[i, :n].clone() for i, n in enumerate(lengths))
            handles.append(point.register(keep))
    try:
        with torch.inference_mode():
            for part in parts:
                rows = part["token_ids"].to_list()
                for start in range(0, len(rows), 4):
                    batch = rows[start:start + 4]
                    lengths[:] = [len(row) for row in batch]
                    ids = torch.full((len(batch), CONTEXT_TOKENS), tokenizer.pad_token_id)
                    for i, row in enumerate(batch):
                        ids[i, :len(row)] = torch.tensor(row)
                    mask = (torch.arange(CONTEXT_TOKENS)[None] < torch.tensor(lengths)[:, None]).long()
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return pl.concat(parts), seen


def test_held_out_documents_are_stable_and_whole(smollm2, contexts):
    _, tokenizer = smollm2
    assert 0 < contexts["heldout"].sum() < contexts.height
    per_document = contexts.group_by("document").agg(pl.col("heldout").n_unique())
    assert (per_document["heldout"] == 1).all(), "a document's contexts are held out together"
    documents = read_documents(CORPUS)
    picked = [d for label in LABELS for d in documents if d.label == label][::53]
    again = cut_contexts(tokenizer, picked[::-1], CONTEXT_TOKENS, 2, 0.25)
    assert dict(zip(again["document"], again["heldout"])) == dict(zip(contexts["document"], contexts["heldout"]))


def test_label_records_equal_brute_force(recorded, activations):
    kept, seen = activations
    merged = label_records([out.labels for out in recorded])
    assert merged.columns == tables.LABEL_RECORDS.names
    label_of = np.array(kept["label"].to_list())
    for (site, layer), values in seen.items():
        got = merged.filter((pl.col("site") == site) & (pl.col("layer") == layer)).sort(["label", "unit"])
        for label in LABELS:
            tokens = torch.cat([v for v, own in zip(values, label_of) if own == label]).double()
            row = got.filter(pl.col("label") == label)
            assert (row["tokens"] == tokens.shape[0]).all()
            assert (row["contexts"] == int((label_of == label).sum())).all()
            np.testing.assert_array_equal(row["n_positive"].to_numpy(), (tokens > 0).sum(0).numpy())
            np.testing.assert_allclose(row["firing_rate"].to_numpy(), (tokens > 0).double().mean(0).numpy(), rtol=1e-12)
            np.testing.assert_allclose(row["mean"].to_numpy(), tokens.mean(0).numpy(), rtol=1e-5, atol=1e-6)


def test_context_responses_are_each_contexts_mean(recorded, activations):
    kept, seen = activations
    reader = ResponseReader([out.responses for out in recorded])
    ids = [str(c) for c in kept["context_id"].to_list()]
    assert sorted(reader.prompt_ids(), key=int) == sorted(ids, key=int)
    assert {site for site, _ in reader.blocks("mean")} == {"gate"}
    for layer in (0, 17, 29):
        stored = reader.read_block("mean", "gate", layer, ids)
        expected = torch.stack([v.mean(0) for v in seen[("gate", layer)]]).numpy()
        np.testing.assert_allclose(stored, expected.astype(np.float16).astype(np.float32), rtol=2e-3, atol=1e-4)


def test_torch_path_equals_the_native_kernel_for_labels():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((5, 7, 40)).astype(np.float32))
    lengths = torch.tensor([7, 3, 0, 5, 1])
    labels = torch.tensor([1, 0, -1, 2, 1])
    records = [SiteRecords(40, 3, 2, 0.05, torch.device("cpu"), labels=3, compiled=compiled)
               for compiled in (True, False)]
    assert records[0].kernel is not None, "the C kernel did not build"
    for r in records:
        for step in range(2):
            r.add(x * (step + 1), lengths, torch.arange(5) + 10 * step, labels)
    native, plain = (r.state() for r in records)
    for name in ("label_positive",):
        assert torch.equal(native[name], plain[name]), name
    torch.testing.assert_close(native["label_sum"], plain["label_sum"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(records[0].row_means, records[1].row_means.double(), rtol=1e-6, atol=1e-7)
    valid = torch.arange(7)[None, :, None] < lengths[:, None, None]
    brute = (torch.where(valid, x * 2, 0).double().sum(1) / lengths.clamp(min=1)[:, None])
    torch.testing.assert_close(records[0].row_means[lengths > 0], brute[lengths > 0], rtol=1e-6, atol=1e-6)


def reference_lape(rates: np.ndarray, top_rate: float, filter_rate: float, bar_ratio: float) -> list[set[int]]:
    """The selection of LAPE's identify.py (Tang et al. 2024), on rates [units, labels], in torch as written there."""
    activation_probs = torch.from_numpy(rates)
    normed = activation_probs / activation_probs.sum(dim=-1, keepdim=True)
    normed[torch.isnan(normed)] = 0
    log_probs = torch.where(normed > 0, normed.log(), 0)
    ent = -torch.sum(normed * log_probs, dim=-1)
    flattened = activation_probs.flatten()
    top_prob_value = flattened.kthvalue(round(len(flattened) * filter_rate)).values.item()
    top_position = (activation_probs > top_prob_value).sum(dim=-1)
    ent[top_position == 0] = torch.inf
    _, index = ent.topk(round(len(ent) * top_rate), largest=False)
    bar = flattened.kthvalue(round(len(flattened) * bar_ratio)).values.item()
    selected = activation_probs[index]
    return [set(index[selected[:, column] > bar].tolist()) for column in range(rates.shape[1])]


def test_lape_equals_the_authors_algorithm():
    rng = np.random.default_rng(0)
    rates = rng.beta(0.5, 2.0, (3000, 4))
    rates[rng.random(3000) < 0.1] *= rng.random((1, 4))  # some units concentrated on few labels
    units = pl.DataFrame({"site": ["gate"] * 3000, "layer": np.repeat(np.arange(3), 1000).astype(np.int32),
                          "unit": np.tile(np.arange(1000), 3).astype(np.int32)})
    for top_rate, filter_rate, bar in ((0.01, 0.95, 0.95), (0.05, 0.9, 0.8), (0.1, 0.5, 0.99)):
        got = lape_selection(units, rates, LABELS, top_rate, filter_rate, bar)
        expected = reference_lape(rates, top_rate, filter_rate, bar)
        for column, label in enumerate(LABELS):
            rows = got.filter(pl.col("label") == label)
            indices = (rows["layer"] * 1000 + rows["unit"]).to_list()
            assert set(indices) == expected[column], (top_rate, label)
            assert rows["rank"].to_list() == list(range(1, rows.height + 1))
            assert np.all(np.diff(rows["score"].to_numpy()) >= 0), "ranked by entropy"
            np.testing.assert_allclose(rows["score"].to_numpy(), entropy(rates[indices]))


def test_lape_on_the_real_records(recorded):
    merged = label_records([out.labels for out in recorded])
    units, rates = rate_matrix(merged, ["gate"], LABELS)
    assert units.height == 30 * 1536
    got = lape_selection(units, rates, LABELS, 0.01, 0.95, 0.95)
    expected = reference_lape(rates, 0.01, 0.95, 0.95)
    index = {(layer, unit): i for i, (layer, unit) in enumerate(zip(units["layer"], units["unit"]))}
    ent = entropy(rates)
    for column, label in enumerate(LABELS):
        rows = got.filter(pl.col("label") == label)
        mine = {index[key] for key in zip(rows["layer"], rows["unit"])}
        # Equal entropies (a unit firing for one label only has entropy 0) may sit at the cut,
        # where torch.topk's choice among them is arbitrary: compare above the tie.
        cut = np.sort(np.where(np.isinf(ent), np.inf, ent))[round(len(ent) * 0.01) - 1]
        assert {i for i in mine if ent[i] < cut} == {i for i in expected[column] if ent[i] < cut}
        assert len(mine) >= len({i for i in expected[column] if ent[i] < cut})


def test_ap_on_contexts_equals_sklearn(recorded, contexts):
    kept = contexts.filter(~pl.col("heldout")).sort("context_id")
    expertise = label_expertise([out.responses for out in recorded], kept, LABELS)
    assert expertise.columns == tables.LABEL_EXPERTISE.names
    assert expertise.height == 30 * 1536 * len(LABELS)
    reader = ResponseReader([out.responses for out in recorded])
    ids = [str(c) for c in kept["context_id"].to_list()]
    labels = np.array(kept["label"].to_list())
    for layer in (3, 22):
        values = reader.read_block("mean", "gate", layer, ids)
        for label in LABELS:
            got = expertise.filter((pl.col("layer") == layer) & (pl.col("label") == label)).sort("unit")
            for unit in (0, 77, 1535):
                assert got["ap"][unit] == pytest.approx(average_precision_score(labels == label, values[:, unit]),
                                                        abs=1e-9)
    top = expertise.filter(pl.col("rank") == 1)
    assert top.height == len(LABELS)
    for row in top.to_dicts():
        assert row["ap"] == expertise.filter(pl.col("label") == row["label"])["ap"].max()


def test_an_interrupted_job_resumes_to_the_same_label_records(smollm2, contexts, tmp_path, monkeypatch):
    model, tokenizer = smollm2
    whole = record(model, tokenizer, contexts, tmp_path, "whole", batch_size=3, shards=(1,), sites=("gate",),
                   checkpoint_minutes=0)
    forward, calls = RecordsPass._forward, []

    def dies_at_the_fourth(self, *args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return forward(self, *args)
    monkeypatch.setattr(RecordsPass, "_forward", dies_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        record(model, tokenizer, contexts, tmp_path, "again", batch_size=3, shards=(1,), sites=("gate",),
               checkpoint_minutes=0)
    monkeypatch.setattr(RecordsPass, "_forward", forward)
    assert (tmp_path / "again-1.ckpt").exists() and (tmp_path / "again-1.responses.bin").exists()
    resumed = record(model, tokenizer, contexts, tmp_path, "again", batch_size=3, shards=(1,), sites=("gate",),
                     checkpoint_minutes=0)
    for a, b in zip(whole, resumed):
        assert not b.checkpoint.exists() and not b.spill.exists()
        assert pl.read_parquet(a.labels).equals(pl.read_parquet(b.labels))
        assert pq.read_table(a.responses).equals(pq.read_table(b.responses))


def test_label_select_command(recorded, contexts, tmp_path):
    contexts_path = tmp_path / "contexts.parquet"
    contexts.write_parquet(contexts_path)
    out = {name: tmp_path / f"{name}.parquet" for name in ("records", "expertise", "units", "overlap")}
    settings = ('{"sites": ["gate"], "top_rate": 0.01, "filter_rate": 0.95, "activation_bar_ratio": 0.95, '
                '"ap": true, "ap_units": "match"}')
    subprocess.run([sys.executable, "-m", "neuronmap", "label-select", "--settings", settings,
                    "--contexts", str(contexts_path), "--labels", *(str(o.labels) for o in recorded),
                    "--responses", *(str(o.responses) for o in recorded),
                    *(arg for name, path in out.items() for arg in (f"--out-{name}", str(path)))], check=True)
    units = pl.read_parquet(out["units"])
    overlap = pl.read_parquet(out["overlap"])
    for name, schema in (("records", tables.LABEL_RECORDS), ("expertise", tables.LABEL_EXPERTISE),
                         ("units", tables.LABEL_UNITS), ("overlap", tables.LABEL_OVERLAP)):
        assert pq.read_schema(out[name]).remove_metadata().equals(schema), name
    expertise = pl.read_parquet(out["expertise"])
    for row in overlap.to_dicts():
        lape = units.filter((pl.col("method") == "lape") & (pl.col("label") == row["label"]))
        ap = units.filter((pl.col("method") == "ap") & (pl.col("label") == row["label"]))
        assert row["lape_units"] == lape.height == row["ap_units"] == ap.height  # ap_units: match
        assert row["shared"] == lape.join(ap, on=["site", "layer", "unit"]).height
        assert row["population"] == 30 * 1536
        assert row["expected"] == pytest.approx(lape.height * ap.height / (30 * 1536))
        best = expertise.filter(pl.col("label") == row["label"]).sort("rank").head(ap.height)
        assert ap.select(["site", "layer", "unit"]).equals(best.select(["site", "layer", "unit"]))


def test_bad_label_input_is_a_clear_error(smollm2, contexts):
    from neuronmap.corpus.commands import check_response_size, corpus_labels
    from neuronmap.errors import NeuronmapError
    model, _ = smollm2
    with pytest.raises(NeuronmapError, match=r"labels\.ap_max_gb = 1"):
        check_response_size(200_000, model, ("gate",), 1)
    check_response_size(contexts.height, model, ("gate",), 1)
    with pytest.raises(NeuronmapError, match="holds 1 label"):
        corpus_labels(contexts.filter(pl.col("label") == "en"))
    assert corpus_labels(contexts) == LABELS
