"""Per-token statistics: the same numbers whatever the sharding and batching, and equal to a
direct computation over every token."""

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from neuronmap.extract.engine import Extraction, ExtractionOutputs
from neuronmap.extract.settings import ExtractionSettings
from neuronmap.extract.neuron_stats import merge_partials, merge_tops
from neuronmap.io.parquet import read_table
from neuronmap.io.responses import ResponseReader

TEXTS = [f"The capital city of {c} is" for c in ("France", "Germany", "Peru", "the United Kingdom", "Chad")] + \
        [f"The past tense of {v} is" for v in ("go", "run", "think", "sing", "bring", "catch", "be")] + \
        ["Hello", "A star in the constellation of Orion, the hunter, is Betelgeuse", "x y z"]
IDS = [f"p{i:02d}" for i in range(len(TEXTS))]
SETTINGS = ExtractionSettings.defaults(sites=("gate", "act", "down"), batch_size=4, batch_tokens=48, top_n=3,
                                       active_threshold=0.1, poolings=("mean", "max", "last"))


def extract_in_shards(model, tokenizer, tmp_path, n_shards):
    stats, tops, responses = [], [], []
    for shard in range(n_shards):
        rows = list(range(shard, len(TEXTS), n_shards))
        outputs = ExtractionOutputs(*(tmp_path / f"{n_shards}-{shard}.{kind}.parquet"
                                      for kind in ("responses", "stats", "top")))
        Extraction(model, tokenizer, [IDS[i] for i in rows], [TEXTS[i] for i in rows], SETTINGS).run(outputs)
        stats.append(read_table(outputs.stats))
        tops.append(read_table(outputs.top))
        responses.append(outputs.responses)
    return merge_partials(stats), merge_tops(tops, 3), ResponseReader(responses)


@pytest.fixture(scope="module")
def sharded(smollm2, tmp_path_factory):
    model, tokenizer = smollm2
    tmp = tmp_path_factory.mktemp("stats")
    return {n: extract_in_shards(model, tokenizer, tmp, n) for n in (1, 2, 5)}


def test_statistics_do_not_depend_on_the_shard_count(sharded):
    one, _, _ = sharded[1]
    for n in (2, 5):
        other, _, _ = sharded[n]
        assert other.select("site", "layer", "unit", "count").equals(one.select("site", "layer", "unit", "count"))
        for column in ("mean", "var", "min", "max"):
            np.testing.assert_allclose(other[column].to_numpy(), one[column].to_numpy(), rtol=1e-4, atol=1e-5,
                                       err_msg=f"{column} with {n} shards")
        # Batches of other shapes round differently, so a token within float error of the
        # threshold may flip: at most one token, in very few units.
        for column in ("frac_positive", "frac_active"):
            flips = np.abs(other[column].to_numpy() - one[column].to_numpy()) * one["count"].to_numpy()
            assert flips.max() <= 1 + 1e-9 and (flips > 0.5).mean() < 1e-3, column


def test_top_activations_do_not_depend_on_the_shard_count(sharded):
    _, one, _ = sharded[1]
    for n in (2, 5):
        _, other, _ = sharded[n]
        np.testing.assert_allclose(other["value"].to_numpy(), one["value"].to_numpy(), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def every_token(model, tokenizer, site, layer):
    """The site's values at every token of every prompt, from unbatched forwards."""
    mlp = model.model.layers[layer].mlp
    seen = []
    handle = mlp.register_forward_hook(lambda module, args, output: seen.append(args[0][0].clone()))
    try:
        for text in TEXTS:
            model(**tokenizer(text, return_tensors="pt"))
    finally:
        handle.remove()
    values = []
    for x in seen:
        gate = x @ mlp.gate_proj.weight.T
        act = F.silu(gate) * (x @ mlp.up_proj.weight.T)
        values.append({"gate": gate, "act": act, "down": act @ mlp.down_proj.weight.T}[site])
    return values


@pytest.mark.parametrize("site, layer", [("gate", 0), ("act", 17), ("down", 29)])
def test_statistics_equal_a_direct_computation(smollm2, sharded, site, layer):
    model, tokenizer = smollm2
    per_prompt = every_token(model, tokenizer, site, layer)
    tokens = torch.cat(per_prompt).double().numpy()
    stats, tops, reader = sharded[2]
    row = stats.filter((pl.col("site") == site) & (pl.col("layer") == layer)).sort("unit")
    assert (row["count"] == tokens.shape[0]).all()
    np.testing.assert_allclose(row["mean"], tokens.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(row["var"], tokens.var(0), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(row["min"], tokens.min(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(row["max"], tokens.max(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(row["frac_positive"], (tokens > 0).mean(0), atol=1e-12)
    np.testing.assert_allclose(row["frac_active"], (np.abs(tokens) > 0.1).mean(0), atol=1e-12)
    # The top prompt of unit 5 is the prompt with the highest peak, at the peak's position.
    # Prompts that share their first tokens may tie at the peak: any of them may come first.
    peaks = [float(v[:, 5].max()) for v in per_prompt]
    top = tops.filter((pl.col("site") == site) & (pl.col("layer") == layer) & (pl.col("unit") == 5)).sort("rank")
    best = IDS.index(top["prompt_id"][0])
    assert peaks[best] == pytest.approx(max(peaks), rel=1e-4, abs=1e-5)
    assert top["position"][0] == int(per_prompt[best][:, 5].argmax())
    assert top["value"][0] == pytest.approx(peaks[best], rel=1e-4, abs=1e-5)
    # Pooled responses stored for every pooling agree with the same tokens.
    for pooling, reduce in (("mean", lambda v: v.mean(0)), ("max", lambda v: v.max(0).values),
                            ("last", lambda v: v[-1])):
        block = reader.read_block(pooling, site, layer, IDS)
        expected = np.stack([reduce(v).numpy() for v in per_prompt])
        np.testing.assert_allclose(block, expected, rtol=2e-3, atol=2e-3)


def test_a_batch_that_runs_out_of_memory_is_retried_in_halves(smollm2, sharded, tmp_path, monkeypatch, caplog):
    import neuronmap.extract.engine as extract
    model, tokenizer = smollm2
    real_forward = extract.forward_without_logits

    def small_batches_only(model, batch, cache=None):
        if batch["input_ids"].shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        real_forward(model, batch, cache)

    monkeypatch.setattr(extract, "forward_without_logits", small_batches_only)
    outputs = ExtractionOutputs(*(tmp_path / f"{kind}.parquet" for kind in ("responses", "stats", "top")))
    Extraction(model, tokenizer, IDS, TEXTS, SETTINGS).run(outputs)
    assert "retrying in halves" in caplog.text
    one, _, reader = sharded[1]
    retried = merge_partials([read_table(outputs.stats)])
    assert retried["count"].equals(one["count"])  # no token counted twice
    np.testing.assert_allclose(retried["mean"].to_numpy(), one["mean"].to_numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ResponseReader([outputs.responses]).read_block("max", "act", 3, IDS),
                               reader.read_block("max", "act", 3, IDS), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("width", [5, 37])
def test_the_running_top_equals_a_top_over_all_rows(width, monkeypatch):
    """The C kernel's in-place merge and torch's cat-and-topk keep, batch by batch, the top_n
    rows a sort of every row gives: rows of -inf (no valid token) included while there is room."""
    from neuronmap.extract import neuron_stats
    from neuronmap.model import native_statistics
    from neuronmap.model.hooks import BatchObservation
    assert native_statistics.available(), "the statistics kernel did not compile"
    torch.manual_seed(0)
    batches = [torch.randn(rows, width) for rows in (2, 7, 1, 4)]
    batches[1][3] = float("-inf")
    positions = [torch.randint(0, 50, b.shape, dtype=torch.int32) for b in batches]
    merged = {}
    for in_place in (True, False):
        monkeypatch.setattr(neuron_stats, "runs_natively", lambda device: in_place)
        stats = neuron_stats.UnitStats(2, width, 4, torch.device("cpu"))  # two layers: the second reversed
        assert stats.in_place == in_place
        first = 0
        for peaks, where in zip(batches, positions):
            rows = peaks.shape[0]
            zero = torch.zeros(2, width)
            seen = BatchObservation({}, zero.double(), zero.double(), zero, zero, zero, zero,
                                    torch.stack([peaks, peaks.flip(1)]), torch.stack([where, where.flip(1)]))
            stats.add(seen, rows, torch.arange(first, first + rows))
            first += rows
        values, prompts, where = stats.tops()
        assert all(torch.equal(t[1], t[0].flip(1)) for t in (values, prompts, where))  # layers kept apart
        merged[in_place] = values[0], prompts[0], where[0]
    values = torch.cat(batches)
    expected, order = values.sort(dim=0, descending=True, stable=True)
    for got in merged.values():
        assert torch.equal(got[0], expected[:4])
        finite = torch.isfinite(expected[:4])
        assert torch.equal(got[1][finite], order[:4][finite])
        assert torch.equal(got[2][finite], torch.cat(positions).gather(0, order[:4])[finite])


class _Tops:
    """A run's running top as UnitStats keeps it: values [layers, kept, width] highest first."""

    def __init__(self, values, prompts, positions):
        self.arrays = tuple(torch.as_tensor(a) for a in (values, prompts, positions))

    def tops(self):
        return self.arrays


def test_top_table_rows_with_and_without_missing_peaks():
    """Full tops take the flat path, a top with a missing (-inf) peak the filtered one: both give
    the rows a plain loop over (layer, slot, unit) gives, strings resolved by dictionary."""
    from neuronmap.extract.neuron_stats import top_table
    rng = np.random.default_rng(0)
    values = -np.sort(-rng.normal(size=(2, 3, 4)).astype(np.float32), axis=1)
    prompts = rng.integers(0, 3, (2, 3, 4))
    positions = rng.integers(0, 2, (2, 3, 4)).astype(np.int32)
    tokens = {0: [5, 6], 1: [7, 8], 2: [9, 5]}
    for missing in (False, True):
        v = values.copy()
        if missing:
            v[1, 2, 3] = -np.inf
        table = pl.from_arrow(top_table({("up", 4): _Tops(v, prompts, positions)}, ["p0", "p1", "p2"],
                                        lambda p: tokens[p], lambda ids: [f"t{i}" for i in ids]))
        expected = [("up", 4 + layer, unit, float(v[layer, slot, unit]), f"p{prompts[layer, slot, unit]}",
                     int(positions[layer, slot, unit]), f"t{tokens[prompts[layer, slot, unit]][positions[layer, slot, unit]]}")
                    for layer in range(2) for slot in range(3) for unit in range(4) if np.isfinite(v[layer, slot, unit])]
        assert table.rows() == expected
        assert table.height == 24 - missing
