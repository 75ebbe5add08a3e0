"""Running records of one site's units over every token: moments to the fourth (Pebay's
pairwise update, exact in exact arithmetic whatever the grouping), firing counts, the extremes,
the histogram of io/histogram.py, and the contexts with the highest and lowest peaks.

On the CPU the per-token work is one call of the compiled kernel (native.py) per (site, layer)
and batch, on torch's OpenMP threads (`SiteRecords`). Elsewhere (a GPU), or without a compiler,
`TorchRecords` keeps the records of all the layers of a site on their device and reduces them
together: the hooks only hand over each layer's activations, and the layers of a chunk are
stacked and reduced in one call of fixed-shape ops. Nothing there reads a device value on the
host or makes a shape depend on data (no boolean indexing, no `int()` of a sum): the batch's
lengths, context ids and labels reach the device once per batch (`Batch`), padding is masked,
histograms add through a flat index with a dump slot for padding, and top and bottom contexts
are a fixed-k running `topk`. So a GPU runs ahead of the host through the whole forward;
tests/test_records_syncs.py counts the ops that would stop it.

Top and bottom contexts are kept as int64 keys that order by value and then by context id, so
a running top-k keeps exactly the contexts a global sort would, whatever the shards and batches.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import NeuronmapError
from ..io.histogram import BINS, bins_of
from . import native

STATE = ("mean", "m2", "m3", "m4", "n_positive", "n_active", "minimum", "maximum", "hist",
         "top_keys", "top_positions", "top_roots", "bottom_keys", "bottom_positions", "bottom_roots")
SCALARS = ("count", "rows")
LABEL_STATE = ("label_sum", "label_positive")


def order_key(values: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
    """int64 keys whose order is (value, then lower context id first): the float's bits made
    monotone in the high 32 bits, the complement of the context id in the low 32."""
    bits = values.float().contiguous().view(torch.int32).long()
    monotone = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (monotone << 32) | (0xFFFFFFFF - contexts.long())


def _best_first(keys: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keys, order = torch.sort(keys, dim=0, descending=True)
    return keys, positions.gather(0, order)


def key_values(keys: torch.Tensor) -> torch.Tensor:
    monotone = (keys >> 32).int()
    bits = torch.where(monotone < 0, monotone ^ 0x7FFFFFFF, monotone)
    return bits.view(torch.float32)


def key_contexts(keys: torch.Tensor) -> torch.Tensor:
    return 0xFFFFFFFF - (keys & 0xFFFFFFFF)


class SiteRecords:
    """Records of `width` units of one (site, layer), on `device`; `add` takes one batch of
    activations. On the CPU with the kernel, the kernel's own state; otherwise one layer of a
    `TorchRecords` (the engine groups a site's layers into one `TorchRecords` instead).

    With `labels` > 0, also per label the sum of the responses and the tokens > 0 (firing
    counts), and after each batch `row_means` [rows, width]: each context's mean response."""

    def __init__(self, width: int, top: int, bottom: int, threshold: float, device: torch.device,
                 labels: int = 0, compiled: bool = True):
        self.width, self.top, self.bottom, self.threshold = width, top, bottom, threshold
        self.labels = labels
        self.device = torch.device(device)
        self.kernel = native.load() if self.device.type == "cpu" and compiled else None
        if self.kernel is None:
            self._torch = TorchRecords(1, width, top, bottom, threshold, self.device, labels).layer(0)
            return
        self.count = 0   # tokens seen
        self.rows = 0    # contexts seen
        zeros = lambda dtype, *shape: torch.zeros(*shape, width, dtype=dtype)
        self.mean, self.m2, self.m3, self.m4 = (zeros(torch.float64) for _ in range(4))
        self.n_positive, self.n_active = zeros(torch.int64), zeros(torch.int64)
        self.minimum = torch.full((width,), float("inf"))
        self.maximum = torch.full((width,), float("-inf"))
        # Per shard a count fits int32 (the job checks its tokens); merged counts are int64.
        self.hist = torch.zeros(width, BINS, dtype=torch.int32)
        # The kernel keeps each unit's best contexts in a heap of fixed size, a unit's heap in its
        # row, with a copy of each heap's root (roots); `extremes()` gives the kept ones, best first.
        heap = lambda cap, dtype: torch.zeros(width, cap, dtype=dtype)
        self.top_keys, self.top_positions = heap(top, torch.int64), heap(top, torch.int32)
        self.bottom_keys, self.bottom_positions = heap(bottom, torch.int64), heap(bottom, torch.int32)
        self.top_roots, self.bottom_roots = torch.zeros(width, dtype=torch.int64), torch.zeros(width, dtype=torch.int64)
        self.label_sum = torch.zeros(labels, width, dtype=torch.float64)
        self.label_positive = torch.zeros(labels, width, dtype=torch.int64)
        self.row_means: torch.Tensor | None = None

    def __getattr__(self, name):
        # Only reached for what __init__ did not set: the torch layer's state.
        if name == "_torch":
            raise AttributeError(name)
        return getattr(self._torch, name)

    def add(self, x: torch.Tensor, lengths: torch.Tensor, contexts: torch.Tensor,
            row_labels: torch.Tensor | None = None) -> None:
        """x [rows, T, width] activations of a right-padded batch; lengths [rows] valid tokens
        (0 for a filler row); contexts [rows] their context ids; row_labels [rows] their label's
        index (with labels). Host tensors (the kernel's, or uploaded once for torch)."""
        if self.kernel is None:
            stack = self._torch.stack
            stack.begin(Batch.upload(np.asarray(lengths), np.asarray(contexts),
                                     None if row_labels is None else np.asarray(row_labels), x.shape[1], self.device))
            stack.put(0, x)
            return
        self._add_native(x.detach().to("cpu", torch.float32).contiguous(), lengths, contexts, row_labels)

    def extremes(self, ordered: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """kind -> (keys, positions) [kept, width] on the CPU: best first, or `ordered=False` in
        the heaps' order (the same rows)."""
        if self.kernel is None:
            return self._torch.extremes(ordered)
        out = {}
        for kind, keys, positions, cap in (("top", self.top_keys, self.top_positions, self.top),
                                           ("bottom", self.bottom_keys, self.bottom_positions, self.bottom)):
            kept = min(self.rows, cap)
            keys, positions = keys[:, :kept].T, positions[:, :kept].T
            out[kind] = _best_first(keys, positions) if ordered else (keys, positions)
        return out

    def _add_labels(self, lengths: torch.Tensor, row_labels: torch.Tensor, row_sums: torch.Tensor,
                    row_positive: torch.Tensor) -> None:
        """Fold each real row's sums and firing counts into its label's."""
        real = lengths > 0
        index = row_labels[real]
        self.label_sum.index_add_(0, index, row_sums[real])
        self.label_positive.index_add_(0, index, row_positive[real].long())

    def _add_native(self, x: torch.Tensor, lengths: torch.Tensor, contexts: torch.Tensor,
                    row_labels: torch.Tensor | None) -> None:
        rows, T, n = x.shape
        lengths = lengths.to(torch.int64).contiguous()
        contexts = contexts.to(torch.int64).contiguous()
        state = [self.mean, self.m2, self.m3, self.m4, self.n_positive, self.n_active, self.minimum,
                 self.maximum, self.hist]
        heaps = (self.top_keys.data_ptr(), self.top_positions.data_ptr(), self.top_roots.data_ptr(), self.top,
                 self.bottom_keys.data_ptr(), self.bottom_positions.data_ptr(), self.bottom_roots.data_ptr(),
                 self.bottom)
        if self.labels:
            row_means, row_positive = torch.zeros(rows, n, dtype=torch.float64), torch.zeros(rows, n, dtype=torch.int32)
            per_row = (row_means.data_ptr(), row_positive.data_ptr())
        else:
            per_row = (None, None)
        refused = self.kernel.records_reduce(x.data_ptr(), rows, T, n, lengths.data_ptr(), self.count,
                                             ctypes.c_float(self.threshold), *(t.data_ptr() for t in state),
                                             contexts.data_ptr(), self.rows, *heaps, *per_row,
                                             native.scatter_histogram(self.kernel))
        if refused:
            # Part of this batch is already in the records: going on would count it twice.
            raise NeuronmapError("out of host memory while adding a batch to the corpus records: lower "
                                 "corpus.batch_size or run fewer jobs at once; the job resumes from its last "
                                 "checkpoint")
        self.count += int(lengths.sum())
        self.rows += int((lengths > 0).sum())
        if self.labels:
            self.row_means = row_means
            self._add_labels(lengths, row_labels, row_means * lengths[:, None], row_positive)

    def state(self) -> dict[str, torch.Tensor | int]:
        if self.kernel is None:
            return self._torch.state()
        return {**{name: getattr(self, name) for name in SCALARS},
                **{name: getattr(self, name).cpu() for name in STATE + LABEL_STATE}}

    def load_state(self, state: dict) -> None:
        if self.kernel is None:
            self._torch.load_state(state)
            return
        for name in SCALARS:
            setattr(self, name, int(state[name]))
        for name in STATE + LABEL_STATE:
            setattr(self, name, state[name].to(self.device))


def merge_moments(n_a, a, n_b, b):
    """Pebay's pairwise update: (mean, m2, m3, m4) of two groups of n_a and n_b values (numpy or
    torch arrays; counts scalars or arrays), the m's being sums of powers of deviations from the
    group's mean. The records kernel does the same per context (records_kernel.c)."""
    mean_a, m2a, m3a, m4a = a
    mean_b, m2b, m3b, m4b = b
    n = n_a + n_b
    n = n + (n == 0)  # two empty groups merge to an empty one, not to NaN
    delta = mean_b - mean_a
    d2 = delta * delta
    m4 = (m4a + m4b + d2 * d2 * n_a * n_b * (n_a * n_a - n_a * n_b + n_b * n_b) / n ** 3
          + 6 * d2 * (n_a * n_a * m2b + n_b * n_b * m2a) / n ** 2 + 4 * delta * (n_a * m3b - n_b * m3a) / n)
    m3 = m3a + m3b + d2 * delta * n_a * n_b * (n_a - n_b) / n ** 2 + 3 * delta * (n_a * m2b - n_b * m2a) / n
    m2 = m2a + m2b + d2 * n_a * n_b / n
    return mean_a + delta * n_b / n, m2, m3, m4



# A key below every real one (order_key of any float, even -NaN, with a context id < 2^32 - 1):
# the empty places of a fixed-k top, and the padding rows of a batch, which never win.
EMPTY_KEY = -2 ** 63
# Activations reduced in one call of TorchRecords at most (layers x rows x tokens x units): its
# temporaries take up to about 30 bytes each (the stacked activations, a float32 and three
# float64 copies at the moments' peak), so about 1 GB besides the batch's activations.
# A small model's layers all fit in one call; a large one's are reduced a few layers at a time.
REDUCE_ELEMENTS = 2 ** 25


@dataclass(frozen=True)
class Batch:
    """One batch as the records need it: host counts, and the per-row tensors on the device,
    uploaded once (pinned and non-blocking on a GPU) for every layer and site."""
    n_tokens: int            # valid tokens of the batch (host)
    n_rows: int              # real rows (length > 0) (host)
    lengths: torch.Tensor    # [rows] int64
    contexts: torch.Tensor   # [rows] int64 context ids
    labels: torch.Tensor | None  # [rows] int64 label index (with labels)
    valid: torch.Tensor      # [rows, T] bool: the row's tokens, not padding
    real: torch.Tensor       # [rows] bool: not a filler row

    @classmethod
    def upload(cls, lengths: np.ndarray, contexts: np.ndarray, labels: np.ndarray | None, tokens: int,
               device: torch.device) -> "Batch":
        lengths = np.asarray(lengths, np.int64)
        packed = np.stack([lengths, np.asarray(contexts, np.int64),
                           np.zeros_like(lengths) if labels is None else np.asarray(labels, np.int64)])
        host = torch.from_numpy(packed)
        if torch.device(device).type == "cuda":
            host = host.pin_memory()
        lengths_d, contexts_d, labels_d = host.to(device, non_blocking=True)
        valid = torch.arange(tokens, device=device)[None, :] < lengths_d[:, None]
        return cls(int(lengths.sum()), int((lengths > 0).sum()), lengths_d, contexts_d,
                   None if labels is None else labels_d, valid, lengths_d > 0)


class TorchRecords:
    """Records of `layers` layers of one site on one device, each state tensor with the layer
    first ([layers, width], the histogram [layers, width, BINS], the kept contexts
    [layers, k, width]). Per batch: `begin(batch)`, then `put(i, x)` from the hook of the i-th
    layer; every `chunk` layers (all of them, unless REDUCE_ELEMENTS says fewer) the layers
    put are stacked and reduced in one call. `layer(i)` is the i-th layer's view, with the
    state, extremes and checkpoint state of a `SiteRecords`."""

    def __init__(self, layers: int, width: int, top: int, bottom: int, threshold: float, device: torch.device,
                 labels: int = 0, chunk: int | None = None):
        self.layers, self.width, self.top, self.bottom, self.threshold = layers, width, top, bottom, threshold
        self.labels, self.device = labels, torch.device(device)
        self.chunk = min(chunk or layers, layers)
        # All layers see the same batches; counts per layer all the same, kept on the host.
        self.count = np.zeros(layers, np.int64)  # tokens seen
        self.rows = np.zeros(layers, np.int64)   # contexts seen
        zeros = lambda dtype, *shape: torch.zeros(layers, *shape, width, dtype=dtype, device=self.device)
        self.mean, self.m2, self.m3, self.m4 = (zeros(torch.float64) for _ in range(4))
        self.n_positive, self.n_active = zeros(torch.int64), zeros(torch.int64)
        self.minimum = torch.full((layers, width), float("inf"), device=self.device)
        self.maximum = torch.full((layers, width), float("-inf"), device=self.device)
        # One flat histogram and a last slot where padding tokens go, so that every token of a
        # batch adds at a fixed-shape index. Per shard a count fits int32 (as the kernel's).
        dtype = torch.int32 if self.device.type == "cpu" else torch.int64
        self._flat_hist = torch.zeros(layers * width * BINS + 1, dtype=dtype, device=self.device)
        self.hist = self._flat_hist[:-1].view(layers, width, BINS)
        self._one = torch.ones(1, dtype=dtype, device=self.device)
        self._offsets = ((torch.arange(layers, device=self.device)[:, None] * width
                          + torch.arange(width, device=self.device)) * BINS).int()
        heap = lambda k, dtype, fill: torch.full((layers, k, width), fill, dtype=dtype, device=self.device)
        self.top_keys, self.top_positions = heap(top, torch.int64, EMPTY_KEY), heap(top, torch.int32, 0)
        self.bottom_keys, self.bottom_positions = heap(bottom, torch.int64, EMPTY_KEY), heap(bottom, torch.int32, 0)
        self.label_sum = zeros(torch.float64, labels)
        self.label_positive = zeros(torch.int64, labels)
        self.row_means: torch.Tensor | None = None  # [layers, rows, width] of the last batch (with labels)
        self.batch: Batch | None = None
        self._pending: list[torch.Tensor] = []

    @staticmethod
    def chunk_for(layers: int, rows: int, tokens: int, width: int) -> int:
        return max(1, min(layers, REDUCE_ELEMENTS // max(1, rows * tokens * width)))

    def layer(self, index: int) -> "LayerRecords":
        return LayerRecords(self, index)

    def begin(self, batch: Batch) -> None:
        self.batch = batch
        self._pending = []
        if self.labels:
            rows = batch.valid.shape[0]
            self.row_means = torch.empty(self.layers, rows, self.width, dtype=torch.float64, device=self.device)

    def put(self, index: int, x: torch.Tensor) -> None:
        """The activations [rows, T, width] (or [rows * T, width]) of the index-th layer."""
        self._pending.append(x)
        if (index + 1) % self.chunk and index + 1 < self.layers:
            return
        first = index + 1 - len(self._pending)
        if first != index - index % self.chunk:
            raise NeuronmapError(f"corpus records: the hooks of layers {first}..{index} fired out of order")
        stacked, self._pending = torch.stack(self._pending), []
        rows, tokens = self.batch.valid.shape
        self._reduce(first, stacked.view(stacked.shape[0], rows, tokens, self.width))

    def _reduce(self, first: int, x: torch.Tensor) -> None:
        """Fold x [layers, rows, T, width] (layers first .. first + layers - 1) into the records."""
        batch, layers = self.batch, slice(first, first + x.shape[0])
        x = x.float()
        valid = batch.valid[None, :, :, None]
        n_b = batch.n_tokens
        # Moments: the batch's central sums in float64 (the kernel's precision; the records equal
        # its to 1e-9), merged into the running float64 state.
        masked = torch.where(valid, x, 0.0).double()
        batch_mean = masked.sum((1, 2)) / max(n_b, 1)
        row_sums = masked.sum(2) if self.labels else None  # [layers, rows, width]
        # In place from here: the deviations overwrite the copy, their square is squared again.
        d = masked.sub_(batch_mean[:, None, None]).mul_(valid)
        d2 = d * d
        c2, c3 = d2.sum((1, 2)), (d2 * d).sum((1, 2))
        c4 = d2.square_().sum((1, 2))
        del masked, d, d2
        merged = merge_moments(int(self.count[first]), (self.mean[layers], self.m2[layers], self.m3[layers],
                                                        self.m4[layers]), n_b, (batch_mean, c2, c3, c4))
        for state, value in zip((self.mean, self.m2, self.m3, self.m4), merged):
            state[layers] = value
        positive = (x > 0) & valid
        self.n_positive[layers] += positive.sum((1, 2))
        self.n_active[layers] += ((x.abs() > self.threshold) & valid).sum((1, 2))
        if self.labels:
            self.row_means[layers] = row_sums / batch.lengths.clamp(min=1)[:, None]
            # A filler row adds zeros (its sums and counts are 0), so no row is left out.
            index = batch.labels.clamp(min=0)
            self.label_sum[layers] = self.label_sum[layers].index_add(1, index, row_sums)
            self.label_positive[layers] = self.label_positive[layers].index_add(1, index, positive.sum(2))
        del positive
        # Histogram: every token adds one at (layer, unit, bin), padding at the dump slot.
        flat = bins_of(x, torch.int32) + self._offsets[layers][:, None, None, :]
        flat = torch.where(valid, flat, self._flat_hist.shape[0] - 1)
        self._flat_hist.index_add_(0, flat.view(-1), self._one.expand(flat.numel()))
        del flat
        # Extremes and each context's peak; a filler row's peaks are -inf / inf, its keys empty.
        row_max, row_argmax = torch.where(valid, x, float("-inf")).max(2)
        row_min, row_argmin = torch.where(valid, x, float("inf")).min(2)
        self.maximum[layers] = torch.maximum(self.maximum[layers], row_max.amax(1))
        self.minimum[layers] = torch.minimum(self.minimum[layers], row_min.amin(1))
        contexts, real = batch.contexts[:, None], batch.real[:, None]
        self._keep(self.top_keys, self.top_positions, layers,
                   torch.where(real, order_key(row_max, contexts), EMPTY_KEY), row_argmax)
        self._keep(self.bottom_keys, self.bottom_positions, layers,
                   torch.where(real, order_key(-row_min, contexts), EMPTY_KEY), row_argmin)
        self.count[layers] += n_b
        self.rows[layers] += batch.n_rows

    @staticmethod
    def _keep(keys, positions, layers: slice, new_keys, new_positions) -> None:
        """The k highest of the kept and the new keys [layers, rows, width], in place (fixed k)."""
        k = keys.shape[1]
        if k == 0:
            return
        best, order = torch.topk(torch.cat([keys[layers], new_keys], 1), k, dim=1)
        positions[layers] = torch.cat([positions[layers], new_positions.int()], 1).gather(1, order)
        keys[layers] = best


class LayerRecords:
    """One layer of a TorchRecords, read and checkpointed as a SiteRecords is."""
    kernel = None

    def __init__(self, stack: TorchRecords, index: int):
        self.stack, self.index = stack, index
        self.width, self.top, self.bottom = stack.width, stack.top, stack.bottom

    def __getattr__(self, name):
        if name in STATE + LABEL_STATE + ("row_means",) and name not in ("top_roots", "bottom_roots"):
            value = getattr(self.stack, name)
            return None if value is None else value[self.index]
        if name in ("top_roots", "bottom_roots"):
            return torch.zeros(0, dtype=torch.int64)
        raise AttributeError(name)

    @property
    def count(self) -> int:
        return int(self.stack.count[self.index])

    @property
    def rows(self) -> int:
        return int(self.stack.rows[self.index])

    def _kept(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        cap = self.top if kind == "top" else self.bottom
        kept = min(self.rows, cap)
        keys, positions = getattr(self.stack, f"{kind}_keys"), getattr(self.stack, f"{kind}_positions")
        return keys[self.index, :kept].cpu(), positions[self.index, :kept].cpu()

    def extremes(self, ordered: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """kind -> (keys, positions) [kept, width] on the CPU, best first unless `ordered=False`."""
        return {kind: _best_first(*self._kept(kind)) if ordered else self._kept(kind) for kind in ("top", "bottom")}

    def state(self) -> dict[str, torch.Tensor | int]:
        state = {"count": self.count, "rows": self.rows}
        for name in STATE + LABEL_STATE:
            kind = name.split("_")[0]
            if name.endswith("_roots"):
                state[name] = torch.zeros(0, dtype=torch.int64)
            elif kind in ("top", "bottom"):
                state[name] = self._kept(kind)[0 if name.endswith("_keys") else 1]
            else:
                state[name] = getattr(self, name).cpu()
        return state

    def load_state(self, state: dict) -> None:
        self.stack.count[self.index], self.stack.rows[self.index] = int(state["count"]), int(state["rows"])
        for name in STATE + LABEL_STATE:
            if name.endswith("_roots"):
                continue
            target = getattr(self.stack, name)[self.index]
            if name.startswith(("top_", "bottom_")):
                target.fill_(EMPTY_KEY if name.endswith("_keys") else 0)
                target = target[:state[name].shape[0]]
            target.copy_(state[name].to(target.dtype))
