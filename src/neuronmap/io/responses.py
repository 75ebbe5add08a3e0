"""Storage of pooled responses: one Parquet file per extraction shard.

One row per prompt: `prompt_id`, `n_tokens`, and one column per (pooling, site, layer) named
`<pooling>/<site>/<layer>` (layer zero-padded to 3 digits) holding that site's units as one
fixed-size binary value: the little-endian float16 (or float32) array, which numpy views
without a copy. (A fixed-size list of floats reads the same but costs Parquet a repetition
level per value: writing it took 4x longer.) Parquet stores each column's bytes apart, so a
job that needs one layer reads only that layer's bytes; each batch is one row group, so
writing never holds more than a batch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import NeuronmapError
from . import tables
from .parquet import open_parquet

VALUE_TYPES = {"float16": pa.float16(), "float32": pa.float32()}


def unit_arrays(column: pa.ChunkedArray, field: pa.Field) -> list[np.ndarray]:
    """Zero-copy [rows, units] views of a responses column, one per chunk."""
    dtype = np.dtype(field.metadata[b"dtype"].decode())
    width = field.type.byte_width // dtype.itemsize
    return [np.frombuffer(chunk.buffers()[1], dtype, count=len(chunk) * width,
                          offset=chunk.offset * field.type.byte_width).reshape(len(chunk), width)
            for chunk in column.chunks]


def column_name(pooling: str, site: str, layer: int) -> str:
    return f"{pooling}/{site}/{layer:03d}"


class ResponseWriter:
    """Streams batches of pooled responses into one shard file."""

    def __init__(self, path: str | Path, widths: dict[str, int], n_layers: int, poolings: Sequence[str],
                 dtype: str = "float16"):
        self.dtype = np.dtype(dtype)
        self.schema = tables.responses(VALUE_TYPES[dtype], widths, n_layers, poolings)
        # Activations barely compress; storing them plain keeps writes and reads cheap.
        compression = {name: "none" for name in self.schema.names if "/" in name}
        compression.update(prompt_id="zstd", n_tokens="zstd")
        self.writer = pq.ParquetWriter(path, self.schema, compression=compression, use_dictionary=False,
                                       write_statistics=["prompt_id", "n_tokens"])

    def write_batch(self, prompt_ids: Sequence[str], n_tokens: Sequence[int], pooled: dict) -> None:
        """`pooled[(pooling, site)]` is a [layers, batch, units] array."""
        columns = {"prompt_id": pa.array(list(prompt_ids), pa.string()),
                   "n_tokens": pa.array(list(n_tokens), pa.int32())}
        for (pooling, site), values in pooled.items():
            values = np.asarray(values)
            for layer in range(values.shape[0]):
                name = column_name(pooling, site, layer)
                data = np.ascontiguousarray(values[layer], dtype=self.dtype)
                columns[name] = pa.FixedSizeBinaryArray.from_buffers(
                    self.schema.field(name).type, len(data), [None, pa.py_buffer(data)])
        self.writer.write_table(pa.table(columns, schema=self.schema))

    def close(self) -> None:
        self.writer.close()


class BackgroundWriter:
    """A ResponseWriter fed from another thread: `write_batch` queues a batch (at most `depth`
    wait; a full queue holds up the caller, so memory stays bounded) and returns; a writer
    thread gets each batch's arrays (`get_pooled()`, which may wait for a device copy), writes
    them and calls `done()`. An error in the thread is raised by the next `write_batch` or by
    `close`, which waits for every queued batch and closes the file. The file is the caller's
    temporary path, moved into place only when `close` succeeded (io.parquet.atomic_path)."""

    def __init__(self, writer: ResponseWriter, depth: int = 2):
        self.writer = writer
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="response-writer", daemon=True)
        self._thread.start()

    def write_batch(self, prompt_ids: Sequence[str], n_tokens: Sequence[int], get_pooled: Callable[[], dict],
                    done: Callable[[], None] | None = None) -> None:
        self._raise()
        self._queue.put((list(prompt_ids), list(n_tokens), get_pooled, done))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        try:
            self._raise()
        finally:
            self.writer.close()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            prompt_ids, n_tokens, get_pooled, done = item
            try:
                if self.error is None:  # after an error, batches are only drained (and released)
                    self.writer.write_batch(prompt_ids, n_tokens, get_pooled())
            except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
                self.error = error
            finally:
                if done is not None:
                    done()


class ResponseReader:
    """Reads the responses of chosen prompts to one (pooling, site, layer) across shard files."""

    def __init__(self, paths: Sequence[str | Path]):
        self.files = []
        for path in paths:
            parquet = open_parquet(path)
            names = parquet.schema_arrow.names
            if names[:2] != ["prompt_id", "n_tokens"]:
                raise NeuronmapError(f"{path}: not a responses file (columns {names[:4]}...)")
            ids = parquet.read(columns=["prompt_id"]).column("prompt_id").to_pylist()
            self.files.append((path, parquet, ids, set(names[2:])))

    def blocks(self, pooling: str) -> list[tuple[str, int]]:
        """Every (site, layer) stored for `pooling` in all files."""
        common = set.intersection(*(columns for *_, columns in self.files))
        keys = [tuple(name.split("/")[1:]) for name in common if name.startswith(f"{pooling}/")]
        return sorted((site, int(layer)) for site, layer in keys)

    def prompt_ids(self) -> list[str]:
        return [pid for _, _, ids, _ in self.files for pid in ids]

    def read_block(self, pooling: str, site: str, layer: int, prompt_ids: Sequence[str]) -> np.ndarray:
        """[len(prompt_ids), units] float32, rows in the order of `prompt_ids`."""
        name = column_name(pooling, site, layer)
        wanted = {pid: row for row, pid in enumerate(prompt_ids)}
        out = None
        found = 0
        for path, parquet, ids, columns in self.files:
            rows = [(i, wanted[pid]) for i, pid in enumerate(ids) if pid in wanted]
            if not rows:
                continue
            if name not in columns:
                raise NeuronmapError(f"{path}: no column {name} (extracted with other sites or poolings?)")
            table = parquet.read(columns=[name])
            chunks = unit_arrays(table.column(name), table.schema.field(name))
            width = chunks[0].shape[1] if chunks else 0
            if out is None:
                out = np.empty((len(prompt_ids), width), dtype=np.float32)
            block = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
            source, target = zip(*rows)
            out[list(target)] = block[list(source)]
            found += len(rows)
        if found != len(prompt_ids):
            raise NeuronmapError(f"responses {name}: found {found} of {len(prompt_ids)} prompts "
                                 f"in {len(self.files)} shard files")
        return out
