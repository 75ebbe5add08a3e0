"""Converting the configured model once (GGUF), and loading it on a device (source.py resolves it).

`prepare_model` writes a model directory with a manifest (neuronmap-model.json). A GGUF model
(the embedded default included) is dequantized once into safetensors inside that directory; a
Hugging Face directory or cached hub id is referenced in place, not copied.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import NeuronmapError
from ..io.parquet import UMASK
from . import dispatch
from .settings import ModelSettings
from .shape import shape_from_config
from .source import MANIFEST, check_model_files, check_remote_code, read_manifest, resolve_source, weights_dir

log = logging.getLogger(__name__)


@contextmanager
def gguf_read_once():
    """transformers reads a GGUF file three times (its config, the tokenizer, the weights), each
    read parsing every string of the vocabulary field by field (about 7 s for SmolLM2's 49,152
    tokens), and rebuilds gguf's tensor-name map for each of the model's 397 modules (about 8 s):
    while dequantizing, one reader per file and one name map per architecture serve them all.
    transformers imports both from the gguf module when it calls them, so the patch reaches it."""
    import gguf
    originals = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.cache(originals[0])
    gguf.get_tensor_name_map = functools.cache(originals[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = originals


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    with gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # The weights are already dequantized; save_pretrained refuses while the GGUF config is attached.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    return model, tokenizer


def prepare_model(spec: str, out_dir: str | Path, trust_remote_code: bool = False) -> dict:
    """Write the model directory: converted weights for GGUF, a manifest in every case."""
    from transformers import AutoConfig

    kind, path = resolve_source(spec)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.*"):  # left by an attempt killed by SIGKILL
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o777 & ~UMASK)  # mkdtemp makes it private; the model dir is shared like any result
    try:
        if kind == "gguf":
            log.info("dequantizing %s once into safetensors", path)
            model, tokenizer = _load_gguf(path)
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            config, weights = model.config, "."
        else:
            check_remote_code(path, trust_remote_code)
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
            weights = str(path)
        shape = shape_from_config(config)  # an unsupported architecture fails now, not three jobs later
        if kind == "hf":
            check_model_files(path)  # and so do missing weights or tokenizer
        manifest = {"source": spec, "kind": kind, "source_path": str(path), "weights": weights,
                    "model_type": config.model_type,
                    "architectures": list(getattr(config, "architectures", None) or []),
                    "n_layers": config.num_hidden_layers, "shape": shape.as_dict()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NeuronmapError(f"device: {name} requested but CUDA is not available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise NeuronmapError("device: mps requested but not available")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    """The prepared model's tokenizer alone (for commands that read tokens, not activations)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(weights_dir(model_dir), trust_remote_code=trust_remote_code,
                                         local_files_only=True)


def load_model(model_dir: str | Path, device: str = "auto", dtype: str = "auto",
               trust_remote_code: bool = False, device_map: str = "single", max_memory: dict | None = None,
               offload: str = "none"):
    """Load (model, tokenizer) from a prepared model directory, in eval mode. device_map single:
    on `device`. auto or balanced: decoder layers placed by accelerate over the GPUs (a CUDA
    `device`) or the CPU, within `max_memory`, the rest offloaded as `offload` allows; each
    weight goes from the safetensors files straight to its device (see dispatch.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = read_manifest(model_dir)
    weights = weights_dir(model_dir)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    tokenizer = AutoTokenizer.from_pretrained(weights, trust_remote_code=trust_remote_code, local_files_only=True)
    options = dict(dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code, local_files_only=True)
    if device_map == "single":
        model = AutoModelForCausalLM.from_pretrained(weights, **options)
        model.to(torch_device)
        placed = str(torch_device)
    else:
        placement = layer_placement(weights, torch_device, torch_dtype, trust_remote_code, device_map,
                                    max_memory or {}, offload)
        folder = dispatch.offload_folder() if "disk" in placement.values() else None
        model = AutoModelForCausalLM.from_pretrained(weights, device_map=placement, offload_folder=folder, **options)
        placed = ", ".join(f"{device}: {count} modules" for device, count in
                           sorted(Counter(str(d) for d in placement.values()).items()))
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    log.info("loaded %s (%s) on %s as %s", manifest["source"], manifest["model_type"], placed, torch_dtype)
    return model, tokenizer


def layer_placement(weights: Path, device: torch.device, dtype: torch.dtype, trust_remote_code: bool,
                    device_map: str, max_memory: dict, offload: str) -> dict:
    """The device of every module of the model in `weights`, from its config alone."""
    from accelerate.utils import get_max_memory
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(weights, trust_remote_code=trust_remote_code, local_files_only=True)
    budget = dispatch.memory_budget(max_memory, offload, device, get_max_memory())
    placement = dispatch.place_layers(dispatch.meta_model(config, trust_remote_code), budget,
                                      device_map == "balanced", dtype)
    dispatch.check_offload(placement, offload, device.type == "cuda")
    return placement


def load_for_job(model_dir: str | Path, settings: ModelSettings, threads: int = 0):
    """A command's model: torch held to the job's CPU threads (0 = torch's default), then loaded."""
    if threads:
        torch.set_num_threads(threads)
    return load_model(model_dir, settings.device, settings.dtype, settings.trust_remote_code, settings.device_map,
                      settings.max_memory, settings.offload)
