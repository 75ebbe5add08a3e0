"""Running records of one (site, layer) over every token: moments to the fourth (Pebay's
pairwise update, exact in exact arithmetic whatever the grouping), firing counts, the extremes,
the histogram of io/histogram.py, and the contexts with the highest and lowest peaks.

On the CPU the per-token work is one call of the compiled kernel (native.py) per batch, on
torch's OpenMP threads; elsewhere (a GPU), or without a compiler, the same records come from
torch code.
Top and bottom contexts are kept as int64 keys that order by value and then by context id, so
a running top-k keeps exactly the contexts a global sort would, whatever the shards and batches.
"""

from __future__ import annotations

import ctypes

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


def key_values(keys: torch.Tensor) -> torch.Tensor:
    monotone = (keys >> 32).int()
    bits = torch.where(monotone < 0, monotone ^ 0x7FFFFFFF, monotone)
    return bits.view(torch.float32)


def key_contexts(keys: torch.Tensor) -> torch.Tensor:
    return 0xFFFFFFFF - (keys & 0xFFFFFFFF)


class SiteRecords:
    """Records of `width` units, on `device`; `add` takes one batch of activations.

    With `labels` > 0, also per label the sum of the responses and the tokens > 0 (firing
    counts), and after each batch `row_means` [rows, width]: each context's mean response."""

    def __init__(self, width: int, top: int, bottom: int, threshold: float, device: torch.device,
                 labels: int = 0, compiled: bool = True):
        self.width, self.top, self.bottom, self.threshold = width, top, bottom, threshold
        self.labels = labels
        self.device = torch.device(device)
        self.count = 0   # tokens seen
        self.rows = 0    # contexts seen
        cpu = self.device.type == "cpu"
        zeros = lambda dtype, *shape: torch.zeros(*shape, width, dtype=dtype, device=self.device)
        self.mean, self.m2, self.m3, self.m4 = (zeros(torch.float64) for _ in range(4))
        self.n_positive, self.n_active = zeros(torch.int64), zeros(torch.int64)
        self.minimum = torch.full((width,), float("inf"), device=self.device)
        self.maximum = torch.full((width,), float("-inf"), device=self.device)
        # Per shard a count fits int32 (the job checks its tokens); merged counts are int64.
        self.hist = torch.zeros(width, BINS, dtype=torch.int32 if cpu else torch.int64, device=self.device)
        self.kernel = native.load() if cpu and compiled else None
        # The kernel keeps each unit's best contexts in a heap of fixed size, a unit's heap in its
        # row, with a copy of each heap's root (roots); torch, sorted [kept, width] rows that grow
        # to that size. Either way `extremes()` gives the kept ones, best first.
        if self.kernel is not None:
            heap = lambda cap, dtype: torch.zeros(width, cap, dtype=dtype)
            roots = lambda: torch.zeros(width, dtype=torch.int64)
        else:
            heap = lambda cap, dtype: torch.zeros(0, width, dtype=dtype, device=self.device)
            roots = lambda: torch.zeros(0, dtype=torch.int64)
        self.top_keys, self.top_positions = heap(top, torch.int64), heap(top, torch.int32)
        self.bottom_keys, self.bottom_positions = heap(bottom, torch.int64), heap(bottom, torch.int32)
        self.top_roots, self.bottom_roots = roots(), roots()
        self.label_sum = torch.zeros(labels, width, dtype=torch.float64, device=self.device)
        self.label_positive = torch.zeros(labels, width, dtype=torch.int64, device=self.device)
        self.row_means: torch.Tensor | None = None

    def add(self, x: torch.Tensor, lengths: torch.Tensor, contexts: torch.Tensor,
            row_labels: torch.Tensor | None = None) -> None:
        """x [rows, T, width] activations of a right-padded batch; lengths [rows] valid tokens
        (0 for a filler row); contexts [rows] their context ids; row_labels [rows] their label's
        index (with labels)."""
        if self.kernel is not None:
            self._add_native(x.detach().to("cpu", torch.float32).contiguous(), lengths, contexts, row_labels)
            return
        row_max, row_argmax, row_min, row_argmin = self._add_torch(x.float(), lengths.to(x.device), row_labels)
        real = (lengths > 0).to(row_max.device)
        contexts = contexts.to(row_max.device)[real][:, None].expand(-1, self.width)
        row_max, row_min = row_max[real], row_min[real]
        self.top_keys, self.top_positions = _keep_highest(
            self.top_keys, self.top_positions, order_key(row_max, contexts), row_argmax[real], self.top)
        self.bottom_keys, self.bottom_positions = _keep_highest(
            self.bottom_keys, self.bottom_positions, order_key(-row_min, contexts), row_argmin[real], self.bottom)
        self.rows += int(real.sum())

    def extremes(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """kind -> (keys, positions) [kept, width] on the CPU, best first."""
        out = {}
        for kind, keys, positions, cap in (("top", self.top_keys, self.top_positions, self.top),
                                           ("bottom", self.bottom_keys, self.bottom_positions, self.bottom)):
            kept = min(self.rows, cap)
            if self.kernel is not None:
                keys, positions = keys[:, :kept].T, positions[:, :kept].T
            keys, positions = keys[:kept].cpu(), positions[:kept].cpu()
            keys, order = torch.sort(keys, dim=0, descending=True)
            out[kind] = (keys, positions.gather(0, order))
        return out

    def _add_labels(self, lengths: torch.Tensor, row_labels: torch.Tensor, row_sums: torch.Tensor,
                    row_positive: torch.Tensor) -> None:
        """Fold each real row's sums and firing counts into its label's."""
        real = lengths.cpu() > 0
        index = row_labels.cpu()[real].to(self.device)
        self.label_sum.index_add_(0, index, row_sums[real.to(row_sums.device)].to(self.device))
        self.label_positive.index_add_(0, index, row_positive[real.to(row_positive.device)].long().to(self.device))

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
                                             contexts.data_ptr(), self.rows, *heaps, *per_row)
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

    def _add_torch(self, x: torch.Tensor, lengths: torch.Tensor, row_labels: torch.Tensor | None):
        rows, T, _ = x.shape
        valid = (torch.arange(T, device=x.device)[None, :] < lengths[:, None])[..., None]
        n_b = int(lengths.sum())
        masked = torch.where(valid, x, 0.0).double()
        batch_mean = masked.sum((0, 1)) / n_b
        d = torch.where(valid, x.double() - batch_mean, 0.0)
        d2 = d * d
        c2, c3, c4 = d2.sum((0, 1)), (d2 * d).sum((0, 1)), (d2 * d2).sum((0, 1))
        self._merge_moments(n_b, batch_mean, c2, c3, c4)
        positive = (x > 0) & valid
        self.n_positive += positive.sum((0, 1))
        if self.labels:
            row_sums = masked.sum(1)
            self.row_means = (row_sums / lengths.clamp(min=1)[:, None]).cpu()
            self._add_labels(lengths, row_labels, row_sums, positive.sum(1))
        self.n_active += ((x.abs() > self.threshold) & valid).sum((0, 1))
        index = bins_of(x) + torch.arange(self.width, device=x.device) * BINS
        flat = self.hist.view(-1)
        flat.index_add_(0, index[valid.expand_as(x)], torch.ones(1, dtype=flat.dtype, device=x.device)
                        .expand(int(valid.sum()) * self.width))
        row_max, row_argmax = torch.where(valid, x, float("-inf")).max(1)
        row_min, row_argmin = torch.where(valid, x, float("inf")).min(1)
        real = lengths > 0
        if bool(real.any()):
            torch.maximum(self.maximum, row_max[real].amax(0), out=self.maximum)
            torch.minimum(self.minimum, row_min[real].amin(0), out=self.minimum)
        self.count += n_b
        return row_max, row_argmax.int(), row_min, row_argmin.int()

    def _merge_moments(self, n_b: int, mean_b, c2, c3, c4) -> None:
        self.mean, self.m2, self.m3, self.m4 = merge_moments(
            self.count, (self.mean, self.m2, self.m3, self.m4), n_b, (mean_b, c2, c3, c4))

    def state(self) -> dict[str, torch.Tensor | int]:
        return {**{name: getattr(self, name) for name in SCALARS},
                **{name: getattr(self, name).cpu() for name in STATE + LABEL_STATE}}

    def load_state(self, state: dict) -> None:
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


def _keep_highest(keys, positions, new_keys, new_positions, k: int):
    if k == 0:
        return keys, positions
    keys = torch.cat([keys, new_keys])
    positions = torch.cat([positions, new_positions.to(positions.dtype)])
    best, order = torch.topk(keys, min(k, keys.shape[0]), dim=0)
    return best, positions.gather(0, order)
