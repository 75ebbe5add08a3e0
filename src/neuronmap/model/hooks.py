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
    positive: torch.Tensor              # [n] float, tokens > 0
    active: torch.Tensor                # [n] float, tokens with |x| > threshold
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


def gated_act(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """A gated MLP's down-projection input, as the model's own forward computes it."""
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


def observe(x: torch.Tensor, mask: TokenMask, poolings: Iterable[str], active_threshold: float,
            fused: bool = False, pooled_dtype: torch.dtype = torch.float32) -> BatchObservation:
    """Pool and summarize one site's [B, T, n] activations. With `fused`, the per-row
    reductions come from one compiled kernel; otherwise from the same code run eagerly."""
    x = x.float()  # half-precision sums lose too much; a no-op for float32 models
    valid = mask.valid.unsqueeze(-1)
    if fused and runs_natively(x.device):
        statistics, = native_statistics.site_statistics([x], mask.bounds(), active_threshold)
    elif fused:
        statistics = run_fused(site_reductions, x, valid, active_threshold)
    else:
        statistics = site_reductions(x, valid, active_threshold)
    return summarize(x, mask, poolings, statistics, pooled_dtype)


def summarize(x: torch.Tensor, mask: TokenMask, poolings: Iterable[str], statistics,
              pooled_dtype: torch.dtype = torch.float32) -> BatchObservation:
    """A site's observation from its activations x [B, T, n] and their `site_reductions`.
    Pooled responses are kept in `pooled_dtype` (what they will be stored as) and peak positions
    as int32: a batch's observations are what extraction holds per row, so they stay small."""
    sums, total_sq, positive, active, maxima, peaks, minimum = statistics
    pooled = {}
    for pooling in poolings:
        if pooling == "mean":
            pooled[pooling] = (sums / mask.counts).to(pooled_dtype)
        elif pooling == "max":
            pooled[pooling] = maxima.to(pooled_dtype)
        elif pooling == "last":
            pooled[pooling] = x[torch.arange(x.shape[0], device=x.device), mask.lengths - 1].to(pooled_dtype)
        else:
            raise ValueError(f"pooling: unknown {pooling!r} (choose from {', '.join(POOLINGS)})")
    return BatchObservation(pooled, sums.sum(0, dtype=torch.float64), total_sq.double(), minimum, maxima.amax(0),
                            positive.float(), active.float(), maxima, peaks.to(torch.int32))


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
                                                       self.active_threshold, self.fused, self.pooled_dtype)
        return read

    def _fused_forward(self, layer: int, activation: str):
        gate_proj, up_proj, down_proj = (self.sites.projection(name, layer) for name in ("gate", "up", "down"))

        def forward(x):
            gate, up = gate_proj(x), up_proj(x)
            mask = self.mask_on(gate.device)
            if runs_natively(gate.device):
                act = gated_act(gate, up, activation)
                statistics = native_statistics.site_statistics([gate, up, act], mask.bounds(), self.active_threshold)
            else:
                act, *statistics = run_fused(gated_mlp_statistics, gate, up, mask.valid.unsqueeze(-1),
                                             self.active_threshold, activation)
            for site, values, seen in zip(("gate", "up", "act"), (gate, up, act), statistics):
                self.observations[(site, layer)] = summarize(values, mask, self.poolings, seen, self.pooled_dtype)
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
        self.mask = mask
        self._masks = {mask.valid.device: mask}
        self.observations = {}

    def pooled_to_host(self) -> dict[tuple[str, str], torch.Tensor]:
        """One device-to-host copy per (pooling, site) and device: [layers, batch, units] tensors."""
        return {(pooling, site): stack_to_host([self.observations[(site, layer)].pooled[pooling]
                                                for layer in range(self.sites.n_layers)])
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
