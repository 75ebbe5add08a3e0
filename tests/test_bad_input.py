"""Bad input: one clear message naming the key or file, a non-zero exit, nothing written.

Every problem is caught while Snakemake parses the workflow (neuronmap.workflow.checks, called by
rules/common.smk), before any job starts, so the run's folder is never created. Every case
uses the session's prepared model (a local directory), so nothing is converted, and no case
needs a workflow run: they belong to `make test-fast`.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_snakemake


def run_workflow(config: dict, tmp_path: Path, *targets: str) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return run_snakemake(path, *targets, timeout=900)


@pytest.fixture(scope="module")
def base_config(smollm2_dir, e2e_config) -> dict:
    config = yaml.safe_load(e2e_config.read_text())
    config["model"] = str(smollm2_dir)
    return config


@pytest.fixture
def run_name(base_config, request):
    name = f"{base_config['run']}-bad-{request.node.callspec.id if hasattr(request.node, 'callspec') else 'top-k'}"
    shutil.rmtree(REPO / "results" / name, ignore_errors=True)
    yield name
    shutil.rmtree(REPO / "results" / name, ignore_errors=True)


def relation_file(directory: Path, name: str, templates, samples) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps({"prompt_templates": templates, "samples": samples}))
    return path


def custom_relation(tmp_path, templates, samples) -> dict:
    directory = tmp_path / "relations"
    relation_file(directory, "broken", templates, samples)
    shutil.copy(REPO / "data" / "relations" / "factual" / "country_capital_city.json", directory)
    return {"relations": {"dir": str(directory), "names": ["broken", "country_capital_city"]}}


def gpt2_model(tmp_path) -> dict:
    """A GPT-2 config without weights: its shape is all the checks read."""
    model = tmp_path / "gpt2-like"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2,
                                                   "vocab_size": 100}))
    return {"model": str(model), "sites": ["up", "act", "down"], "decode": {"sites": ["gate"]}}


def language_without_relations(tmp_path) -> dict:
    folder = tmp_path / "languages" / "xx"
    relation_file(folder, "unrelated_relation", ["{} is"], FACTS)
    return {"languages": {"dir": str(tmp_path / "languages"), "evaluate": ["xx"]}}


def unsupported_model(tmp_path) -> dict:
    model = tmp_path / "bert-like"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    return {"model": str(model)}


def llama_dir(tmp_path, files=("model.safetensors", "tokenizer.json"), **config) -> dict:
    """A Llama config with the named files (empty: the checks read names, not contents)."""
    model = tmp_path / "llama-like"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32,
                                                   "intermediate_size": 64, "num_attention_heads": 4,
                                                   "vocab_size": 100, **config}))
    for name in files:
        (model / name).write_bytes(b"")
    return {"model": str(model)}


def corpus_with_an_empty_label_file(tmp_path) -> dict:
    folder = tmp_path / "corpus"
    folder.mkdir()
    shutil.copy(REPO / "tests" / "data" / "corpus" / "en.jsonl", folder)
    (folder / "de.jsonl").write_bytes(b"")
    return {"corpus": {"path": str(folder)}}


def txt_corpus_with_a_label_column(tmp_path) -> dict:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for label in ("de", "en"):
        (folder / f"{label}.txt").write_text(f"A document labelled {label}.")
    return {"corpus": {"path": str(folder), "label_column": "lang"}}


FACTS = [{"subject": f"subject {i}", "object": f"object {i}"} for i in range(40)]

# (case, change to the e2e config, what the one message must say)
PARSE_TIME = [
    ("unknown-key", lambda tmp: {"top_kk": [10]}, "config: Additional properties are not allowed ('top_kk' was unexpected)"),
    ("wrong-type", lambda tmp: {"top_k": "ten"}, "config: top_k: 'ten' is not of type 'array'"),
    ("missing-relation-file", lambda tmp: {"relations": {"names": ["no_such_relation", "verb_past_tense"]}},
     "relations.names: no file no_such_relation.json under data/relations"),
    ("template-without-braces", lambda tmp: custom_relation(tmp, ["The capital of France is"], FACTS),
     "prompt_templates[0] 'The capital of France is' must contain exactly one {} for the subject"),
    ("relation-without-samples", lambda tmp: custom_relation(tmp, ["The capital of {} is"], []),
     "samples is empty, the relation has no facts"),
    ("more-shards-than-prompts", lambda tmp: {"shards": 500}, "shards 500"),
    ("missing-model-path", lambda tmp: {"model": str(tmp / "no" / "such" / "model")}, "does not exist"),
    ("unsupported-architecture", unsupported_model, "model: unsupported architecture 'bert'"),
    ("one-relation", lambda tmp: {"relations": {"names": ["country_capital_city"]}},
     "relations.names: ['country_capital_city'] has one relation, but expertise needs at least two"),
    ("pooling-not-stored", lambda tmp: {"pooling": "max", "poolings": ["mean"]},
     "pooling: 'max' is not among poolings ['mean']"),
    ("decode-site-not-in-architecture", gpt2_model, "decode.sites: gate not available in gpt2"),
    ("language-without-folder", lambda tmp: {"languages": {"evaluate": ["xx"]}},
     "languages.evaluate: 'xx' has no folder"),
    ("language-without-relations", language_without_relations,
     "languages.evaluate: 'xx' translates none of relations.names"),
    ("pickle-weights-only", lambda tmp: llama_dir(tmp, files=("pytorch_model.bin", "tokenizer.json")),
     "has only pickle weights (pytorch_model.bin), and neuronmap loads safetensors only"),
    ("no-tokenizer", lambda tmp: llama_dir(tmp, files=("model.safetensors",)), "has no tokenizer"),
    ("remote-code-required", lambda tmp: llama_dir(tmp, model_type="my_llama",
                                                   auto_map={"AutoModelForCausalLM": "modeling.MyLlama"}),
     "asks for remote code (auto_map: AutoModelForCausalLM) to run model type 'my_llama', and trust_remote_code "
     "is false"),
    # Llama-2-7B's shape in bfloat16 needs 13.3 GiB on one GPU for an extraction job.
    ("model-larger-than-the-gpu", lambda tmp: {**llama_dir(tmp, hidden_size=4096, intermediate_size=11008,
                                                           num_hidden_layers=32, num_attention_heads=32,
                                                           vocab_size=32000),
                                               "device": "cuda", "plan": {"gpu_memory": 10}},
     "plan.gpu_memory: the extract job needs 13.3 GiB on GPU 0"),
    # A label file without text would drop its label from the comparison in silence.
    ("empty-label-file", corpus_with_an_empty_label_file,
     "de.jsonl: empty, so the label 'de' has no documents and would drop out of the labels compared"),
    # A folder's labels are its file names (and a .txt file has no columns): the key would do nothing.
    ("label-column-that-cannot-apply", txt_corpus_with_a_label_column,
     "corpus.label_column 'lang' cannot apply to the corpus folder"),
    # The down site of SmolLM2-135M has 30 layers x 576 units = 17280 units.
    ("top-k-over-units", lambda tmp: {"sites": ["down"], "top_k": [20000]},
     "top_k: 20000 is more than the 17280 units of sites ['down'] in llama (30 layers)"),
]


def merged(config: dict, change: dict) -> dict:
    out = dict(config)
    for key, value in change.items():
        out[key] = {**config.get(key, {}), **value} if isinstance(value, dict) and key in config else value
    return out


@pytest.mark.parametrize("case, change, message", PARSE_TIME, ids=[case for case, _, _ in PARSE_TIME])
def test_bad_input_stops_before_any_job(base_config, run_name, tmp_path, case, change, message):
    config = merged({**base_config, "run": run_name}, change(tmp_path))
    result = run_workflow(config, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in output, output[-3000:]
    assert output.count(message) == 1 and "Traceback" not in output, output[-3000:]
    assert "rule " not in output  # no job was started
    assert not (REPO / "results" / run_name).exists()
