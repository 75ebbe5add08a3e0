"""The one place that knows how an architecture exposes its MLP.

A unit is (site, layer, unit) everywhere. Sites of an MLP down(act(...)):
  gate = output of the gate projection, before the activation function (gated MLPs only)
  up   = output of the up (first) projection, before the activation function
  act  = the input of the down projection: act_fn(gate) * up, or act_fn(up) without a gate
  down = output of the down projection (a residual-stream dimension)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import NeuronmapError

SITES = ("gate", "up", "act", "down")


@dataclass(frozen=True)
class MlpAdapter:
    layers: str                 # path from the model to the list of decoder layers
    mlp: str                    # path from a layer to the module holding the projections ("" = the layer)
    up: str
    down: str
    gate: str | None = None     # None for a plain (ungated) MLP
    final_norm: str = "model.norm"  # path from the model to the norm before the LM head
    norm_offset: bool = False   # the norm's gain is stored as weight - 1 (Gemma's RMSNorm: x * (1 + weight))

    @property
    def sites(self) -> tuple[str, ...]:
        return SITES if self.gate else ("up", "act", "down")


GATED = MlpAdapter(layers="model.layers", mlp="mlp", gate="gate_proj", up="up_proj", down="down_proj")
GEMMA = replace(GATED, norm_offset=True)

ADAPTERS: dict[str, MlpAdapter] = {
    **{model_type: GATED for model_type in ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "granite",
                                            "smollm3")},
    **{model_type: GEMMA for model_type in ("gemma", "gemma2", "gemma3_text")},
    "gpt2": MlpAdapter(layers="transformer.h", mlp="mlp", up="c_fc", down="c_proj", final_norm="transformer.ln_f"),
    "gpt_neox": MlpAdapter(layers="gpt_neox.layers", mlp="mlp", up="dense_h_to_4h", down="dense_4h_to_h",
                           final_norm="gpt_neox.final_layer_norm"),
    "opt": MlpAdapter(layers="model.decoder.layers", mlp="", up="fc1", down="fc2",
                      final_norm="model.decoder.final_layer_norm"),
}


# MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)), and the
# activations hooks.gated_act knows: only these may have their forward fused.
GATED_MLP_CLASSES = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP", "Gemma3MLP",
                     "OlmoMLP", "Olmo2MLP", "GraniteMLP", "SmolLM3MLP"}
ACTIVATIONS = {"SiLUActivation": "silu", "SiLU": "silu", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh"}


def fusable_activation(mlp: torch.nn.Module) -> str | None:
    """The activation ("silu", "gelu_tanh") of a gated MLP whose forward may be fused, else None."""
    if type(mlp).__name__ not in GATED_MLP_CLASSES:
        return None
    return ACTIVATIONS.get(type(getattr(mlp, "act_fn", None)).__name__)


def adapter_for(model_type: str) -> MlpAdapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        supported = ", ".join(sorted(ADAPTERS))
        raise NeuronmapError(
            f"model: unsupported architecture {model_type!r} (supported: {supported})") from None


def _get(obj, dotted: str):
    for part in filter(None, dotted.split(".")):
        obj = getattr(obj, part)
    return obj


def _is_conv1d(module: torch.nn.Module) -> bool:
    """GPT-2's transformers.pytorch_utils.Conv1D: a linear layer whose weight is [in, out] (nx, nf)."""
    return hasattr(module, "nf") and hasattr(module, "nx")


def _features(module: torch.nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear or of GPT-2's transposed Conv1D."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        return module.nx, module.nf
    raise NeuronmapError(f"model: cannot read the width of {module.__class__.__name__}")


def linear_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features], for nn.Linear and GPT-2's transposed Conv1D."""
    if isinstance(module, torch.nn.Linear):
        return module.weight
    if _is_conv1d(module):
        return module.weight.T
    raise NeuronmapError(f"model: cannot read the weight of a {type(module).__name__}")


def final_norm_gain(model: torch.nn.Module) -> torch.Tensor:
    """The gain of the norm before the LM head (what it multiplies the normalized residual by)."""
    adapter = adapter_for(model.config.model_type)
    try:
        norm = _get(model, adapter.final_norm)
    except AttributeError:
        norm = None
    if getattr(norm, "weight", None) is None:  # absent (OPT without a final norm) or with no gain (OLMo)
        raise NeuronmapError(f"model: no final norm gain found for model type {model.config.model_type!r}")
    gain = norm.weight.detach()
    return 1 + gain if adapter.norm_offset else gain


@dataclass(frozen=True)
class SitePoint:
    """Where a site is read or written: the output of `module`, or (act) its input."""
    module: torch.nn.Module
    is_input: bool
    width: int

    def register(self, hook) -> torch.utils.hooks.RemovableHandle:
        """`hook` as a forward pre-hook (act: module, args) or forward hook (module, args, output)."""
        if self.is_input:
            return self.module.register_forward_pre_hook(hook)
        return self.module.register_forward_hook(hook)


class MlpSites:
    """The hook points of every site in every layer of a loaded model."""

    def __init__(self, model: torch.nn.Module):
        self.adapter = adapter_for(model.config.model_type)
        self.layers = list(_get(model, self.adapter.layers))

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def available(self) -> tuple[str, ...]:
        return self.adapter.sites

    def check(self, sites) -> None:
        missing = [s for s in sites if s not in self.available]
        if missing:
            raise NeuronmapError(f"sites: {', '.join(missing)} not available in this architecture "
                                 f"(available: {', '.join(self.available)})")

    def mlp(self, layer: int) -> torch.nn.Module:
        return _get(self.layers[layer], self.adapter.mlp)

    def projection(self, name: str, layer: int) -> torch.nn.Module:
        """The "gate", "up" or "down" projection module of a layer's MLP."""
        path = {"gate": self.adapter.gate, "up": self.adapter.up, "down": self.adapter.down}[name]
        if path is None:
            self.check([name])
        return _get(self.mlp(layer), path)

    def point(self, site: str, layer: int) -> SitePoint:
        if site not in self.available:
            self.check([site])
        if site in ("gate", "up"):
            module = self.projection(site, layer)
            return SitePoint(module, False, _features(module)[1])
        down = self.projection("down", layer)
        if site == "act":
            return SitePoint(down, True, _features(down)[0])
        return SitePoint(down, False, _features(down)[1])

    def width(self, site: str) -> int:
        return self.point(site, 0).width
