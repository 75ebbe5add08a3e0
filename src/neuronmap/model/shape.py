"""A model's shape — its architecture, layers and the width of each site, and for the plan its
heads, vocabulary and parameter counts — without its weights: what the checks before a run need
(top_k against the number of units, sites the architecture has) and what the plan estimates from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import NeuronmapError
from .source import MANIFEST, resolve_source


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    n_layers: int
    widths: dict[str, int]  # site -> units per layer, for the sites the architecture has
    # What the plan's estimates read besides: known where the model was instantiated (shape_of),
    # None where the shape was read back from a manifest or a GGUF header.
    heads: int | None = None
    kv_width: int | None = None  # key/value heads x head dimension
    vocab: int | None = None
    parameters: int | None = None
    layer_parameters: int | None = None  # of the decoder layers (what every token's forward multiplies)

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.widths)

    @property
    def hidden(self) -> int:
        return self.widths["down"]

    @property
    def intermediate(self) -> int:
        return self.widths["act"]

    def units(self, sites) -> int:
        return self.n_layers * sum(self.widths[site] for site in sites if site in self.widths)

    def as_dict(self) -> dict:
        """What the prepared model's manifest records of it (model_shape reads it back)."""
        return {"model_type": self.model_type, "n_layers": self.n_layers, "widths": self.widths}


def shape_of(model) -> ModelShape:
    """The shape of a model object (loaded, or instantiated on the meta device)."""
    from .architectures import MlpSites
    sites = MlpSites(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (sites.width("down") // heads if heads else None)
    return ModelShape(model.config.model_type, sites.n_layers, {site: sites.width(site) for site in sites.available},
                      heads=heads, kv_width=kv_heads * head_dim if heads else None,
                      vocab=getattr(config, "vocab_size", None),
                      parameters=sum(p.numel() for p in model.parameters()),
                      layer_parameters=sum(p.numel() for layer in sites.layers for p in layer.parameters()))


def shape_from_config(config) -> ModelShape:
    """Instantiated on the meta device: no weights read, no memory used."""
    import torch
    from transformers import AutoModelForCausalLM

    from .architectures import adapter_for
    adapter_for(config.model_type)  # an unsupported architecture fails here, by name
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return shape_of(model)


def _gguf_shape(path: Path) -> ModelShape:
    # The header's metadata names every width; reading it maps the file, it loads no tensor.
    from gguf import GGUFReader

    from .architectures import adapter_for
    fields = GGUFReader(path).fields

    def value(key: str):
        if key not in fields:
            raise NeuronmapError(f"model: {path} has no {key} in its GGUF metadata")
        part = fields[key].parts[-1]
        return bytes(part).decode() if key == "general.architecture" else int(part[0])

    arch = value("general.architecture")
    adapter = adapter_for(arch)
    inner, hidden = value(f"{arch}.feed_forward_length"), value(f"{arch}.embedding_length")
    widths = {site: hidden if site == "down" else inner for site in adapter.sites}
    return ModelShape(arch, value(f"{arch}.block_count"), widths)


def model_shape(spec: str, trust_remote_code: bool, prepared: str | Path | None = None) -> ModelShape:
    """The shape of the configured model: from the run's prepared model directory when it holds
    this model (fast), else from the GGUF header or the Hugging Face config."""
    if prepared is not None:
        manifest = Path(prepared) / MANIFEST
        if manifest.is_file():
            known = json.loads(manifest.read_text())
            if known.get("source") == spec and "shape" in known:
                return ModelShape(**known["shape"])
    kind, path = resolve_source(spec)
    if kind == "gguf":
        return _gguf_shape(path)
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except ValueError as exc:  # transformers' way of saying the config needs remote code
        raise NeuronmapError(f"model: {path}: {exc}") from None
    return shape_from_config(config)
