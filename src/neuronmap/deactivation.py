"""Forward hooks that deactivate units: their outputs set to a value at every position.

Installed by a context manager and removed on exit, even after an error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

import torch

from .architectures import MlpSites


@contextlib.contextmanager
def deactivated(sites: MlpSites, units: Mapping[tuple[str, int], Iterable[int]], value: float = 0.0):
    """Set the given units' outputs to `value` at every position (prompt and generated tokens)."""
    handles = []

    def make(index: torch.Tensor, is_input: bool):
        def write(module, args, output=None):
            x = args[0] if is_input else output
            x[..., index.to(x.device)] = value  # in place: the tensor is this layer's own temporary
            return None
        return write

    try:
        for (site, layer), unit_ids in units.items():
            index = torch.as_tensor(sorted(set(int(u) for u in unit_ids)), dtype=torch.long)
            if index.numel() == 0:
                continue
            point = sites.point(site, layer)
            if int(index.min()) < 0 or int(index.max()) >= point.width:
                raise ValueError(f"unit index out of range for {site} layer {layer} (width {point.width})")
            hook = make(index, point.is_input)
            if point.is_input:
                handles.append(point.module.register_forward_pre_hook(hook))
            else:
                handles.append(point.module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
