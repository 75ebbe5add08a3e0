"""Extraction's torch path (what a GPU runs) costs, per batch, no host round-trip but the response
copy and a number of ops that does not grow with the model's depth: counted on the CPU by
`HostSyncCounter` (tests/host_syncs.py), the C kernel turned off."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from polars.testing import assert_frame_equal

import neuronmap.extract.engine as engine
from host_syncs import HostSyncCounter
from neuronmap.extract import neuron_stats
from neuronmap.extract.engine import Extraction, ExtractionOutputs
from neuronmap.extract.settings import ExtractionSettings
from neuronmap.io.parquet import read_table
from neuronmap.model import hooks
from neuronmap.model.prefix_cache import SharedPrefixes
from test_dispatch import char_tokenizer

TEXTS = ["Paris is in", "go:", "Orion, the hunter", "x", "a b c d e f g", "The capital of Peru is", "ran"]
PREFIXES = ["go went\nsee saw\n" if i % 2 else "" for i in range(len(TEXTS))]
IDS = [f"p{i}" for i in range(len(TEXTS))]
SETTINGS = ExtractionSettings.defaults(sites=("gate", "up", "act", "down"), batch_size=3, batch_tokens=200, top_n=2,
                                       active_threshold=0.1, fused_statistics=False, poolings=("mean", "max", "last"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer
    path = tmp_path_factory.mktemp("chars")
    char_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def tiny_llama(n_layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=n_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def torch_path(monkeypatch):
    """The statistics of a GPU (torch's code) on the CPU: the C kernel is not used."""
    monkeypatch.setattr(hooks, "runs_natively", lambda device: False)
    monkeypatch.setattr(neuron_stats, "runs_natively", lambda device: False)


def counted_run(model, tokenizer, tmp_path, span: str, monkeypatch, **options) -> list[dict]:
    """Run a shard, counting each batch's ops; per batch, what extraction adds to the bare forward:
    the forward of the same batch without hooks is replayed afterwards, counted, and subtracted,
    and so is the batch's copy of the prefixes' cache (`SharedPrefixes.rows`, per layer), which
    the bare forward of this regime makes too (the calibration's floor)."""
    counts, replays = [], []
    real_forward, real_batch, real_rows = engine.forward_without_logits, Extraction._run_batch, SharedPrefixes.rows

    def rows(self, indices):
        with HostSyncCounter() as counter:
            selected = real_rows(self, indices)
        counts[-1]["rows"] = counter.snapshot()
        return selected

    def forward(model, batch, cache=None):
        with HostSyncCounter() as stash:  # the replay's own copy: counted here, then subtracted
            replays.append((batch, copy.deepcopy(cache)))
        counts[-1]["stash"] = stash.snapshot()
        real_forward(model, batch, cache)

    def run_batch(self, batch, shared, writer):
        counts.append({})
        with HostSyncCounter() as counter:
            real_batch(self, batch, shared, writer)
        counts[-1]["batch"] = counter.snapshot()

    monkeypatch.setattr(engine, "forward_without_logits", forward)
    monkeypatch.setattr(Extraction, "_run_batch", run_batch)
    monkeypatch.setattr(SharedPrefixes, "rows", rows)
    outputs = ExtractionOutputs(*(tmp_path / f"{span}.{kind}.parquet" for kind in ("responses", "stats", "top")))
    texts = TEXTS if span == "query" else [p + t for p, t in zip(PREFIXES, TEXTS)]
    settings = dataclasses.replace(SETTINGS, pool_span=span)
    Extraction(model, tokenizer, IDS, texts, settings, PREFIXES if span == "query" else None, **options).run(outputs)
    added = []
    with torch.inference_mode():
        for count, (batch, cache) in zip(counts, replays):
            with HostSyncCounter() as bare:
                real_forward(model, batch, cache)
            added.append({key: count["batch"][key] - count["stash"][key] - count.get("rows", {}).get(key, 0)
                          - bare.snapshot()[key] for key in ("ops", "kernels", "syncs", "uploads")}
                         | {"sync_ops": count["batch"]["sync_ops"], "bare_syncs": bare.syncs})
    return added


@pytest.mark.parametrize("span", ["prompt", "query"])
def test_a_batch_syncs_once_and_its_ops_do_not_grow_with_the_layers(tokenizer, tmp_path, monkeypatch, torch_path,
                                                                    span):
    per_depth = {depth: counted_run(tiny_llama(depth), tokenizer, tmp_path / str(depth), span, monkeypatch)
                 for depth in (2, 4)}
    print(span, {depth: [(b["ops"], b["syncs"], b["uploads"]) for b in batches]
                 for depth, batches in per_depth.items()})
    for depth, batches in per_depth.items():
        for added in batches:
            # The response copy (on the CPU: the one Tensor.numpy of the batch's flat block).
            assert added["syncs"] <= 1, (depth, added["sync_ops"])
            assert added["uploads"] <= 8, (depth, added)  # host -> device: a few per batch
    for shallow, deep in zip(per_depth[2], per_depth[4]):
        assert deep["ops"] == shallow["ops"], "extraction's ops grow with the layers"
        assert deep["kernels"] == shallow["kernels"] and deep["uploads"] == shallow["uploads"]


def test_the_torch_path_writes_what_the_c_kernel_writes(tokenizer, tmp_path, monkeypatch):
    """Same frames from the C kernel and from torch's stacked path, with the writer thread: equal
    to float rounding (the sums are added in another order), token strings and counts exactly."""
    model = tiny_llama(3)
    frames = {}
    for name in ("native", "torch"):
        if name == "torch":
            monkeypatch.setattr(hooks, "runs_natively", lambda device: False)
            monkeypatch.setattr(neuron_stats, "runs_natively", lambda device: False)
        settings = dataclasses.replace(SETTINGS, fused_statistics="auto" if name == "native" else False)
        outputs = ExtractionOutputs(*(tmp_path / f"{name}.{kind}.parquet" for kind in ("responses", "stats", "top")))
        extraction = Extraction(model, tokenizer, IDS, TEXTS, settings, PREFIXES, background=True)
        assert extraction.background == (name == "torch")  # the C kernel's kept blocks are written in place
        extraction.run(outputs)
        frames[name] = [read_table(path) for path in (outputs.responses, outputs.stats, outputs.top)]
    (responses, stats, top), (t_responses, t_stats, t_top) = frames["native"], frames["torch"]
    assert_frame_equal(responses.select("prompt_id", "n_tokens"), t_responses.select("prompt_id", "n_tokens"))
    for name in responses.columns[2:]:
        a, b = (np.frombuffer(b"".join(frame[name].to_list()), np.float16) for frame in (responses, t_responses))
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-4, err_msg=name)
    assert_frame_equal(stats, t_stats, check_exact=False, rel_tol=1e-5, abs_tol=1e-6)
    # Tied peaks (one prefix, one first token) may keep another prompt: the values must agree.
    keys = ["site", "layer", "unit", "value"]
    assert_frame_equal(top.sort(keys).select(keys), t_top.sort(keys).select(keys), check_exact=False,
                       rel_tol=1e-5, abs_tol=1e-6)


def test_an_error_in_the_writer_thread_reaches_the_shard_and_leaves_no_file(tokenizer, tmp_path, monkeypatch,
                                                                           torch_path):
    from neuronmap.io import responses

    def broken(self, *args):
        raise OSError("disk full")
    monkeypatch.setattr(responses.ResponseWriter, "write_batch", broken)
    outputs = ExtractionOutputs(*(tmp_path / f"x.{kind}.parquet" for kind in ("responses", "stats", "top")))
    with pytest.raises(OSError, match="disk full"):
        Extraction(tiny_llama(2), tokenizer, IDS, TEXTS, SETTINGS, PREFIXES, background=True).run(outputs)
    assert not outputs.responses.exists() and not list(tmp_path.iterdir())
