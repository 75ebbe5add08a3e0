"""The one place that knows how an architecture exposes its MLP.

A unit is (site, layer, unit) everywhere. Sites of a gated MLP,
down(act_fn(gate(x)) * up(x)):
  gate = output of the gate projection (before the activation function)
  up   = output of the up projection
  act  = act_fn(gate) * up, the input of the down projection
  down = output of the down projection (a residual-stream dimension)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import NeuronmapError

SITES = ("gate", "up", "act", "down")


@dataclass(frozen=True)
class MlpAdapter:
    layers: str = "model.layers"
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


GATED_MLP = MlpAdapter()

ADAPTERS: dict[str, MlpAdapter] = {
    model_type: GATED_MLP
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                       "olmo", "olmo2", "granite", "smollm3")
}


def adapter_for(model_type: str) -> MlpAdapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        supported = ", ".join(sorted(ADAPTERS))
        raise NeuronmapError(
            f"model: unsupported architecture {model_type!r} (supported: {supported})") from None


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class SitePoint:
    """Where a site is read or written: the output of `module`, or (for act) its input."""
    module: torch.nn.Module
    is_input: bool
    width: int


class MlpSites:
    """The hook points of every site in every layer of a loaded model."""

    def __init__(self, model: torch.nn.Module):
        self.adapter = adapter_for(model.config.model_type)
        self.layers = list(_get(model, self.adapter.layers))

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def point(self, site: str, layer: int) -> SitePoint:
        mlp = _get(self.layers[layer], self.adapter.mlp)
        gate, up, down = (_get(mlp, name) for name in (self.adapter.gate, self.adapter.up, self.adapter.down))
        if site == "gate":
            return SitePoint(gate, False, gate.out_features)
        if site == "up":
            return SitePoint(up, False, up.out_features)
        if site == "act":
            return SitePoint(down, True, down.in_features)
        if site == "down":
            return SitePoint(down, False, down.out_features)
        raise NeuronmapError(f"sites: unknown site {site!r} (choose from {', '.join(SITES)})")

    def width(self, site: str) -> int:
        return self.point(site, 0).width
