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
UnitSet = dict[Point, list[int]]  # units chosen to deactivate: sorted unit indices per (site, layer)


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


def random_units(chosen: UnitSet, widths: Mapping[str, int], rng: np.random.Generator) -> UnitSet:
    """The matched random control of `chosen` (a relation's top-k units, a label's selection): as
    many random units in each (site, layer) as it has there, none of them in it."""
    units: UnitSet = {}
    for (site, layer), ids in sorted(chosen.items()):
        candidates = np.setdiff1d(np.arange(widths[site]), ids)
        count = min(len(ids), len(candidates))
        units[(site, layer)] = sorted(rng.choice(candidates, count, replace=False).tolist())
    return units


def _check_range(point: Point, ids: np.ndarray, width: int) -> None:
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= width):
        raise ValueError(f"unit index out of range for {point[0]} layer {point[1]} (width {width})")


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
            handles.append(point.register(make(index, point.is_input)))
        yield
    finally:
        for handle in handles:
            handle.remove()


class _PointMasks:
    """Every configuration's mask at one (site, layer), over the columns any of them touches."""

    def __init__(self, configs: Sequence[Deactivation], point: Point):
        self.columns = np.unique(np.concatenate([c.units.get(point, np.empty(0, np.int64)) for c in configs]))
        self.mask = np.zeros((len(configs), self.columns.size), dtype=bool)
        self.fill = np.zeros((len(configs), self.columns.size), dtype=np.float32)
        for i, config in enumerate(configs):
            ids = config.units.get(point)
            if ids is not None:
                where = np.searchsorted(self.columns, ids)
                self.mask[i, where] = True
                self.fill[i, where] = config.values[point]


class RowDeactivation:
    """Per-row deactivation: row i of every batch runs under configuration rows[i].

    Usage:
        masks = RowDeactivation(sites, configs)
        with masks.installed():
            masks.set_rows([0, 0, 1, 1])   # before each forward pass or generate call
            model.generate(...)

    set_rows prepares, per hook point, only what the configurations of those rows touch, so a
    hook costs nothing where none of them masks a unit and reads and writes only their columns.
    It places them on `device`; in a model dispatched over several devices, a hook whose layer
    runs elsewhere moves its part there once per set_rows.
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
            self.masks[point] = _PointMasks(self.configs, point)
        self.rows: int | None = None
        # point -> (columns, per-row mask [rows, columns] or None when every row masks every
        # column, per-row values [rows, columns] or, with mask None, [columns])
        self.active: dict[Point, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = {}

    def set_rows(self, rows: Sequence[int] | torch.Tensor) -> None:
        rows = np.asarray(torch.as_tensor(rows, dtype=torch.long).cpu())
        if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= len(self.configs)):
            raise ValueError(f"set_rows: configuration index out of range (have {len(self.configs)})")
        present = np.unique(rows)
        self.active = {}
        for point, masks in self.masks.items():
            used = masks.mask[present].any(0)
            if not used.any():
                continue
            mask, fill = masks.mask[rows][:, used], masks.fill[rows][:, used]
            columns = torch.from_numpy(masks.columns[used]).to(self.device)
            if mask.all() and (fill == fill[:1]).all():  # one configuration's set for every row
                self.active[point] = (columns, None, torch.from_numpy(fill[0]).to(self.device))
            else:
                self.active[point] = (columns, torch.from_numpy(mask).to(self.device),
                                      torch.from_numpy(fill).to(self.device))
        self.rows = int(rows.size)

    def _hook(self, point: Point, is_input: bool):
        def write(module, args, output=None):
            x = args[0] if is_input else output
            if self.rows != x.shape[0]:
                raise RuntimeError(f"RowDeactivation: batch of {x.shape[0]} rows but {self.rows} row "
                                   f"configurations set")
            entry = self.active.get(point)
            if entry is None:
                return None
            if entry[0].device != x.device:  # a dispatched model's layer on another device: moved once
                entry = self.active[point] = tuple(None if t is None else t.to(x.device) for t in entry)
            columns, mask, fill = entry
            # In place: the tensor is this layer's own temporary; unmasked entries stay as they are.
            if mask is None:
                x[..., columns] = fill.to(x.dtype)
            else:
                shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (columns.numel(),)
                touched = x.index_select(-1, columns)
                x.index_copy_(-1, columns, torch.where(mask.view(shape), fill.to(x.dtype).view(shape), touched))
            return None
        return write

    @contextlib.contextmanager
    def installed(self):
        handles = []
        try:
            for point in self.masks:
                site_point = self.sites.point(*point)
                handles.append(site_point.register(self._hook(point, site_point.is_input)))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.rows, self.active = None, {}
