"""The corpus records pass: one shard's contexts through the model, every site of every layer
read in the same forward pass and folded into its running records (reductions.py) at once, so
memory holds one batch's activations and the records, never the corpus.

Every batch has the same shape (batch_size contexts padded to context_tokens), so the first
batch shows whether memory suffices and the allocator reuses the same buffers batch after
batch. On a GPU (or wherever the C kernel does not run) a site's layers are reduced together
(reductions.TorchRecords): the per-row tensors reach the device once per batch, the hooks hand
over activations, and nothing reads a device value until the responses of a batch (with labels)
or a checkpoint. Every `checkpoint_minutes` the running records are saved (atomically, beside the
outputs): a killed job restarts from there and ends with the records an uninterrupted run
gives, since the remaining batches are the same batches in the same order.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import torch
from tqdm import tqdm

from ..errors import NeuronmapError
from ..io import tables
from ..io.histogram import to_runs
from ..io.parquet import atomic_path, dictionary_strings, storage_schema, write_row_groups
from ..io.responses import ResponseWriter
from ..model.architectures import MlpSites
from ..model.batching import is_out_of_memory
from ..model.dispatch import input_device, site_device
from . import native
from .reductions import Batch, SiteRecords, TorchRecords, key_contexts, key_values
from .settings import RecordsSettings

log = logging.getLogger(__name__)

# A shard's histogram counts are int32 on the CPU; the merge adds them as int64.
MAX_SHARD_TOKENS = 2 ** 31 - 1
# Raised whenever the running records' layout changes (2: the kernel's heaps one row per unit,
# with their roots), so that a checkpoint of an older version is started over, not misread.
CHECKPOINT_FORMAT = 2


@dataclass(frozen=True)
class RecordsOutputs:
    units: Path        # tables.RECORDS_PARTIAL, one row group per layer
    extremes: Path     # tables.EXTREMES_PARTIAL, one row group per layer
    checkpoint: Path   # the running records while the job runs
    labels: Path | None = None     # tables.LABEL_RECORDS_PARTIAL, one row group per layer (with labels)
    responses: Path | None = None  # each context's mean response at the response sites (io/responses.py)

    @property
    def spill(self) -> Path:
        """Context responses of the batches done, raw float16 rows, until the job ends."""
        return self.checkpoint.with_name(self.checkpoint.stem + ".responses.bin")


class RecordsPass:
    def __init__(self, model, contexts: pl.DataFrame, settings: RecordsSettings, context_tokens: int,
                 pad_token_id: int | None, labels: list[str] | None = None,
                 response_sites: tuple[str, ...] = ()):
        self.model, self.settings, self.context_tokens = model, settings, context_tokens
        self.pad = pad_token_id if pad_token_id is not None else 0
        self.contexts = contexts.sort("context_id")
        if int(self.contexts["n_tokens"].sum()) > MAX_SHARD_TOKENS:
            raise NeuronmapError(f"a shard holds more than {MAX_SHARD_TOKENS} tokens: raise corpus.shards")
        self.device = input_device(model)
        self.sites = MlpSites(model)
        self.sites.check(settings.sites)
        # Labels of the whole corpus, so that every shard numbers them alike.
        self.labels = list(labels or [])
        self.row_labels = self.contexts["label"].replace_strict(
            self.labels, list(range(len(self.labels))), default=-1, return_dtype=pl.Int64).to_numpy() \
            if self.labels else None
        self.response_sites = tuple(response_sites)
        self.records, self.stacks = self._make_records()
        missing = set(self.response_sites) - set(settings.sites)
        if missing:
            raise NeuronmapError(f"labels.sites {sorted(missing)} are not among the recorded sites {list(settings.sites)}")
        self.batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self.tokens = 0

    def _make_records(self):
        """(site, layer) -> its records: the kernel's per layer where the layer runs on the CPU and
        the kernel compiled, else a view of the TorchRecords of the site's consecutive layers on
        that device (`stacks`: (site, layers, TorchRecords), reduced together)."""
        settings, n_layers = self.settings, self.sites.n_layers
        top, bottom = max(settings.peak_token_contexts, settings.examples), settings.examples
        kernel = native.load()
        records, stacks = {}, []
        for site in settings.sites:
            width, groups = self.sites.width(site), []  # (device, consecutive layers)
            for layer in range(n_layers):
                device = site_device(self.sites, site, layer)
                if device.type == "cpu" and kernel is not None:
                    records[(site, layer)] = SiteRecords(width, top, bottom, settings.active_threshold, device,
                                                         len(self.labels))
                elif groups and groups[-1][0] == device and groups[-1][1][-1] == layer - 1:
                    groups[-1][1].append(layer)
                else:
                    groups.append((device, [layer]))
            for device, layers in groups:
                chunk = TorchRecords.chunk_for(len(layers), settings.batch_size, self.context_tokens, width)
                stack = TorchRecords(len(layers), width, top, bottom, settings.active_threshold, device,
                                     len(self.labels), chunk)
                stacks.append((site, layers, stack))
                records.update({(site, layer): stack.layer(i) for i, layer in enumerate(layers)})
        return records, stacks

    def batches(self) -> list[tuple[int, int]]:
        size = self.settings.batch_size
        return [(start, min(start + size, self.contexts.height)) for start in range(0, self.contexts.height, size)]

    def fingerprint(self) -> str:
        """What a checkpoint must have been made from to be resumed: these settings, contexts and
        model, and this layout of the records."""
        digest = hashlib.sha256(f"records checkpoint {CHECKPOINT_FORMAT}".encode())
        digest.update(self.settings.to_json().encode())
        digest.update(np.asarray(self.contexts["context_id"].to_numpy(), np.int64).tobytes())
        digest.update(np.asarray(self.contexts["n_tokens"].to_numpy(), np.int64).tobytes())
        digest.update(repr((self.context_tokens, self.model.config.to_json_string(), self.labels,
                            self.response_sites)).encode())
        return digest.hexdigest()

    def run(self, outputs: RecordsOutputs) -> int:
        batches = self.batches()
        done = self._resume(outputs.checkpoint)
        last_save = time.monotonic()
        token_ids = self.contexts["token_ids"].to_list()
        context_ids = self.contexts["context_id"].to_numpy()
        spill = self._open_spill(outputs.spill, batches[done][0] if done < len(batches) else self.contexts.height)
        with self._installed(), torch.inference_mode(), spill:
            progress = tqdm(total=len(batches), initial=done, desc=f"records {outputs.units.name}", unit="batch",
                            mininterval=5)
            for index in range(done, len(batches)):
                start, stop = batches[index]
                labels = self.row_labels[start:stop] if self.row_labels is not None else None
                self._forward(token_ids[start:stop], context_ids[start:stop], labels)
                self._spill_responses(spill, stop - start)
                progress.update()
                if time.monotonic() - last_save >= 60 * self.settings.checkpoint_minutes:
                    self._save(outputs.checkpoint, index + 1, spill)
                    last_save = time.monotonic()
            progress.close()
        self.tokens = int(self.contexts["n_tokens"].sum())
        files = [(self._unit_parts, outputs.units, tables.RECORDS_PARTIAL),
                 (self._extreme_parts, outputs.extremes, tables.EXTREMES_PARTIAL)]
        if outputs.labels is not None:
            files.append((self._label_parts, outputs.labels, tables.LABEL_RECORDS_PARTIAL))
        # Side by side: Arrow builds and encodes without the GIL, and the pass's threads are idle now.
        with ThreadPoolExecutor(len(files)) as pool:
            for done in [pool.submit(write_row_groups, parts(), path, schema, delta_integers=True)
                         for parts, path, schema in files]:
                done.result()
        if outputs.responses is not None:
            self._write_responses(outputs.spill, outputs.responses)
        outputs.checkpoint.unlink(missing_ok=True)
        outputs.spill.unlink(missing_ok=True)
        log.info("records of %d contexts (%d tokens) in %d batches", self.contexts.height, self.tokens, len(batches))
        return self.tokens

    def _forward(self, rows: list, contexts: np.ndarray, labels: np.ndarray | None) -> None:
        # The batch is built in numpy: on the host, nothing here is a device tensor to wait for.
        lengths = np.array([len(row) for row in rows], np.int64)
        ids = np.full((len(rows), self.context_tokens), self.pad, np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
        attention = (np.arange(self.context_tokens)[None, :] < lengths[:, None]).astype(np.int64)
        contexts = np.asarray(contexts, np.int64)
        if any(isinstance(records, SiteRecords) for records in self.records.values()):  # the kernel's, on the host
            self.batch = (torch.from_numpy(lengths), torch.from_numpy(contexts.copy()),
                          None if labels is None else torch.from_numpy(labels.copy()))
        uploaded = {}
        for _, _, stack in self.stacks:
            if stack.device not in uploaded:
                uploaded[stack.device] = Batch.upload(lengths, contexts, labels, self.context_tokens, stack.device)
            stack.begin(uploaded[stack.device])
        try:
            self.model(input_ids=_to_device(ids, self.device), attention_mask=_to_device(attention, self.device),
                       use_cache=False, logits_to_keep=1)
        except RuntimeError as error:
            if is_out_of_memory(error):
                # Records already hold part of this batch: a retry would count it twice. Every
                # batch has this shape, so a smaller one is the fix, for the whole run.
                raise NeuronmapError(f"out of memory on a batch of {len(rows)} contexts of {self.context_tokens} "
                                     "tokens: lower corpus.batch_size") from None
            raise

    @contextlib.contextmanager
    def _installed(self):
        handles = []
        try:
            for (site, layer), records in self.records.items():
                if isinstance(records, SiteRecords):
                    point = self.sites.point(site, layer)
                    handles.append(point.register(self._hook(records, point.is_input)))
            for site, layers, stack in self.stacks:
                for index, layer in enumerate(layers):
                    point = self.sites.point(site, layer)
                    handles.append(point.register(self._stack_hook(stack, index, point.is_input)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, records: SiteRecords, is_input: bool):
        def read(module, args, output=None):
            x = args[0] if is_input else output
            lengths, contexts, labels = self.batch
            if x.dim() == 2:  # OPT runs its MLP on [batch * tokens, features]
                x = x.view(lengths.shape[0], self.context_tokens, -1)
            records.add(x, lengths, contexts, labels)
        return read

    @staticmethod
    def _stack_hook(stack: TorchRecords, index: int, is_input: bool):
        def read(module, args, output=None):
            stack.put(index, args[0] if is_input else output)
        return read

    def _open_spill(self, path: Path, rows_done: int):
        """The spill file, cut back to the rows of the batches done (a killed job may have
        written past its last checkpoint)."""
        if not self.response_sites:
            return contextlib.nullcontext()
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "r+b" if path.exists() else "w+b")
        handle.truncate(rows_done * self._response_width() * 2)
        handle.seek(0, 2)
        return handle

    def _response_width(self) -> int:
        return sum(self.sites.width(site) for site in self.response_sites) * self.sites.n_layers

    def _spill_responses(self, spill, rows: int) -> None:
        if not self.response_sites:
            return
        parts = []
        for site in self.response_sites:
            # [rows, layers * width] per site, layer after layer: a TorchRecords' layers at once.
            pieces = [(layers[0], stack.row_means[:, :rows].to(torch.float16).permute(1, 0, 2).reshape(rows, -1))
                      for s, layers, stack in self.stacks if s == site]
            pieces += [(layer, self.records[(site, layer)].row_means[:rows].to(torch.float16))
                       for layer in range(self.sites.n_layers) if isinstance(self.records[(site, layer)], SiteRecords)]
            parts += [piece for _, piece in sorted(pieces, key=lambda p: p[0])]
        # The batch's one copy from the device (where the records are all on one).
        if len({part.device for part in parts}) > 1:
            parts = [part.cpu() for part in parts]
        spill.write(torch.cat(parts, dim=1).cpu().numpy().tobytes())

    def _write_responses(self, spill: Path, out: Path, chunk: int = 256) -> None:
        """The spilled rows as a responses file (io/responses.py), `chunk` contexts at a time."""
        widths = {site: self.sites.width(site) for site in self.response_sites}
        values = np.memmap(spill, np.float16, "r", shape=(self.contexts.height, self._response_width()))
        ids = [str(c) for c in self.contexts["context_id"].to_list()]
        n_tokens = self.contexts["n_tokens"].to_list()
        with atomic_path(out) as tmp:
            writer = ResponseWriter(tmp, widths, self.sites.n_layers, ["mean"], "float16")
            for start in range(0, len(ids), chunk):
                block = np.asarray(values[start:start + chunk])
                pooled, offset = {}, 0
                for site, width in widths.items():
                    size = width * self.sites.n_layers
                    pooled[("mean", site)] = block[:, offset:offset + size].reshape(
                        len(block), self.sites.n_layers, width).transpose(1, 0, 2)
                    offset += size
                writer.write_batch(ids[start:start + chunk], n_tokens[start:start + chunk], pooled)
            writer.close()
        del values

    def _save(self, path: Path, batches_done: int, spill=None) -> None:
        if self.response_sites:
            spill.flush()
            os.fsync(spill.fileno())
        state = {"fingerprint": self.fingerprint(), "batches_done": batches_done,
                 "records": {key: records.state() for key, records in self.records.items()}}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        log.info("checkpoint after %d batches: %s", batches_done, path)

    def _resume(self, path: Path) -> int:
        if not path.exists():
            return 0
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a checkpoint is only ever replaced whole; anything else is not ours
            log.warning("checkpoint %s unreadable (%s); starting the shard over", path, error)
            return 0
        if state.get("fingerprint") != self.fingerprint():
            log.warning("checkpoint %s was made with other settings, contexts or model; starting the shard over", path)
            return 0
        for key, records in self.records.items():
            records.load_state(state["records"][key])
        log.info("resumed from %s after %d batches", path, state["batches_done"])
        return int(state["batches_done"])

    def _unit_parts(self):
        for layer in range(self.sites.n_layers):
            parts = []
            for site in self.settings.sites:
                r = self.records[(site, layer)]
                first, run = to_runs(r.hist.cpu().numpy())
                parts.append(pa.table({
                    "site": _repeated(site, r.width), "layer": np.full(r.width, layer, np.int32),
                    "unit": np.arange(r.width, dtype=np.int32), "count": np.full(r.width, r.count, np.int64),
                    "mean": r.mean.cpu().numpy(), "m2": r.m2.cpu().numpy(), "m3": r.m3.cpu().numpy(),
                    "m4": r.m4.cpu().numpy(), "min": r.minimum.cpu().numpy(), "max": r.maximum.cpu().numpy(),
                    "n_positive": r.n_positive.cpu().numpy(), "n_active": r.n_active.cpu().numpy(),
                    "hist_first": first, "hist_run": run}))
            yield pa.concat_tables([_stored(p, tables.RECORDS_PARTIAL) for p in parts])

    def _label_parts(self):
        # A label's tokens and contexts are the same for every unit: counted once, from the contexts.
        per_label = self.contexts.group_by("label").agg(tokens=pl.col("n_tokens").sum(), contexts=pl.len())
        tokens = dict(zip(per_label["label"], per_label["tokens"]))
        contexts = dict(zip(per_label["label"], per_label["contexts"]))
        for layer in range(self.sites.n_layers):
            parts = []
            for site in self.settings.sites:
                r = self.records[(site, layer)]
                for index, label in enumerate(self.labels):
                    parts.append(_stored(pa.table({
                        "site": _repeated(site, r.width), "layer": np.full(r.width, layer, np.int32),
                        "unit": np.arange(r.width, dtype=np.int32), "label": _repeated(label, r.width),
                        "tokens": np.full(r.width, tokens.get(label, 0), np.int64),
                        "contexts": np.full(r.width, contexts.get(label, 0), np.int64),
                        "sum": r.label_sum[index].cpu().numpy(), "n_positive": r.label_positive[index].cpu().numpy()}),
                        tables.LABEL_RECORDS_PARTIAL))
            yield pa.concat_tables(parts)

    def _extreme_parts(self):
        for layer in range(self.sites.n_layers):
            parts = []
            for site in self.settings.sites:
                # The merge ranks every shard's rows together: a job hands them over unsorted.
                for kind, (keys, positions) in self.records[(site, layer)].extremes(ordered=False).items():
                    kept, width = keys.shape
                    sign = 1.0 if kind == "top" else -1.0
                    rows = keys.numel()
                    parts.append(_stored(pa.table({
                        "site": _repeated(site, rows), "layer": np.full(rows, layer, np.int32),
                        "unit": np.tile(np.arange(width, dtype=np.int32), kept), "kind": _repeated(kind, rows),
                        "value": (sign * key_values(keys)).numpy().ravel(),
                        "context_id": key_contexts(keys).numpy().ravel(), "position": positions.numpy().ravel()}),
                        tables.EXTREMES_PARTIAL))
            yield pa.concat_tables(parts)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`: from pinned memory without waiting, on a GPU."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _stored(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` cast to its file's contract, its dictionary columns kept (io/parquet.py)."""
    return table.select(schema.names).cast(storage_schema(table.schema, schema))


def _repeated(text: str, rows: int) -> pa.Array:
    """A string column of one value, as a dictionary (a Python list of millions costs seconds,
    and so does a string per row; io/parquet.py writes the dictionary as it is)."""
    return dictionary_strings(np.zeros(rows, np.int8), [text])
