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
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import native_statistics
from .architectures import MlpSites, fusable_activation

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

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[start, end) of each row's valid tokens (int64, on the CPU), for the C kernel."""
        return native_statistics.row_bounds(self.valid, self.lengths)

    def to(self, device: torch.device) -> "TokenMask":
        """The mask on `device` (itself where it already is): a dispatched model's layers read it
        on their own devices."""
        if self.valid.device == device:
            return self
        return TokenMask(self.valid.to(device), self.lengths.to(device), self.counts.to(device), self.count)


@dataclass
class BatchObservation:
    """What one site of one layer showed in one batch."""
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
    pooling and the top activations need stays per row, which keeps a batch's memory small."""
    weight = valid.to(x.dtype)
    sums = (x * weight).sum(1)
    total_sq = (x * x * weight).sum((0, 1))
    positive = ((x > 0) & valid).sum((0, 1))
    active = ((x.abs() > active_threshold) & valid).sum((0, 1))
    maxima, peaks = torch.where(valid, x, float("-inf")).max(1)
    minimum = torch.where(valid, x, float("inf")).amin((0, 1))
    return sums, total_sq, positive, active, maxima, peaks, minimum


def gated_act(gate: torch.Tensor, up: torch.Tensor, activation: str, in_place: bool = False) -> torch.Tensor:
    """A gated MLP's down-projection input, as the model's own forward computes it. With
    `in_place` (silu, outside autograd), computed by the same kernels in gate's memory, which
    spares two fresh [B, T, n] buffers per layer."""
    if in_place and activation == "silu" and not torch.is_grad_enabled():
        return F.silu(gate, inplace=True).mul_(up)
    return (F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")) * up


def gated_mlp_statistics(gate: torch.Tensor, up: torch.Tensor, valid: torch.Tensor, active_threshold: float,
                         activation: str):
    """act = `gated_act(gate, up)` and the `site_reductions` of gate, up and act: compiled, one
    pass that reads gate and up once."""
    act = gated_act(gate, up, activation)
    return (act, site_reductions(gate.float(), valid, active_threshold),
            site_reductions(up.float(), valid, active_threshold), site_reductions(act.float(), valid, active_threshold))


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


class SiteRecorder:
    """Reads every (site, layer) in each forward pass, filling `observations`.

    With `fused` on a gated MLP whose gate, up and act are all read, each layer's MLP forward
    is replaced (while installed) by one that computes act and the three sites' reductions in
    one compiled pass: one Python call per layer instead of three hooks, and gate and up read
    once instead of three times. Elsewhere, one read hook per (site, layer)."""

    def __init__(self, sites: MlpSites, site_names: Iterable[str], poolings: Iterable[str], active_threshold: float,
                 fused: bool = False, pooled_dtype: torch.dtype = torch.float32):
        self.sites = sites
        self.pooled_dtype = pooled_dtype
        self.fused = fused
        self.site_names = tuple(site_names)
        sites.check(self.site_names)
        self.poolings = tuple(poolings)
        self.active_threshold = active_threshold
        self.mask: TokenMask | None = None
        self._masks: dict[torch.device, TokenMask] = {}
        self.observations: dict[tuple[str, int], BatchObservation] = {}
        self.buffers = BatchBuffers(sites.n_layers, {site: sites.width(site) for site in self.site_names},
                                    self.poolings, pooled_dtype)
        self._buffered: set[tuple[str, int]] = set()  # this batch's (site, layer) held in self.buffers

    def outputs(self, site: str, layer: int, device: torch.device) -> SiteOutputs | None:
        """Where a CPU layer's results go: the recorder's kept buffers."""
        if device.type != "cpu":
            return None
        self._buffered.add((site, layer))
        return self.buffers.outputs(site, layer)

    def mask_on(self, device: torch.device) -> TokenMask:
        """The batch's mask on a layer's device, copied there once per batch."""
        if device not in self._masks:
            self._masks[device] = self.mask.to(device)
        return self._masks[device]

    def _hook(self, site: str, layer: int, is_input: bool):
        def read(module, args, output=None):
            x = args[0] if is_input else output
            if x.dim() == 2:  # OPT runs its MLP on [batch * tokens, features]
                x = x.view(*self.mask.valid.shape, -1)
            self.observations[(site, layer)] = observe(x, self.mask_on(x.device), self.poolings,
                                                       self.active_threshold, self.fused, self.pooled_dtype,
                                                       self.outputs(site, layer, x.device))
        return read

    def _fused_forward(self, layer: int, activation: str):
        gate_proj, up_proj, down_proj = (self.sites.projection(name, layer) for name in ("gate", "up", "down"))

        def forward(x):
            gate, up = gate_proj(x), up_proj(x)
            mask = self.mask_on(gate.device)
            outputs = [self.outputs(site, layer, gate.device) for site in ("gate", "up", "act")]
            if runs_natively(gate.device):
                # gate and up read in one pass and summarized before act overwrites gate: on the
                # CPU every fresh buffer is a fresh mapping, faulted in page by page.
                statistics = native_statistics.site_statistics([gate, up], mask.bounds(), self.active_threshold,
                                                               [o.reductions() for o in outputs[:2]])
                self._summarize(layer, ("gate", "up"), (gate, up), statistics, outputs[:2])
                act = gated_act(gate, up, activation, in_place=True)
                statistics = native_statistics.site_statistics([act], mask.bounds(), self.active_threshold,
                                                               [outputs[2].reductions()])
                self._summarize(layer, ("act",), (act,), statistics, outputs[2:])
            else:
                act, *statistics = run_fused(gated_mlp_statistics, gate, up, mask.valid.unsqueeze(-1),
                                             self.active_threshold, activation)
                self._summarize(layer, ("gate", "up", "act"), (gate, up, act), statistics, outputs)
            return down_proj(act)
        return forward

    def _summarize(self, layer: int, sites: tuple[str, ...], values, statistics, outputs) -> None:
        mask = self.mask_on(values[0].device)
        for site, x, seen, out in zip(sites, values, statistics, outputs):
            self.observations[(site, layer)] = summarize(x, mask, self.poolings, seen, self.pooled_dtype, out)

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
        self.mask = mask
        self._masks = {mask.valid.device: mask}
        self.observations = {}
        self.buffers.start(mask.valid.shape[0])
        self._buffered = set()

    def pooled_to_host(self) -> dict[tuple[str, str], torch.Tensor]:
        """[layers, batch, units] tensors per (pooling, site): the kept buffers where every layer
        ran on the CPU (valid until the next batch), else one device-to-host copy per device."""
        layers = range(self.sites.n_layers)
        return {(pooling, site): self.buffers.stacked(pooling, site)
                if all((site, layer) in self._buffered for layer in layers)
                else stack_to_host([self.observations[(site, layer)].pooled[pooling] for layer in layers])
                for pooling in self.poolings for site in self.site_names}


def _placed_by_accelerate(module: torch.nn.Module) -> bool:
    """accelerate's device hooks wrap the module's forward, keeping the original as _old_forward."""
    return hasattr(module, "_hf_hook") and "_old_forward" in vars(module)


def stack_to_host(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack(tensors).cpu() for tensors on several devices (a dispatched model's layers):
    each device's run of tensors stacked there and copied in one piece."""
    runs: list[list[torch.Tensor]] = []
    for tensor in tensors:
        if runs and runs[-1][0].device == tensor.device:
            runs[-1].append(tensor)
        else:
            runs.append([tensor])
    return torch.cat([torch.stack(run).cpu() for run in runs]) if len(runs) > 1 else torch.stack(tensors).cpu()


def pooled_responses(model, sites: MlpSites, site_names, pooling: str, batch: dict[str, torch.Tensor],
                     exclude_first: bool = False, fused: bool = False) -> dict[str, torch.Tensor]:
    """Convenience for one right-padded batch: {site: [layers, batch, units]} of one pooling."""
    recorder = SiteRecorder(sites, site_names, (pooling,), active_threshold=0.0, fused=fused)
    with recorder.installed(), torch.inference_mode():
        recorder.start_batch(TokenMask.from_attention_mask(batch["attention_mask"], exclude_first))
        model(**batch, use_cache=False)
        pooled = recorder.pooled_to_host()
    return {site: pooled[(pooling, site)] for site in site_names}
