"""Forward hooks that read the MLP sites: pooled responses per prompt.

Hooks are installed by context managers and removed on exit, even after an error, so a
model is never left with a stray hook (the nnsight way: the intervention lives next to the
forward pass it changes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from .architectures import MlpSites

POOLINGS = ("mean", "max", "last")


def pool(x: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool [batch, tokens, units] over the tokens where mask is true (padding excluded)."""
    if pooling == "mean":
        weights = mask.to(torch.float32)
        return torch.einsum("btu,bt->bu", x.to(torch.float32), weights) / weights.sum(1, keepdim=True)
    if pooling == "max":
        return x.masked_fill(~mask[..., None], float("-inf")).amax(1).to(torch.float32)
    if pooling == "last":
        # Works for left and right padding: the last position whose mask is set.
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask, positions, -1).amax(1)
        return x[torch.arange(x.shape[0], device=x.device), last].to(torch.float32)
    raise ValueError(f"pooling: unknown {pooling!r} (choose from {', '.join(POOLINGS)})")


class PooledResponses:
    """Collects, for one forward pass, every selected unit's pooled response per prompt."""

    def __init__(self, sites: MlpSites, site_names: Iterable[str], pooling: str):
        self.sites = sites
        self.site_names = tuple(site_names)
        self.pooling = pooling
        self.mask: torch.Tensor | None = None
        self.pooled: dict[tuple[str, int], torch.Tensor] = {}

    def _hook(self, site: str, layer: int, is_input: bool):
        def read(module, args, output=None):
            x = args[0] if is_input else output
            self.pooled[(site, layer)] = pool(x, self.mask, self.pooling)
        return read

    @contextlib.contextmanager
    def installed(self):
        handles = []
        try:
            for site in self.site_names:
                for layer in range(self.sites.n_layers):
                    point = self.sites.point(site, layer)
                    hook = self._hook(site, layer, point.is_input)
                    if point.is_input:
                        handles.append(point.module.register_forward_pre_hook(hook))
                    else:
                        handles.append(point.module.register_forward_hook(hook))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def start_batch(self, attention_mask: torch.Tensor) -> None:
        self.mask = attention_mask.bool()
        self.pooled = {}

    def to_host(self) -> dict[str, torch.Tensor]:
        """One host copy per site: [layers, batch, units] float32 tensors."""
        return {site: torch.stack([self.pooled[(site, layer)] for layer in range(self.sites.n_layers)]).cpu()
                for site in self.site_names}
