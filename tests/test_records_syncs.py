"""The corpus records' torch path (what runs on a GPU) run on the CPU under a counter of the ops
that would make the host wait for the device: at most one such op per batch, and as many ops per
batch for a model with more layers (every layer of a site reduced in one call)."""

import numpy as np
import polars as pl
import pytest
import torch

from host_syncs import HostSyncCounter


def test_the_counter_sees_what_waits_for_the_device():
    x = torch.arange(6.0)
    mask = x > 2
    cases = {
        "item": (lambda: x[0].item(), "_local_scalar_dense"),
        "bool": (lambda: bool(x[0]), "_local_scalar_dense"),
        "int": (lambda: int(x[1]), "_local_scalar_dense"),
        "mask": (lambda: x[mask], "index"),
        "mask put": (lambda: x.clone().__setitem__(mask, 0.0), "index_put_"),
        "nonzero": (lambda: torch.nonzero(x), "nonzero"),
        "where": (lambda: torch.where(mask), "nonzero"),
        "masked_select": (lambda: x.masked_select(mask), "masked_select"),
        "unique": (lambda: torch.unique(x), "_unique2"),
        "tolist": (lambda: x.tolist(), "Tensor.tolist"),
        "numpy": (lambda: np.asarray(x), "Tensor.numpy"),
        "cpu": (lambda: x.cpu(), "Tensor.cpu"),
    }
    for inference in (False, True):  # under inference mode composite ops reach the counter whole
        for case, (run, op) in cases.items():
            with torch.inference_mode(inference), HostSyncCounter() as counter:
                run()
            assert counter.syncs >= 1 and (inference or counter.syncs == counter.sync_ops[op]), \
                (case, counter.sync_ops)


def test_the_counter_lets_fixed_shape_ops_pass():
    x = torch.arange(6.0)
    with torch.inference_mode(), HostSyncCounter() as counter:
        x.float().to(torch.float64).sum(0)
        torch.where(x > 2, x, 0.0)
    assert counter.syncs == 0, counter.sync_ops
    with HostSyncCounter() as counter:
        y = x + 1
        torch.where(x > 2, x, 0.0).sum()
        x[torch.tensor([1, 2])]
        torch.zeros(4).scatter_add_(0, torch.tensor([0, 1, 1]), torch.ones(3))
        x.topk(2)
    assert counter.syncs == 0, counter.sync_ops
    assert counter.ops >= 5 and counter.uploads == 2
    assert torch.Tensor.tolist is not None and y.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    with HostSyncCounter() as counter:
        pass
    assert counter.ops == 0
    with HostSyncCounter() as counter:
        x.cpu().numpy()  # one copy, then host memory
    assert counter.syncs == 1, counter.sync_ops


def tiny_llama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


CONTEXT_TOKENS = 12
BATCH = 3


def tiny_contexts(n: int = 9) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    lengths = [CONTEXT_TOKENS, 5, 1, 9, CONTEXT_TOKENS, 3, 7, 2, 11][:n]
    return pl.DataFrame({"context_id": list(range(n)), "n_tokens": lengths,
                         "token_ids": [rng.integers(1, 97, size).tolist() for size in lengths],
                         "label": [("en", "de", "fr")[i % 3] for i in range(n)]})


def per_batch_counts(model, tmp_path, monkeypatch, labelled: bool) -> list[dict]:
    """Counts of each batch of a records pass on the torch path (as on a GPU), its bare forward's
    subtracted: what the records add to the forward."""
    from neuronmap.corpus import native
    from neuronmap.corpus.engine import RecordsOutputs, RecordsPass
    from neuronmap.corpus.settings import RecordsSettings

    monkeypatch.setattr(native, "load", lambda: None)  # the torch path, as wherever the kernel does not run
    contexts = tiny_contexts()
    settings = RecordsSettings.defaults(batch_size=BATCH, checkpoint_minutes=60, examples=2, peak_token_contexts=3)
    extra = dict(labels=["de", "en", "fr"], response_sites=("act",)) if labelled else {}
    job = RecordsPass(model, contexts, settings, CONTEXT_TOKENS, 0, **extra)
    counts, forward, spill = [], RecordsPass._forward, RecordsPass._spill_responses

    def counted_forward(self, rows, *args):
        counter = HostSyncCounter()
        with counter:
            forward(self, rows, *args)
        counts.append(counter)

    def counted_spill(self, *args):
        with counts[-1]:
            spill(self, *args)

    monkeypatch.setattr(RecordsPass, "_forward", counted_forward)
    monkeypatch.setattr(RecordsPass, "_spill_responses", counted_spill)
    outputs = RecordsOutputs(tmp_path / "u.parquet", tmp_path / "e.parquet", tmp_path / "c.ckpt",
                             tmp_path / "l.parquet" if labelled else None, tmp_path / "r.parquet" if labelled else None)
    job.run(outputs)
    bare = bare_counts(model, contexts)
    return [{"syncs": c.syncs - bare.syncs, "ops": c.ops - bare.ops, "sync_ops": c.sync_ops - bare.sync_ops}
            for c in counts]


def bare_counts(model, contexts) -> HostSyncCounter:
    """The counts of a bare forward of one batch as the records pass builds it."""
    lengths = np.array(contexts["n_tokens"][:BATCH].to_list())
    ids = torch.zeros(BATCH, CONTEXT_TOKENS, dtype=torch.long)
    attention = torch.from_numpy((np.arange(CONTEXT_TOKENS)[None, :] < lengths[:, None]).astype(np.int64))
    with torch.inference_mode(), HostSyncCounter() as counter:
        model(input_ids=ids, attention_mask=attention, use_cache=False, logits_to_keep=1)
    return counter


@pytest.mark.parametrize("labelled", [False, True], ids=["records", "with labels and responses"])
def test_records_wait_for_the_device_at_most_once_per_batch(tmp_path, monkeypatch, labelled):
    counts = per_batch_counts(tiny_llama(2), tmp_path, monkeypatch, labelled)
    assert len(counts) == 3
    for batch in counts:
        assert batch["syncs"] <= 1, batch["sync_ops"]


def test_records_ops_do_not_grow_with_layers(tmp_path, monkeypatch):
    ops = {layers: per_batch_counts(tiny_llama(layers), tmp_path / str(layers), monkeypatch, True)
           for layers in (2, 4)}
    for two, four in zip(ops[2], ops[4]):
        assert four["ops"] == two["ops"], (two["ops"], four["ops"])
