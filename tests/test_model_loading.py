import json

import pytest
import torch

from neuronmap.errors import NeuronmapError
from neuronmap.model.loading import MANIFEST, load_model, pick_dtype, prepare_model


def test_gguf_is_converted_once_into_safetensors(smollm2_dir):
    manifest = json.loads((smollm2_dir / MANIFEST).read_text())
    assert manifest["kind"] == "gguf" and manifest["weights"] == "." and manifest["model_type"] == "llama"
    assert (smollm2_dir / "model.safetensors").is_file()
    assert not list(smollm2_dir.glob("*.bin"))  # never pickles


def test_local_hugging_face_directory_is_referenced_not_copied(smollm2_dir, tmp_path):
    manifest = prepare_model(str(smollm2_dir), tmp_path / "model")
    assert manifest["kind"] == "hf" and manifest["weights"] == str(smollm2_dir.resolve())
    assert not (tmp_path / "model" / "model.safetensors").exists()
    model, tokenizer = load_model(tmp_path / "model", device="cpu", dtype="float32")
    assert model.config.num_hidden_layers == 30 and tokenizer.pad_token_id is not None


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import BertConfig
    BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2).save_pretrained(tmp_path / "bert")
    with pytest.raises(NeuronmapError, match="unsupported architecture 'bert'"):
        prepare_model(str(tmp_path / "bert"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec, message", [
    ("/nonexistent/model", "does not exist"),
    ("missing.gguf", "GGUF file missing.gguf not found"),
    ("nobody/not-a-cached-model", "not in the local Hugging Face cache"),
    ("builtin:gpt-9", "unknown builtin model"),
])
def test_missing_model_is_a_clear_error(tmp_path, spec, message):
    with pytest.raises(NeuronmapError, match=message):
        prepare_model(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_auto_dtype_is_float32_on_cpu():
    assert pick_dtype("auto", torch.device("cpu")) is torch.float32
    assert pick_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16


def hf_dir(path, files, **config):
    from transformers import LlamaConfig
    LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                vocab_size=50, **config).save_pretrained(path)
    for name in files:
        (path / name).write_bytes(b"")
    return path


@pytest.mark.parametrize("files, config, message", [
    (("pytorch_model.bin", "tokenizer.json"), {}, r"only pickle weights \(pytorch_model.bin\)"),
    (("tokenizer.json",), {}, r"has no weights \(no \*.safetensors file\)"),
    (("model.safetensors",), {}, "has no tokenizer"),
    (("model.safetensors", "tokenizer.json"), {"auto_map": {"AutoModelForCausalLM": "m.M"}, "model_type": "mine"},
     "asks for remote code .* trust_remote_code is false"),
])
def test_model_directory_is_checked_when_prepared(tmp_path, files, config, message):
    model = hf_dir(tmp_path / "model", files)
    if config:  # a config class of its own would not save an unknown model_type: edit the JSON
        data = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**data, **config}))
    with pytest.raises(NeuronmapError, match=message):
        prepare_model(str(model), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_remote_code_map_on_a_supported_architecture_is_accepted(tmp_path):
    """transformers runs its own Llama code whatever auto_map says: nothing to refuse."""
    model = hf_dir(tmp_path / "model", ("model.safetensors", "tokenizer.json"),
                   auto_map={"AutoModelForCausalLM": "m.M"})
    assert prepare_model(str(model), tmp_path / "out")["model_type"] == "llama"
