"""Forward hooks that read the MLP sites in one pass: pooled responses per prompt and the
per-token statistics of every unit, computed on the device.

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

from .architectures import MlpSites

log = logging.getLogger(__name__)

POOLINGS = ("mean", "max", "last")


@dataclass(frozen=True)
class TokenMask:
    """Which positions of a right-padded batch count: [start, length) of each row."""
    valid: torch.Tensor        # [B, T] bool
    lengths: torch.Tensor      # [B] long, position after the last valid token
    start: int                 # 1 when a leading BOS token is excluded, else 0
    mean_weights: torch.Tensor  # [B, 1, T] float, valid / count: mean pooling as one bmm
    flat: torch.Tensor         # [1, B*T] float, valid as 0/1: per-unit sums over tokens as one matmul
    count: int                 # valid tokens in the batch
    shortest: int              # every row is valid on [start, shortest)

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor, exclude_first: bool = False) -> "TokenMask":
        valid = attention_mask.bool().clone()
        if not bool(valid[:, 0].all()) or not bool((valid[:, :-1] | ~valid[:, 1:]).all()):
            raise ValueError("TokenMask needs right padding (valid tokens first in every row)")
        lengths = valid.sum(1)
        start = 1 if exclude_first else 0
        valid[:, :start] = False
        counts = valid.sum(1, keepdim=True).clamp(min=1)
        weights = (valid.float() / counts).unsqueeze(1)
        return cls(valid, lengths, start, weights, valid.float().reshape(1, -1), int(valid.sum()),
                   int(lengths.min()))

    def masked_extreme(self, x: torch.Tensor, largest: bool) -> torch.Tensor:
        """Max (or min) over valid tokens, [B, T, n] -> [B, n]. The padded tail is masked
        separately: length-sorted batches leave it short, so the full-size mask is avoided."""
        reduce = torch.amax if largest else torch.amin
        head = reduce(x[:, self.start:self.shortest], dim=1)
        if self.shortest < x.shape[1]:
            tail = x[:, self.shortest:].masked_fill(~self.valid[:, self.shortest:, None],
                                                    float("-inf") if largest else float("inf"))
            head = torch.maximum(head, reduce(tail, dim=1)) if largest else torch.minimum(head, reduce(tail, dim=1))
        return head


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
    top_values: torch.Tensor            # [k, n] the batch's highest prompt peaks per unit
    top_rows: torch.Tensor              # [k, n] their rows in the batch
    top_positions: torch.Tensor         # [k, n] token position of each peak (-1: cannot enter the top)


def token_statistics(x: torch.Tensor, valid: torch.Tensor, active_threshold: float):
    """Sums, counts and extremes of [B, T, n] activations over the valid tokens ([B, T, 1]
    bool): total, total of squares, tokens > 0, tokens with |x| > threshold ([n] each), and
    each row's maxima and minima ([B, n]). Written as plain elementwise-and-reduce code so
    that torch.compile fuses it into one pass over x (see `fused_token_statistics`)."""
    weight = valid.to(x.dtype)
    total = (x * weight).sum((0, 1))
    total_sq = (x * x * weight).sum((0, 1))
    positive = ((x > 0) & valid).sum((0, 1))
    active = ((x.abs() > active_threshold) & valid).sum((0, 1))
    maxima = torch.where(valid, x, float("-inf")).amax(1)
    minima = torch.where(valid, x, float("inf")).amin(1)
    return total, total_sq, positive, active, maxima, minima


_compiled_statistics = None
_fusion_failed = False


def fused_token_statistics(x: torch.Tensor, valid: torch.Tensor, active_threshold: float):
    """`token_statistics` compiled into one fused kernel (5x faster than the separate passes on
    the CPU), or None where compilation is unavailable (no C++ compiler, say): the caller
    then takes the eager path. Compiled once per process, for any shape."""
    global _compiled_statistics, _fusion_failed
    if _fusion_failed:
        return None
    try:
        if _compiled_statistics is None:
            _compiled_statistics = torch.compile(token_statistics, dynamic=True)
        return _compiled_statistics(x, valid, active_threshold)
    except Exception as error:  # any backend failure: the eager path gives the same numbers
        _fusion_failed = True
        log.warning("per-token statistics not fused (%s: %s); computing them pass by pass",
                    error.__class__.__name__, str(error).splitlines()[0] if str(error) else "")
        return None


def observe(x: torch.Tensor, mask: TokenMask, poolings: Iterable[str], top_n: int,
            active_threshold: float, floor: torch.Tensor | None, fused: bool = False) -> BatchObservation:
    """Pool and summarize one site's [B, T, n] activations; `floor` is each unit's current
    N-th best peak (only batch peaks above it need their token position). With `fused`, the
    per-token statistics come from one compiled kernel; otherwise pass by pass."""
    x = x.float()  # half-precision sums lose too much; a no-op for float32 models
    n = x.shape[-1]
    batch, tokens = x.shape[0], x.shape[1]
    flat = x.reshape(batch * tokens, n)
    statistics = fused_token_statistics(x, mask.valid.unsqueeze(-1), active_threshold) if fused else None
    if statistics is not None:
        total, total_sq, positive, active, maxima, minima = statistics
        total, total_sq, positive, active = total.double(), total_sq.double(), positive.float(), active.float()
    else:
        maxima = mask.masked_extreme(x, largest=True)
        minima = mask.masked_extreme(x, largest=False)
        scratch = torch.empty_like(flat)
        # Sums over valid tokens as matrix-vector products; each indicator is written straight
        # into one scratch buffer as 0/1 floats (no bool tensor, no cast, one allocation).
        total = (mask.flat @ flat).squeeze(0).double()
        total_sq = (mask.flat @ torch.square(flat, out=scratch)).squeeze(0).double()
        positive = (mask.flat @ torch.gt(flat, 0, out=scratch)).squeeze(0)
        active = (mask.flat @ torch.gt(torch.abs(flat, out=scratch), active_threshold, out=scratch)).squeeze(0)
    pooled = {}
    for pooling in poolings:
        if pooling == "mean":
            pooled[pooling] = torch.bmm(mask.mean_weights, x).squeeze(1)
        elif pooling == "max":
            pooled[pooling] = maxima
        elif pooling == "last":
            pooled[pooling] = x[torch.arange(batch, device=x.device), mask.lengths - 1]
        else:
            raise ValueError(f"pooling: unknown {pooling!r} (choose from {', '.join(POOLINGS)})")

    k = min(top_n, batch)
    top_values, top_rows = torch.topk(maxima, k, dim=0)
    top_positions = torch.full_like(top_rows, -1)
    candidates = top_values > floor if floor is not None else torch.ones_like(top_values, dtype=torch.bool)
    slot, unit = candidates.nonzero(as_tuple=True)
    if slot.numel():
        rows = top_rows[slot, unit]
        traces = x[rows, :, unit].masked_fill(~mask.valid[rows], float("-inf"))  # [E, T]
        top_positions[slot, unit] = traces.argmax(1)
    return BatchObservation(pooled, total, total_sq, minima.amin(0), maxima.amax(0), positive, active,
                            top_values, top_rows, top_positions)


class SiteRecorder:
    """Installs one read hook per (site, layer); each forward fills `observations`."""

    def __init__(self, sites: MlpSites, site_names: Iterable[str], poolings: Iterable[str] = ("mean",),
                 top_n: int = 0, active_threshold: float = 0.0, fused: bool = False):
        self.sites = sites
        self.fused = fused
        self.site_names = tuple(site_names)
        sites.check(self.site_names)
        self.poolings = tuple(poolings)
        self.top_n = top_n
        self.active_threshold = active_threshold
        self.mask: TokenMask | None = None
        self.floors: dict[tuple[str, int], torch.Tensor] = {}
        self.observations: dict[tuple[str, int], BatchObservation] = {}

    def _hook(self, site: str, layer: int, is_input: bool):
        def read(module, args, output=None):
            x = args[0] if is_input else output
            if x.dim() == 2:  # OPT runs its MLP on [batch * tokens, features]
                x = x.view(*self.mask.valid.shape, -1)
            self.observations[(site, layer)] = observe(
                x, self.mask, self.poolings, max(self.top_n, 1), self.active_threshold,
                self.floors.get((site, layer)), self.fused)
        return read

    @contextlib.contextmanager
    def installed(self):
        handles = []
        try:
            for site in self.site_names:
                for layer in range(self.sites.n_layers):
                    point = self.sites.point(site, layer)
                    hook = self._hook(site, layer, point.is_input)
                    handles.append(point.module.register_forward_pre_hook(hook) if point.is_input
                                   else point.module.register_forward_hook(hook))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def start_batch(self, mask: TokenMask) -> None:
        self.mask = mask
        self.observations = {}

    def pooled_to_host(self, dtype: torch.dtype = torch.float32) -> dict[tuple[str, str], torch.Tensor]:
        """One device-to-host copy per (pooling, site): [layers, batch, units] tensors."""
        return {(pooling, site): torch.stack([self.observations[(site, layer)].pooled[pooling]
                                              for layer in range(self.sites.n_layers)]).to(dtype).cpu()
                for pooling in self.poolings for site in self.site_names}


def pooled_responses(model, sites: MlpSites, site_names, pooling: str, batch: dict[str, torch.Tensor],
                     exclude_first: bool = False) -> dict[str, torch.Tensor]:
    """Convenience for one right-padded batch: {site: [layers, batch, units]} of one pooling."""
    recorder = SiteRecorder(sites, site_names, (pooling,))
    with recorder.installed(), torch.inference_mode():
        recorder.start_batch(TokenMask.from_attention_mask(batch["attention_mask"], exclude_first))
        model(**batch, use_cache=False)
        pooled = recorder.pooled_to_host()
    return {site: pooled[(pooling, site)] for site in site_names}
