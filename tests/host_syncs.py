"""Counting, on the CPU, what a block of torch code would cost on a GPU: every aten op it dispatches
and the ops that make the host wait for the device.

A GPU runs ahead of the host only while the host never asks for a value the device computes. The
tests run the torch (GPU) paths on the CPU, where a round-trip costs nothing and so cannot be timed;
instead `HostSyncCounter` sees every op through a `TorchDispatchMode` and names those that, on a CUDA
device, return to the host before the next op can be queued.

    with HostSyncCounter() as counter:
        run_one_batch()
    counter.syncs        # ops that would synchronise the host with the device
    counter.sync_ops     # Counter: op name -> times
    counter.ops          # every aten op dispatched (a proxy for kernel launches, views included)
    counter.kernels      # the ops that are not views (closer to kernel launches)
    counter.uploads      # host data turned into tensors (torch.tensor, from_numpy, ...): a host->device
                         # copy when the target is a GPU
    counter.op_counts    # Counter: op name -> times, every op

Caught as a sync:
- `aten._local_scalar_dense` (under inference mode `aten.item` / `aten.is_nonzero`): `x.item()`,
  `int(x)`, `float(x)`, `bool(x)`, `if x:`, `x.__index__`;
- ops whose output shape depends on data: `aten.nonzero` (also `torch.where(mask)`, `argwhere`),
  `aten.masked_select`, `aten.unique*`, `aten.repeat_interleave` without `output_size`,
  `aten.bincount` (CUDA reads the maximum to size its output);
- boolean-mask indexing: `aten.index` / `aten.index_put(_)` with a bool or uint8 index tensor
  (`x[mask]`, `x[mask] = v`), which run `nonzero` inside the kernel;
- `aten.equal`, `aten.allclose` (answer a Python bool);
- copies that leave the device: `aten._to_copy` / `aten.to` / `aten.copy_` from a non-CPU tensor
  to the CPU without `non_blocking` (seen only when the code really runs on a GPU);
- `Tensor.tolist`, `Tensor.numpy` (so `np.asarray(t)`) and `Tensor.cpu`: these do not dispatch an
  aten op (or none that says so), so the counter wraps the methods while it is active. On a CPU-only
  machine it cannot tell a device tensor from a host one: any such call inside the block counts, so
  keep host-side bookkeeping in numpy or outside the counted block. The `numpy()` or `tolist()` of
  what a counted `cpu()` returned is not counted again: the copy was the wait.

Not caught on a CPU-only machine: `t.to("cpu")` / `t.to(device)` and `copy_` between CPU tensors
(the devices are the same, so nothing says which copy would cross the bus), pinned memory, stream
waits, and syncs inside libraries that do not dispatch through aten (a ctypes kernel, numpy).
Host->device copies are visible only as `uploads` (`aten.lift_fresh`, which `torch.tensor(data)` and
`torch.from_numpy` dispatch): the issue allows a few per batch, not per layer. Run the counted code
under `torch.no_grad()` or `torch.inference_mode()` so autograd bookkeeping does not inflate `ops`.
"""

from __future__ import annotations

import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that always wait for the device: their result is a host value, or their output's shape is.
# Under torch.inference_mode composite ops reach the mode whole (aten.item, not the
# _local_scalar_dense inside it), so both are listed.
_ALWAYS_SYNC = {
    aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default,
    aten.nonzero.default, aten.nonzero.out, aten.argwhere.default, aten.nonzero_numpy.default,
    aten.masked_select.default, aten.masked_select.out,
    aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.unique_dim_consecutive.default,
    aten.bincount.default,
    aten.equal.default, aten.allclose.default,
}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_COPIES = {aten._to_copy.default, aten.copy_.default, aten.to.device, aten.to.dtype_layout, aten.to.other,
           aten.to.prim_Device}
_UPLOADS = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
# Python-level conversions that never say so in aten (see the module's docstring).
_WRAPPED_METHODS = ("tolist", "numpy", "cpu")


def _is_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _why_sync(func, args, kwargs) -> bool:
    if func in _ALWAYS_SYNC:
        return True
    if func in _INDEXING:
        return any(_is_mask(index) for index in args[1] if index is not None)
    if func is aten.where.default:  # torch.where(condition): nonzero
        return True
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if func in _COPIES and not kwargs.get("non_blocking", False) and not (len(args) > 2 and args[2] is True):
        source = args[1] if func is aten.copy_.default else args[0]
        return source.device.type != "cpu" and _target(func, args, kwargs).type == "cpu"
    return False


def _target(func, args, kwargs) -> torch.device:
    """Where a copy or `to` puts its result."""
    if func is aten.copy_.default:
        return args[0].device
    if kwargs.get("device") is not None:
        return torch.device(kwargs["device"])
    for arg in args[1:]:
        if isinstance(arg, torch.Tensor):
            return arg.device
        if isinstance(arg, (torch.device, str)):
            return torch.device(arg)
    return args[0].device


class HostSyncCounter(TorchDispatchMode):
    """Counts the aten ops of a block and those that would synchronise the host with a GPU."""

    def __init__(self):
        super().__init__()
        self.op_counts: Counter = Counter()
        self.sync_ops: Counter = Counter()
        self.kernels = 0
        self.uploads = 0
        self._saved: dict = {}
        self._copied = weakref.WeakValueDictionary()  # id -> what a counted cpu() returned (host)

    @property
    def ops(self) -> int:
        return sum(self.op_counts.values())

    @property
    def syncs(self) -> int:
        return sum(self.sync_ops.values())

    def reset(self) -> None:
        """Start counting afresh (e.g. at each batch) without leaving the mode."""
        self.op_counts.clear()
        self.sync_ops.clear()
        self.kernels = self.uploads = 0

    def snapshot(self) -> dict:
        return {"ops": self.ops, "kernels": self.kernels, "syncs": self.syncs, "uploads": self.uploads,
                "sync_ops": dict(self.sync_ops)}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket.__name__)
        self.op_counts[name] += 1
        if not func.is_view:
            self.kernels += 1
        if func in _UPLOADS:
            self.uploads += 1
        if _why_sync(func, args, kwargs):
            self.sync_ops[name] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        for method in _WRAPPED_METHODS:
            original = getattr(torch.Tensor, method)
            self._saved[method] = original
            setattr(torch.Tensor, method, self._counting(method, original))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for method, original in self._saved.items():
                setattr(torch.Tensor, method, original)
            self._saved.clear()

    def _counting(self, method, original):
        counter = self

        def wrapped(tensor, *args, **kwargs):
            if counter._copied.get(id(tensor)) is not tensor:
                counter.sync_ops[f"Tensor.{method}"] += 1
            out = original(tensor, *args, **kwargs)
            if method == "cpu":
                counter._copied[id(out)] = out
            return out

        wrapped.__name__ = method
        return wrapped
