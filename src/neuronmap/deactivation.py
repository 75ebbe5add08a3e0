"""Forward hooks that deactivate units: their outputs set to a value at every position.

Two forms, both installed by context managers and removed on exit, even after an error:

- `deactivated`: one configuration for the whole batch.
- `RowDeactivation`: one configuration per row of the batch (a per-row unit mask), so that
  several ablation configurations share one forward pass and one model load. Rows keep their
  configuration for every token, generated ones included, because greedy generation with a KV
  cache never reorders the rows of a batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .architectures import MlpSites

Point = tuple[str, int]  # (site, layer)


@dataclass(frozen=True)
class Deactivation:
    """One ablation configuration: per (site, layer), sorted unit indices and the value each
    unit is set to. The empty configuration changes nothing (the baseline)."""
    units: Mapping[Point, np.ndarray]
    values: Mapping[Point, np.ndarray]

    @classmethod
    def constant(cls, units: Mapping[Point, Iterable[int]], value: float = 0.0) -> Deactivation:
        chosen = {point: np.unique(np.asarray(list(ids), dtype=np.int64)) for point, ids in units.items()}
        chosen = {point: ids for point, ids in chosen.items() if ids.size}
        return cls(chosen, {point: np.full(ids.size, value, dtype=np.float32) for point, ids in chosen.items()})

    @classmethod
    def per_unit(cls, units: Mapping[Point, Iterable[int]], value_of: Mapping[Point, np.ndarray]) -> Deactivation:
        """Each unit set to its own value, looked up as value_of[(site, layer)][unit]."""
        constant = cls.constant(units)
        return cls(constant.units, {point: np.asarray(value_of[point], dtype=np.float32)[ids]
                                    for point, ids in constant.units.items()})

    def size(self) -> int:
        return sum(ids.size for ids in self.units.values())


def _check_range(point: Point, ids: np.ndarray, width: int) -> None:
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= width):
        raise ValueError(f"unit index out of range for {point[0]} layer {point[1]} (width {width})")


def _register(point, hook):
    if point.is_input:
        return point.module.register_forward_pre_hook(hook)
    return point.module.register_forward_hook(hook)


@contextlib.contextmanager
def deactivated(sites: MlpSites, units: Mapping[Point, Iterable[int]], value: float = 0.0):
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
            _check_range((site, layer), index.numpy(), point.width)
            handles.append(_register(point, make(index, point.is_input)))
        yield
    finally:
        for handle in handles:
            handle.remove()


class _PointMasks:
    """The configurations' masks at one (site, layer), restricted to the columns any of them
    touches, so a hook reads and writes only those columns."""

    def __init__(self, configs: Sequence[Deactivation], point: Point, device: torch.device):
        columns = np.unique(np.concatenate([c.units.get(point, np.empty(0, np.int64)) for c in configs]))
        mask = np.zeros((len(configs), columns.size), dtype=bool)
        fill = np.zeros((len(configs), columns.size), dtype=np.float32)
        for i, config in enumerate(configs):
            ids = config.units.get(point)
            if ids is not None:
                where = np.searchsorted(columns, ids)
                mask[i, where] = True
                fill[i, where] = config.values[point]
        self.columns = torch.from_numpy(columns).to(device)
        self.mask = torch.from_numpy(mask).to(device)
        self.fill = torch.from_numpy(fill).to(device)


class RowDeactivation:
    """Per-row deactivation: row i of every batch runs under configuration rows[i].

    Usage:
        masks = RowDeactivation(sites, configs)
        with masks.installed():
            masks.set_rows([0, 0, 1, 1])   # before each forward pass or generate call
            model.generate(...)
    """

    def __init__(self, sites: MlpSites, configs: Sequence[Deactivation], device: torch.device | str = "cpu"):
        self.sites = sites
        self.configs = list(configs)
        self.device = torch.device(device)
        points = sorted({point for config in self.configs for point in config.units})
        self.masks: dict[Point, _PointMasks] = {}
        for point in points:
            width = sites.point(*point).width
            for config in self.configs:
                _check_range(point, config.units.get(point, np.empty(0, np.int64)), width)
            self.masks[point] = _PointMasks(self.configs, point, self.device)
        self.rows: torch.Tensor | None = None

    def set_rows(self, rows: Sequence[int] | torch.Tensor) -> None:
        rows = torch.as_tensor(rows, dtype=torch.long)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= len(self.configs)):
            raise ValueError(f"set_rows: configuration index out of range (have {len(self.configs)})")
        self.rows = rows.to(self.device)

    def _hook(self, point: Point, is_input: bool):
        masks = self.masks[point]

        def write(module, args, output=None):
            x = args[0] if is_input else output
            rows = self.rows
            if rows is None or rows.shape[0] != x.shape[0]:
                raise RuntimeError(f"RowDeactivation: batch of {x.shape[0]} rows but "
                                   f"{None if rows is None else rows.shape[0]} row configurations set")
            shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (masks.columns.numel(),)
            mask = masks.mask[rows].view(shape)
            fill = masks.fill[rows].to(x.dtype).view(shape)
            touched = x.index_select(-1, masks.columns)
            # In place: the tensor is this layer's own temporary; untouched rows are copied back as is.
            x.index_copy_(-1, masks.columns, torch.where(mask, fill, touched))
            return None
        return write

    @contextlib.contextmanager
    def installed(self):
        handles = []
        try:
            for point in self.masks:
                site_point = self.sites.point(*point)
                handles.append(_register(site_point, self._hook(point, site_point.is_input)))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.rows = None
