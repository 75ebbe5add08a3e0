"""A model dispatched by accelerate (device_map auto, a max_memory that sends part of it to disk
offload) gives what the same model loaded whole gives: pooled responses, statistics, ablation
answers, perplexity and decoded tokens, for a gated (Llama), a GPT-2 and a NeoX MLP.

On the CPU every dispatched layer computes on the CPU, so this checks the accelerate paths
(hooks around the MLPs, weights on the meta device between forward passes, the fused gated-MLP
statistics inside accelerate's wrapper); several GPUs are exercised by bench/gpu.py.
"""

import polars as pl
import pytest
import torch

from neuronmap.ablate.evaluation import generate_sweep
from neuronmap.ablate.perplexity import mean_nll
from neuronmap.ablate.settings import EvaluationSettings
from neuronmap.errors import NeuronmapError
from neuronmap.extract.engine import Extraction, ExtractionOutputs
from neuronmap.extract.settings import ExtractionSettings
from neuronmap.io.parquet import read_table
from neuronmap.model.architectures import MlpSites
from neuronmap.model.deactivation import Deactivation
from neuronmap.model.dispatch import input_device, is_dispatched
from neuronmap.model.hooks import SiteRecorder
from neuronmap.model.loading import load_model, prepare_model
from neuronmap.stats.decode import decode_neurons

TEXTS = ["The capital of France is", "go went", "Hello there, general", "x", "a b c d e f g h i j",
         "Orion, the hunter, is up"]
IDS = [f"p{i}" for i in range(len(TEXTS))]
# Every other prompt starts with shared demonstrations: the cached-prefix path runs on the dispatched model too.
PREFIXES = ["go went\nsee saw\n" if i % 2 else "" for i in range(len(TEXTS))]
PROMPTS = [prefix + text for prefix, text in zip(PREFIXES, TEXTS)]


def char_tokenizer(path):
    """A character-level tokenizer with a BOS token, saved as tokenizer.json (no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)


def tiny_config(family):
    import transformers as tf
    common = dict(vocab_size=128, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=False, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=64, **common)
    return tf.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                            **common)


@pytest.fixture(scope="module", params=["llama", "gpt2", "gpt_neox"])
def prepared(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(request.param))
    for parameter in model.parameters():  # random biases and gains too, so no value is an accident
        torch.nn.init.normal_(parameter, std=0.3)
    source = tmp_path_factory.mktemp(request.param) / "source"
    model.save_pretrained(source)
    char_tokenizer(source)
    out = source.parent / "model"
    prepare_model(str(source), out)
    return out


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.fixture(scope="module")
def models(prepared):
    whole = load_model(prepared, "cpu", "float32")
    # Half the weights' bytes for the CPU: the rest of the layers go to disk offload.
    dispatched = load_model(prepared, "cpu", "float32", device_map="auto",
                            max_memory={"cpu": weight_bytes(whole[0]) // 2}, offload="disk")
    return whole, dispatched


def test_part_of_the_model_is_offloaded_to_disk(models):
    (_, _), (model, _) = models
    placed = set(model.hf_device_map.values())
    assert placed == {"cpu", "disk"} and is_dispatched(model)
    assert any(p.device.type == "meta" for p in model.parameters())  # offloaded weights are not in memory
    assert input_device(model) == torch.device("cpu")
    # Decoder layers are never split: every module of a layer has its layer's device.
    layers = MlpSites(model).adapter.layers
    assert all(name == layers or name.count(".") == layers.count(".") + 1
               for name in model.hf_device_map if name.startswith(layers))


def extract(model, tokenizer, tmp_path, name, fused):
    settings = ExtractionSettings.defaults(sites=MlpSites(model).available, batch_size=3, batch_tokens=60, top_n=2,
                                           active_threshold=0.1, fused_statistics=fused, response_dtype="float32")
    outputs = ExtractionOutputs(*(tmp_path / f"{name}.{kind}.parquet" for kind in ("responses", "stats", "top")))
    Extraction(model, tokenizer, IDS, PROMPTS, settings, PREFIXES).run(outputs)
    return [read_table(path) for path in (outputs.responses, outputs.stats, outputs.top)]


def assert_frames_close(a: pl.DataFrame, b: pl.DataFrame):
    assert a.columns == b.columns and a.height == b.height
    for column in a.columns:
        if a[column].dtype.is_float():
            assert torch.allclose(torch.tensor(a[column].to_numpy()), torch.tensor(b[column].to_numpy()),
                                  rtol=1e-5, atol=1e-5, equal_nan=True), column
        else:
            assert a[column].to_list() == b[column].to_list(), column


@pytest.mark.parametrize("fused", [False, True])
def test_responses_and_statistics_are_those_of_the_whole_model(models, tmp_path, fused):
    (model, tokenizer), (dispatched, _) = models
    if fused and "gate" in MlpSites(model).available:  # the fused forward goes inside accelerate's wrapper
        recorder = SiteRecorder(MlpSites(dispatched), ("gate", "up", "act"), ("mean",), 0.0, fused=True)
        assert recorder._fusable_mlps() is not None
    for whole, split in zip(extract(model, tokenizer, tmp_path, "whole", fused),
                            extract(dispatched, tokenizer, tmp_path, "dispatched", fused)):
        assert_frames_close(whole, split)


def configs(model):
    sites = MlpSites(model)
    act = "act"
    return [Deactivation.constant({}), Deactivation.constant({(act, 0): range(10), (act, 2): range(20, 40)}),
            Deactivation.constant({("up", 1): [0, 5, 7], ("down", 3): range(16)}, value=0.5),
            Deactivation.constant({(act, layer): range(0, sites.width(act), 2) for layer in range(sites.n_layers)})]


def test_ablation_answers_and_perplexity_are_those_of_the_whole_model(models):
    (model, tokenizer), (dispatched, _) = models
    settings = EvaluationSettings.defaults(max_new_tokens=4, batch_size=4)
    expected = generate_sweep(model, tokenizer, PREFIXES, PROMPTS, configs(model), settings, configs_per_batch=3)
    assert generate_sweep(dispatched, tokenizer, PREFIXES, PROMPTS, configs(model), settings,
                          configs_per_batch=3) == expected
    assert len({tuple(answers) for answers in expected}) > 1  # the deactivations change answers
    ids = tokenizer(" ".join(TEXTS), return_tensors="pt")["input_ids"][:, :60]  # within n_positions
    assert mean_nll(dispatched, ids, configs(model)) == pytest.approx(mean_nll(model, ids, configs(model)), rel=1e-5)


def test_decoded_tokens_are_those_of_the_whole_model(models):
    (model, tokenizer), (dispatched, _) = models
    options = dict(site_names=("up", "gate", "act"), norm_variants=(False, True), top_n=5, search="float32")
    whole = pl.from_arrow(decode_neurons(model, tokenizer, **options))
    split = pl.from_arrow(decode_neurons(dispatched, tokenizer, **options))
    assert whole.drop("scores").equals(split.drop("scores"))
    assert torch.allclose(torch.tensor(whole["scores"].to_list()), torch.tensor(split["scores"].to_list()), atol=1e-5)
    assert all(p.device.type == "meta" for p in MlpSites(dispatched).layers[-1].parameters())  # dropped again


def test_a_model_that_does_not_fit_without_offload_is_refused(prepared):
    with pytest.raises(NeuronmapError, match="max_memory: the model does not fit .* offload: none .* set offload: disk"):
        load_model(prepared, "cpu", "float32", device_map="auto", max_memory={"cpu": 1000}, offload="none")
