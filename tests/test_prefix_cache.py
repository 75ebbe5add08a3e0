"""Demonstrations forwarded once: on real prompts of the embedded model, the cached-prefix path
gives the uncached path's greedy answers and pooled responses, and query pooling equals a manual
computation over the asked fact's tokens."""

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from neuronmap.ablate.evaluation import generate, generate_sweep
from neuronmap.ablate.settings import EvaluationSettings
from neuronmap.extract.engine import Extraction, ExtractionOutputs
from neuronmap.extract.settings import ExtractionSettings
from neuronmap.io.responses import ResponseReader
from neuronmap.model.architectures import MlpSites
from neuronmap.model.batching import encode, length_sorted_batches
from neuronmap.model.deactivation import Deactivation, deactivated
from neuronmap.model.prefix_cache import NO_PREFIX, split_prompts
from neuronmap.prepare.prompts import build_prompts
from neuronmap.prepare.relations import find_relation_file, load_relation
from neuronmap.prepare.settings import PromptSettings

from conftest import RELATIONS
from test_hooks import mlp_inputs

SITES = ("gate", "up", "act", "down")


@pytest.fixture(scope="module")
def prompts():
    relations = [load_relation(find_relation_file(RELATIONS, name), name)
                 for name in ("country_capital_city", "verb_past_tense", "word_first_letter")]
    built = build_prompts(relations, PromptSettings.defaults(max_facts=40, test_facts=12))
    return built.sort("prompt_id").gather_every(3)


def uncached_answers(model, tokenizer, texts, settings):
    """transformers' own generate on the whole prompts, left-padded: the reference."""
    answers = [None] * len(texts)
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    for batch in length_sorted_batches(lengths, settings.batch_size):
        encoded = encode(tokenizer, [texts[i] for i in batch], torch.device("cpu"), padding_side="left")
        out = model.generate(**encoded, max_new_tokens=settings.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
        for i, text in zip(batch, tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1]:],
                                                         skip_special_tokens=True)):
            answers[i] = text
    return answers


def test_prompts_split_at_a_token_boundary_of_the_whole_prompt(smollm2, prompts):
    _, tokenizer = smollm2
    texts = prompts["text"].to_list()
    split = split_prompts(tokenizer, prompts["prefix"].to_list(), texts)
    assert len(split.prefixes) <= prompts.select("relation", "template", "demo_set").n_unique()
    for i, ids in enumerate(tokenizer(texts)["input_ids"]):
        assert split.tokens(i) == ids and split.prefix_of[i] != NO_PREFIX
    # A boundary that the tokenizer merges ("word " + "next" is " next" in the whole text) moves to the query.
    merged = split_prompts(tokenizer, ["Paris is ", ""], ["Paris is nice", "Paris is nice"])
    assert merged.tokens(0) == tokenizer("Paris is nice")["input_ids"] == merged.queries[1]
    assert merged.prefix_of[1] == NO_PREFIX


def test_cached_greedy_answers_equal_generate_on_whole_prompts(smollm2, prompts):
    model, tokenizer = smollm2
    test = prompts.filter(pl.col("split") == "test")
    settings = EvaluationSettings.defaults(batch_size=5)
    texts = test["text"].to_list()
    assert generate(model, tokenizer, test["prefix"].to_list(), texts, settings) == \
        uncached_answers(model, tokenizer, texts, settings)


def test_cached_sweep_equals_generate_under_each_deactivation(smollm2, prompts):
    model, tokenizer = smollm2
    test = prompts.filter(pl.col("split") == "test")
    settings = EvaluationSettings.defaults(batch_size=4, max_new_tokens=3)
    units = {("act", layer): list(range(0, 1536, 2)) for layer in (8, 16, 24)}
    configs = [Deactivation.constant({}), Deactivation.constant(units)]
    swept = generate_sweep(model, tokenizer, test["prefix"].to_list(), test["text"].to_list(), configs, settings,
                           configs_per_batch=2)
    texts = test["text"].to_list()
    assert swept[0] == uncached_answers(model, tokenizer, texts, settings)
    with deactivated(MlpSites(model), units):  # deactivation reaches the demonstrations too
        switched_off = uncached_answers(model, tokenizer, texts, settings)
    assert swept[1] == switched_off and swept[1] != swept[0]


@torch.no_grad()
def manual_query_responses(model, tokenizer, prefix, text):
    """Every site's mean and max over the asked fact's tokens, from the MLP's inputs in one
    plain forward of the whole prompt."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    start = len(tokenizer(prefix)["input_ids"])
    assert tokenizer(prefix)["input_ids"] == ids[0, :start].tolist()
    out = {}
    for layer, (x, _) in enumerate(mlp_inputs(model, ids)):
        mlp = model.model.layers[layer].mlp
        x = x[start:]
        gate, up = x @ mlp.gate_proj.weight.T, x @ mlp.up_proj.weight.T
        act = F.silu(gate) * up
        for site, value in zip(SITES, (gate, up, act, act @ mlp.down_proj.weight.T)):
            out[("mean", site, layer)] = value.mean(0).double().numpy()
            out[("max", site, layer)] = value.max(0).values.double().numpy()
            out[("last", site, layer)] = value[-1].double().numpy()
    return out, ids.shape[1] - start


@pytest.mark.parametrize("fused", [False, True])
def test_query_pooling_equals_manual_computation_over_the_asked_fact(smollm2, prompts, tmp_path, fused):
    model, tokenizer = smollm2
    chosen = prompts.filter(pl.col("split") == "identification").head(8)
    settings = ExtractionSettings.defaults(response_dtype="float32", batch_size=3, fused_statistics=fused,
                                           poolings=("mean", "max", "last"))
    outputs = ExtractionOutputs(tmp_path / "r.parquet", tmp_path / "s.parquet", tmp_path / "t.parquet")
    extraction = Extraction(model, tokenizer, chosen["prompt_id"].to_list(), chosen["text"].to_list(), settings,
                            chosen["prefix"].to_list())
    extraction.run(outputs)
    reader = ResponseReader([outputs.responses])
    ids = chosen["prompt_id"].to_list()
    counts = pl.read_parquet(outputs.responses, columns=["prompt_id", "n_tokens"])
    for i, (prefix, text) in enumerate(zip(chosen["prefix"], chosen["text"])):
        expected, n_query = manual_query_responses(model, tokenizer, prefix, text)
        assert counts.filter(pl.col("prompt_id") == ids[i])["n_tokens"].item() == n_query
        for (pooling, site, layer), value in expected.items():
            got = reader.read_block(pooling, site, layer, [ids[i]])[0]
            np.testing.assert_allclose(got, value, rtol=2e-3, atol=2e-4, err_msg=f"{pooling} {site} {layer} {i}")
    # The statistics count the queries' tokens only, and peak positions index the whole prompt.
    stats = pl.read_parquet(outputs.stats)
    assert stats["count"].unique().to_list() == [int(counts["n_tokens"].sum())]
    top = pl.read_parquet(outputs.top).filter((pl.col("site") == "act") & (pl.col("layer") == 3)).head(20)
    for prompt_id, position, token in top.select("prompt_id", "position", "token").iter_rows():
        text = chosen.filter(pl.col("prompt_id") == prompt_id)["text"].item()
        whole = tokenizer(text)["input_ids"]
        assert tokenizer.decode([whole[position]]) == token
        assert position >= len(tokenizer(chosen.filter(pl.col("prompt_id") == prompt_id)["prefix"].item())["input_ids"])


def test_query_span_forwards_each_prefix_once_and_every_query(smollm2, prompts, tmp_path):
    model, tokenizer = smollm2
    chosen = prompts.filter(pl.col("split") == "identification")
    settings = ExtractionSettings.defaults(sites=("act",), poolings=("mean",))
    forwarded = {}
    for span, prefixes in (("query", chosen["prefix"].to_list()), ("prompt", None)):
        out = ExtractionOutputs(tmp_path / f"{span}.parquet", tmp_path / f"{span}.s.parquet", tmp_path / f"{span}.t.parquet")
        extraction = Extraction(model, tokenizer, chosen["prompt_id"].to_list(), chosen["text"].to_list(), settings,
                                prefixes)
        extraction.run(out)
        forwarded[span] = extraction.tokens_forwarded
    assert forwarded["prompt"] == sum(len(ids) for ids in tokenizer(chosen["text"].to_list())["input_ids"])
    # Each distinct prefix once, then every query.
    split = split_prompts(tokenizer, chosen["prefix"].to_list(), chosen["text"].to_list())
    assert forwarded["query"] == sum(map(len, split.prefixes)) + sum(map(len, split.queries)) < forwarded["prompt"]
