"""Reading the MLP sites in one forward pass: pooled responses per prompt and the per-token
statistics of every unit, computed on the device, by read hooks or (gated MLPs) by a fused
MLP forward installed for the duration of the pass.

Everything a hook computes for a batch is kept apart until the forward pass succeeds
(`BatchObservation`), so a batch that fails (a CUDA out-of-memory, say) and is retried in
halves never counts twice.
"""

from __future__ import annotations

import contextlib
import logging
import queue
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import native_statistics
from .architectures import MlpSites, fusable_activation
from .dispatch import execution_device

log = logging.getLogger(__name__)

POOLINGS = ("mean", "max", "last")


@dataclass(frozen=True)
class TokenMask:
    """Which positions of a right-padded batch count: [start, length) of each row."""
    valid: torch.Tensor        # [B, T] bool
    lengths: torch.Tensor      # [B] long, position after the last valid token
    counts: torch.Tensor       # [B, 1] float, valid tokens per row (at least 1)
    count: int                 # valid tokens in the batch

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor, exclude_first: bool = False) -> "TokenMask":
        valid = attention_mask.bool().clone()
        if not bool(valid[:, 0].all()) or not bool((valid[:, :-1] | ~valid[:, 1:]).all()):
            raise ValueError("TokenMask needs right padding (valid tokens first in every row)")
        lengths = valid.sum(1)
        if exclude_first:
            valid[:, 0] = False
        counts = valid.sum(1, keepdim=True)
        return cls(valid, lengths, counts.clamp(min=1).float(), int(counts.sum()))

    @classmethod
    def from_lengths(cls, lengths: list[int], width: int, exclude_first: bool = False,
                     device: torch.device | str = "cpu") -> "TokenMask":
        """The mask of a right-padded batch whose row lengths the host knows: built on the host
        and sent to `device` once (pinned, non-blocking on CUDA), so nothing waits on the device."""
        count = sum(lengths) - (len(lengths) if exclude_first else 0)  # every row has a first token
        lengths = torch.tensor(lengths, dtype=torch.long)
        valid = torch.arange(width)[None] < lengths[:, None]
        if exclude_first:
            valid[:, 0] = False
        counts = valid.sum(1, keepdim=True)
        mask = cls(valid, lengths, counts.clamp(min=1).float(), count)
        return mask.to(torch.device(device))

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[start, end) of each row's valid tokens (int64, on the CPU), for the C kernel."""
        return native_statistics.row_bounds(self.valid, self.lengths)

    def to(self, device: torch.device) -> "TokenMask":
        """The mask on `device` (itself where it already is): a dispatched model's layers read it
        on their own devices."""
        if self.valid.device == device:
            return self
        return TokenMask(*(to_device(t, device) for t in (self.valid, self.lengths, self.counts)), self.count)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; a host tensor bound for a GPU goes from pinned memory without
    blocking the host (CUDA orders the copy before the kernels that read it)."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass
class BatchObservation:
    """What one site of one layer showed in one batch; from `SiteRecorder.finish_batch`, of a
    run of layers, every field with a leading layer dimension ([L, B, n], [L, n])."""
    pooled: dict[str, torch.Tensor]     # pooling -> [B, n] float32
    total: torch.Tensor                 # [n] float64, sum over valid tokens
    total_sq: torch.Tensor              # [n] float64, sum of squares
    minimum: torch.Tensor               # [n]
    maximum: torch.Tensor               # [n]
    positive: torch.Tensor              # [n] int32, tokens > 0
    active: torch.Tensor                # [n] int32, tokens with |x| > threshold
    peaks: torch.Tensor                 # [B, n] each prompt's highest value per unit (-inf: no valid token)
    peak_positions: torch.Tensor        # [B, n] int32, its token position


def site_reductions(x: torch.Tensor, valid: torch.Tensor, active_threshold: float):
    """Reductions of [B, T, n] activations over the valid tokens ([B, T, 1] bool): per row and
    unit ([B, n]) the sum, the maximum and its position; per unit ([n]) the sum of squares, the
    tokens > 0, the tokens with |x| > threshold and the minimum. Plain elementwise-and-reduce
    code, so that torch.compile fuses it into one pass over x (see `run_fused`); only what
    pooling and the top activations need stays per row, which keeps a batch's memory small.
    Dimensions count from the end, so a stack of layers [L, B, T, n] is reduced in the same
    calls, each result with a leading layer dimension."""
    weight = valid.to(x.dtype)
    sums = (x * weight).sum(-2)
    total_sq = (x * x * weight).sum((-3, -2))
    positive = ((x > 0) & valid).sum((-3, -2))
    active = ((x.abs() > active_threshold) & valid).sum((-3, -2))
    maxima, peaks = torch.where(valid, x, float("-inf")).max(-2)
    minimum = torch.where(valid, x, float("inf")).amin((-3, -2))
    return sums, total_sq, positive, active, maxima, peaks, minimum


def gated_act(gate: torch.Tensor, up: torch.Tensor, activation: str, in_place: bool = False) -> torch.Tensor:
    """A gated MLP's down-projection input, as the model's own forward computes it. With
    `in_place` (silu, outside autograd), computed by the same kernels in gate's memory, which
    spares two fresh [B, T, n] buffers per layer."""
    if in_place and activation == "silu" and not torch.is_grad_enabled():
        return F.silu(gate, inplace=True).mul_(up)
    return (F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")) * up


def runs_natively(device: torch.device) -> bool:
    """Whether fused statistics on `device` come from the C kernel (on the CPU, where it
    compiled), not from torch.compile: its code computes them in one pass on torch's threads,
    where torch.compile's CPU code took several passes on one thread, and it costs no
    compilation."""
    return device.type == "cpu" and native_statistics.available()


_compiled: dict = {}
_fusion_failed = False


def run_fused(function, *args):
    """`function(*args)` compiled by torch.compile (once per process and function, for any
    shape), or run eagerly where compilation is unavailable (no C++ compiler, no Triton): the
    same code, so the same numbers to float rounding, only slower."""
    global _fusion_failed
    if not _fusion_failed:
        try:
            if function not in _compiled:
                _compiled[function] = torch.compile(function, dynamic=True)
            return _compiled[function](*args)
        except Exception as error:  # any backend failure: the eager path computes the same
            _fusion_failed = True
            log.warning("per-token statistics not fused (%s: %s); computing them eagerly",
                        error.__class__.__name__, str(error).splitlines()[0] if str(error) else "")
    return function(*args)


@dataclass(frozen=True)
class SiteOutputs:
    """Where one site's results of a batch go: per row [B, n] the sums, maxima and peak
    positions and the pooled responses; per unit [n] the totals. Contiguous tensors, in the
    dtypes `summarize` returns."""
    sums: torch.Tensor
    maxima: torch.Tensor
    peaks: torch.Tensor
    pooled: dict[str, torch.Tensor]
    total: torch.Tensor
    total_sq: torch.Tensor
    minimum: torch.Tensor
    maximum: torch.Tensor
    positive: torch.Tensor
    active: torch.Tensor

    def reductions(self) -> tuple[torch.Tensor, ...]:
        """The tensors `site_reductions` returns, in its order."""
        return self.sums, self.total_sq, self.positive, self.active, self.maxima, self.peaks, self.minimum


# (kind, dtype) of SiteOutputs' per-row and per-unit tensors; pooled ones take the stored dtype.
ROW_KINDS = (("sums", torch.float32), ("maxima", torch.float32), ("peaks", torch.int32))
UNIT_KINDS = (("total", torch.float64), ("total_sq", torch.float64), ("minimum", torch.float32),
              ("maximum", torch.float32), ("positive", torch.int32), ("active", torch.int32))


class BatchBuffers:
    """The host blocks a CPU batch's observations are written into: one [layers, rows, units]
    block per (site, per-row kind) and one [layers, units] per (site, per-unit kind), kept from
    batch to batch and reallocated only for a batch with more rows than any before.

    Allocated afresh, a batch's observations were about a thousand heap blocks alive through
    the whole forward pass, which took the heap's free space from the model's own buffers. Under
    extraction's 1 MiB mmap threshold a buffer that finds no free space is a fresh mapping,
    faulted in page by page: a cost that grows with the price of a page fault (a slower or
    busier machine), not with the forward's arithmetic. Kept blocks fault in once; per (pooling,
    site) they are also the stacked [layers, rows, units] block the response writer takes,
    without a copy. A batch's views are valid until the next batch starts."""

    def __init__(self, n_layers: int, widths: dict[str, int], poolings: tuple[str, ...], pooled_dtype: torch.dtype):
        self.n_layers, self.widths, self.poolings, self.pooled_dtype = n_layers, widths, poolings, pooled_dtype
        self.rows = self.capacity = 0
        self._blocks: dict[tuple[str, str], torch.Tensor] = {}

    def reserve(self, rows: int) -> None:
        """Room for batches of up to `rows` rows: a job that knows its largest batch says so
        before the first, so the blocks are allocated once (longest-first batches grow in rows)."""
        if rows > self.capacity:
            for key in [key for key in self._blocks if key[1] not in dict(UNIT_KINDS)]:
                del self._blocks[key]  # before the larger ones are allocated, not after
            self.capacity = rows

    def start(self, rows: int) -> None:
        self.reserve(rows)
        self.rows = rows

    def outputs(self, site: str, layer: int) -> SiteOutputs:
        rows = {kind: self._block(site, kind, dtype, self.capacity)[layer, :self.rows]
                for kind, dtype in ROW_KINDS + tuple((p, self.pooled_dtype) for p in self.poolings)}
        units = {kind: self._block(site, kind, dtype)[layer] for kind, dtype in UNIT_KINDS}
        return SiteOutputs(rows["sums"], rows["maxima"], rows["peaks"], {p: rows[p] for p in self.poolings}, **units)

    def stacked(self, pooling: str, site: str) -> torch.Tensor:
        return self._blocks[(site, pooling)][:, :self.rows]

    def observation(self, site: str, layers: range) -> BatchObservation:
        """The batch's observation of `layers` of `site`, as views with a leading layer dimension."""
        run = slice(layers.start, layers.stop)
        row = lambda kind: self._blocks[(site, kind)][run, :self.rows]
        unit = lambda kind: self._blocks[(site, kind)][run]
        return BatchObservation({p: row(p) for p in self.poolings}, unit("total"), unit("total_sq"), unit("minimum"),
                                unit("maximum"), unit("positive"), unit("active"), row("maxima"), row("peaks"))

    def _block(self, site: str, kind: str, dtype: torch.dtype, rows: int | None = None) -> torch.Tensor:
        if (site, kind) not in self._blocks:
            shape = (self.n_layers, self.widths[site]) if rows is None else (self.n_layers, rows, self.widths[site])
            self._blocks[(site, kind)] = torch.empty(shape, dtype=dtype)
        return self._blocks[(site, kind)]


def observe(x: torch.Tensor, mask: TokenMask, poolings: Iterable[str], active_threshold: float,
            fused: bool = False, pooled_dtype: torch.dtype = torch.float32,
            out: SiteOutputs | None = None) -> BatchObservation:
    """Pool and summarize one site's [B, T, n] activations. With `fused`, the per-row
    reductions come from one compiled kernel; otherwise from the same code run eagerly. With
    `out`, the results are written there."""
    x = x.float()  # half-precision sums lose too much; a no-op for float32 models
    valid = mask.valid.unsqueeze(-1)
    if fused and runs_natively(x.device):
        statistics, = native_statistics.site_statistics([x], mask.bounds(), active_threshold,
                                                        None if out is None else [out.reductions()])
    elif fused:
        statistics = run_fused(site_reductions, x, valid, active_threshold)
    else:
        statistics = site_reductions(x, valid, active_threshold)
    return summarize(x, mask, poolings, statistics, pooled_dtype, out)


def summarize(x: torch.Tensor, mask: TokenMask, poolings: Iterable[str], statistics,
              pooled_dtype: torch.dtype = torch.float32, out: SiteOutputs | None = None) -> BatchObservation:
    """A site's observation from its activations x [B, T, n] and their `site_reductions`.
    Pooled responses are kept in `pooled_dtype` (what they will be stored as) and peak positions
    as int32: a batch's observations are what extraction holds per row, so they stay small.
    With `out`, every result not already there is written there."""
    sums, total_sq, positive, active, maxima, peaks, minimum = statistics
    pooled = {}
    for pooling in poolings:
        if pooling == "mean":
            value = sums / mask.counts
        elif pooling == "max":
            value = maxima
        elif pooling == "last":
            value = x[torch.arange(x.shape[0], device=x.device), mask.lengths - 1]
        else:
            raise ValueError(f"pooling: unknown {pooling!r} (choose from {', '.join(POOLINGS)})")
        pooled[pooling] = value.to(pooled_dtype) if out is None else out.pooled[pooling].copy_(value)
    if out is None:
        return BatchObservation(pooled, sums.sum(0, dtype=torch.float64), total_sq.double(), minimum, maxima.amax(0),
                                positive.to(torch.int32), active.to(torch.int32), maxima, peaks.to(torch.int32))
    given = (out.sums, out.total_sq, out.positive, out.active, out.maxima, out.peaks, out.minimum)
    for target, value in zip(given, statistics):
        if target.data_ptr() != value.data_ptr():  # the C kernel wrote there; other paths did not
            target.copy_(value)
    return BatchObservation(pooled, torch.sum(out.sums, 0, dtype=torch.float64, out=out.total), out.total_sq,
                            out.minimum, torch.amax(out.maxima, 0, out=out.maximum), out.positive, out.active,
                            out.maxima, out.peaks)


# The layers of a site's run are stacked and reduced together while their float32 activations
# fit in this many bytes: every layer at once for the batches extraction forwards after cached
# prefixes (a 7B model's 32 layers of 11,008 units up to about 380 tokens a batch), a few calls
# for long whole prompts, so a batch's memory stays bounded by the batch, not by the layers.
GROUP_BYTES = 512 << 20


@dataclass(frozen=True)
class LayerRun:
    """Consecutive layers of one site computed on one device in one way (by the C kernel, layer
    by layer, or by torch, stacked): their observations and statistics are kept as one block."""
    site: str
    first: int
    count: int
    device: torch.device
    native: bool

    @property
    def layers(self) -> range:
        return range(self.first, self.first + self.count)


class SiteRecorder:
    """Reads every (site, layer) in each forward pass; `finish_batch` then gives one stacked
    observation ([layers, ...] tensors) per `LayerRun`.

    On the C kernel's path (the CPU) each layer is reduced in its hook, into kept host blocks.
    On torch's path (a GPU, or no C compiler) a hook only keeps a reference to the activations,
    and a run's layers are stacked and reduced in one set of calls (`GROUP_BYTES`): no op per
    layer beyond the forward's own, and no value read back to the host, so the device runs
    ahead of the host through the whole batch.

    With `fused` on a gated MLP whose gate, up and act are all read, each layer's MLP forward is
    replaced (while installed) by one that computes act itself and hands gate, up and act over
    at once: one Python call per layer instead of three hooks. Elsewhere, one read hook per
    (site, layer)."""

    def __init__(self, sites: MlpSites, site_names: Iterable[str], poolings: Iterable[str], active_threshold: float,
                 fused: bool = False, pooled_dtype: torch.dtype = torch.float32):
        self.sites = sites
        self.pooled_dtype = pooled_dtype
        self.fused = fused
        self.site_names = tuple(site_names)
        sites.check(self.site_names)
        self.poolings = tuple(poolings)
        for pooling in self.poolings:
            if pooling not in POOLINGS:
                raise ValueError(f"pooling: unknown {pooling!r} (choose from {', '.join(POOLINGS)})")
        self.active_threshold = active_threshold
        self.mask: TokenMask | None = None
        self._masks: dict[torch.device, TokenMask] = {}
        self.runs = [run for site in self.site_names for run in self._runs(site)]
        self._run_of = {(run.site, layer): run for run in self.runs for layer in run.layers}
        self.buffers = BatchBuffers(sites.n_layers, {site: sites.width(site) for site in self.site_names},
                                    self.poolings, pooled_dtype)
        self._pending: dict[str, list[torch.Tensor]] = {}  # a torch run's activations not yet reduced
        self._groups: dict[tuple[str, int], list] = {}     # (site, run.first) -> reduced groups
        self.stacked: dict[tuple[str, int], BatchObservation] = {}

    def _runs(self, site: str) -> list[LayerRun]:
        runs: list[LayerRun] = []
        for layer in range(self.sites.n_layers):
            device = execution_device(self.sites.point(site, layer).module)
            native = self.fused and runs_natively(device)
            if runs and (runs[-1].device, runs[-1].native) == (device, native):
                runs[-1] = LayerRun(site, runs[-1].first, runs[-1].count + 1, device, native)
            else:
                runs.append(LayerRun(site, layer, 1, device, native))
        return runs

    def outputs(self, site: str, layer: int) -> SiteOutputs:
        """Where a C-kernel layer's results go: the recorder's kept buffers."""
        return self.buffers.outputs(site, layer)

    def mask_on(self, device: torch.device) -> TokenMask:
        """The batch's mask on a layer's device, copied there once per batch."""
        if device not in self._masks:
            self._masks[device] = self.mask.to(device)
        return self._masks[device]

    def _hook(self, site: str, layer: int, is_input: bool):
        run = self._run_of[(site, layer)]

        def read(module, args, output=None):
            x = args[0] if is_input else output
            if x.dim() == 2:  # OPT runs its MLP on [batch * tokens, features]
                x = x.view(*self.mask.valid.shape, -1)
            if run.native:
                observe(x, self.mask_on(x.device), self.poolings, self.active_threshold, True, self.pooled_dtype,
                        self.outputs(site, layer))
            else:
                self._keep(run, layer, x)
        return read

    def _keep(self, run: LayerRun, layer: int, x: torch.Tensor) -> None:
        """Hold a torch run's activations until its last layer (or GROUP_BYTES), then reduce them."""
        pending = self._pending.setdefault(run.site, [])
        pending.append(x)
        if layer == run.layers[-1] or len(pending) * x.numel() * 4 >= GROUP_BYTES:  # numel: no op
            del self._pending[run.site]
            self._groups.setdefault((run.site, run.first), []).append(self._reduce(pending))

    def _reduce(self, xs: list[torch.Tensor]):
        """The `site_reductions` and pooled responses of a stack of layers [L, B, T, n]."""
        mask = self.mask_on(xs[0].device)
        x = torch.stack(xs).float()  # half-precision sums lose too much
        valid = mask.valid.unsqueeze(-1)
        if self.fused:
            statistics = run_fused(site_reductions, x, valid, self.active_threshold)
        else:
            statistics = site_reductions(x, valid, self.active_threshold)
        sums, maxima = statistics[0], statistics[4]
        pooled = {}
        for pooling in self.poolings:
            if pooling == "mean":
                pooled[pooling] = sums / mask.counts
            elif pooling == "max":
                pooled[pooling] = maxima
            else:  # last
                rows = torch.arange(x.shape[1], device=x.device)
                pooled[pooling] = x[:, rows, mask.lengths - 1]
        return statistics, pooled

    def _fused_forward(self, layer: int, activation: str):
        gate_proj, up_proj, down_proj = (self.sites.projection(name, layer) for name in ("gate", "up", "down"))

        def forward(x):
            gate, up = gate_proj(x), up_proj(x)
            if not self._run_of[("gate", layer)].native:
                act = gated_act(gate, up, activation)  # gate and up are kept: not in place
                for site, value in (("gate", gate), ("up", up), ("act", act)):
                    self._keep(self._run_of[(site, layer)], layer, value)
                return down_proj(act)
            mask = self.mask_on(gate.device)
            outputs = [self.outputs(site, layer) for site in ("gate", "up", "act")]
            # gate and up read in one pass and summarized before act overwrites gate: on the
            # CPU every fresh buffer is a fresh mapping, faulted in page by page.
            statistics = native_statistics.site_statistics([gate, up], mask.bounds(), self.active_threshold,
                                                           [o.reductions() for o in outputs[:2]])
            for x, seen, out in zip((gate, up), statistics, outputs[:2]):
                summarize(x, mask, self.poolings, seen, self.pooled_dtype, out)
            act = gated_act(gate, up, activation, in_place=True)
            statistics = native_statistics.site_statistics([act], mask.bounds(), self.active_threshold,
                                                           [outputs[2].reductions()])
            summarize(act, mask, self.poolings, statistics[0], self.pooled_dtype, outputs[2])
            return down_proj(act)
        return forward

    def _fusable_mlps(self) -> list[tuple[torch.nn.Module, str]] | None:
        if not self.fused or not {"gate", "up", "act"} <= set(self.site_names):
            return None
        mlps = [self.sites.mlp(layer) for layer in range(self.sites.n_layers)]
        if any("forward" in vars(mlp) and not _placed_by_accelerate(mlp) for mlp in mlps):
            return None  # already wrapped by someone else (nnsight...): leave their forward alone
        activations = [fusable_activation(mlp) for mlp in mlps]
        return None if None in activations else list(zip(mlps, activations))

    @contextlib.contextmanager
    def installed(self):
        handles, patched = [], []
        try:
            fusable = self._fusable_mlps()
            if fusable:
                for layer, (mlp, activation) in enumerate(fusable):
                    # accelerate's wrapper runs its device hooks around _old_forward: the fused
                    # forward goes in there, so weights and inputs still reach the layer's device.
                    name = "_old_forward" if _placed_by_accelerate(mlp) else "forward"
                    patched.append((mlp, name, vars(mlp).get(name)))
                    setattr(mlp, name, self._fused_forward(layer, activation))  # shadows the class's forward
            for site in self.site_names:
                if fusable and site != "down":
                    continue
                for layer in range(self.sites.n_layers):
                    point = self.sites.point(site, layer)
                    handles.append(point.register(self._hook(site, layer, point.is_input)))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for mlp, name, original in patched:
                if original is None:
                    delattr(mlp, name)
                else:
                    setattr(mlp, name, original)

    def start_batch(self, mask: TokenMask) -> None:
        """A new batch; what an earlier (failed) batch left is dropped."""
        self.mask = mask
        self._masks = {mask.valid.device: mask}
        self._pending, self._groups, self.stacked = {}, {}, {}
        if any(run.native for run in self.runs):
            self.buffers.start(mask.valid.shape[0])

    def finish_batch(self) -> dict[tuple[str, int], BatchObservation]:
        """After a successful forward: per run, keyed (site, first layer), its observation with a
        leading layer dimension (views of the kept blocks on the C kernel's path, valid until the
        next batch). A constant number of ops per run, however many layers it has."""
        self.stacked = {}
        for run in self.runs:
            key = (run.site, run.first)
            if run.native:
                self.stacked[key] = self.buffers.observation(run.site, run.layers)
                continue
            groups = self._groups.get(key, [])
            if sum(len(g[0][0]) for g in groups) != run.count:
                raise RuntimeError(f"{run.site}: the forward pass did not reach every layer's hook")
            statistics = [parts[0] if len(parts) == 1 else torch.cat(parts) for parts in zip(*(g[0] for g in groups))]
            pooled = {p: groups[0][1][p] if len(groups) == 1 else torch.cat([g[1][p] for g in groups])
                      for p in self.poolings}
            sums, total_sq, positive, active, maxima, peaks, minimum = statistics
            self.stacked[key] = BatchObservation(pooled, sums.sum(-2, dtype=torch.float64), total_sq.double(), minimum,
                                                 maxima.amax(-2), positive.to(torch.int32), active.to(torch.int32),
                                                 maxima, peaks.to(torch.int32))
        return self.stacked

    @property
    def observations(self) -> dict[tuple[str, int], BatchObservation]:
        """Per (site, layer), views of the stacked observations (for tests and inspection; the
        engine reads `finish_batch`'s blocks)."""
        stacked = self.stacked or self.finish_batch()
        return {(site, first + i): BatchObservation({p: v[i] for p, v in seen.pooled.items()},
                                                    *(getattr(seen, f)[i] for f in _FIELDS))
                for (site, first), seen in stacked.items() for i in range(len(seen.total))}

    def pooled_to_host(self, pinned: "PinnedBuffers | None" = None) -> "HostResponses":
        """This batch's pooled responses on their way to the host. Torch runs' blocks leave each
        device as one flat block in the stored dtype (with `pinned`, on CUDA: copied on a side
        stream into page-locked memory, the host not waiting); C-kernel runs' are the kept host
        blocks themselves."""
        parts, flats = [], {}
        for pooling in self.poolings:
            for run in self.runs:
                seen = self.stacked[(run.site, run.first)]
                if run.native:
                    parts.append((pooling, run.site, ("kept", seen.pooled[pooling])))
                else:
                    blocks = flats.setdefault(run.device, [])
                    blocks.append(seen.pooled[pooling])
                    parts.append((pooling, run.site, ("flat", run.device, len(blocks) - 1)))
        copies = {}
        for device, blocks in flats.items():
            flat = torch.empty(sum(b.numel() for b in blocks), dtype=self.pooled_dtype, device=device)
            torch.cat([b.reshape(-1) for b in blocks], out=flat)  # one conversion to the stored dtype
            shapes = [tuple(b.shape) for b in blocks]
            copies[device] = (pinned.copy(flat) if pinned is not None and device.type == "cuda"
                              else (flat, None, None), shapes)
        return HostResponses(parts, copies, pinned)

_FIELDS = ("total", "total_sq", "minimum", "maximum", "positive", "active", "peaks", "peak_positions")


class PinnedBuffers:
    """Page-locked host blocks that a batch's responses are copied into on a side stream, per
    device: at most `count` in flight (queued or being written), so a writer that falls behind
    holds up the next batch's copy instead of host memory growing with the shard."""

    def __init__(self, count: int = 3):
        self.count = count
        self._free: dict[torch.device, queue.Queue] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def copy(self, flat: torch.Tensor):
        """(host view, event that marks the copy done, the block to release)."""
        free = self._free.get(flat.device)
        if free is None:
            free = self._free[flat.device] = queue.Queue()
            for _ in range(self.count):
                free.put(None)
        block = free.get()
        if block is None or block.numel() < flat.numel() or block.dtype != flat.dtype:
            block = torch.empty(flat.numel(), dtype=flat.dtype, pin_memory=True)
        stream = self._streams.setdefault(flat.device, torch.cuda.Stream(flat.device))
        stream.wait_stream(torch.cuda.current_stream(flat.device))  # after the kernels that fill flat
        with torch.cuda.stream(stream):
            host = block[:flat.numel()]
            host.copy_(flat, non_blocking=True)
            flat.record_stream(stream)  # its memory is not reused before the copy is done
            done = torch.cuda.Event()
            done.record(stream)
        return host, done, (flat.device, block)

    def release(self, token) -> None:
        device, block = token
        self._free[device].put(block)


class HostResponses:
    """A batch's pooled responses: `arrays()` waits for their copies and gives numpy [layers,
    rows, units] arrays per (pooling, site); `release()` hands pinned blocks back. Each flat
    block becomes numpy once, so a batch reads the device back once per device."""

    def __init__(self, parts, copies, pinned: PinnedBuffers | None):
        self.parts, self.copies, self.pinned = parts, copies, pinned

    def arrays(self) -> dict[tuple[str, str], np.ndarray]:
        views = {}
        for device, ((host, done, _), shapes) in self.copies.items():
            if done is not None:
                done.synchronize()
            flat, offset, views[device] = host.numpy(), 0, []
            for shape in shapes:
                size = int(np.prod(shape))
                views[device].append(flat[offset:offset + size].reshape(shape))
                offset += size
        pieces: dict[tuple[str, str], list[np.ndarray]] = {}
        for pooling, site, where in self.parts:
            block = where[1].numpy() if where[0] == "kept" else views[where[1]][where[2]]
            pieces.setdefault((pooling, site), []).append(block)
        return {key: blocks[0] if len(blocks) == 1 else np.concatenate(blocks) for key, blocks in pieces.items()}

    def release(self) -> None:
        for (_, _, token), _ in self.copies.values():
            if token is not None:
                self.pinned.release(token)


def _placed_by_accelerate(module: torch.nn.Module) -> bool:
    """accelerate's device hooks wrap the module's forward, keeping the original as _old_forward."""
    return hasattr(module, "_hf_hook") and "_old_forward" in vars(module)


def pooled_responses(model, sites: MlpSites, site_names, pooling: str, batch: dict[str, torch.Tensor],
                     exclude_first: bool = False, fused: bool = False) -> dict[str, torch.Tensor]:
    """Convenience for one right-padded batch: {site: [layers, batch, units]} of one pooling."""
    recorder = SiteRecorder(sites, site_names, (pooling,), active_threshold=0.0, fused=fused)
    with recorder.installed(), torch.inference_mode():
        recorder.start_batch(TokenMask.from_attention_mask(batch["attention_mask"], exclude_first))
        model(**batch, use_cache=False)
        recorder.finish_batch()
        pooled = recorder.pooled_to_host().arrays()
    return {site: torch.from_numpy(pooled[(pooling, site)]) for site in site_names}
