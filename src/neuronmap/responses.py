"""Storage of pooled responses: one Parquet file per extraction shard.

Rows are (site, layer, prompt_id, n_tokens, values) where `values` holds the responses of all
units of that site and layer to that prompt. Each row group holds one (site, layer) of one
batch, so a reader that needs one layer reads only that layer's bytes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import schemas
from .errors import NeuronmapError
from .parquet_io import open_parquet

VALUE_TYPES = {"float16": (pa.float16(), np.float16), "float32": (pa.float32(), np.float32)}


class ResponseWriter:
    """Streams batches of pooled responses into one shard file (no more than a batch in memory)."""

    def __init__(self, path: str | Path, dtype: str = "float16"):
        self.arrow_type, self.numpy_type = VALUE_TYPES[dtype]
        self.schema = schemas.responses(self.arrow_type)
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd", compression_level=1)

    def write_batch(self, prompt_ids: Sequence[str], n_tokens: Sequence[int], pooled: dict) -> None:
        """`pooled[site]` is a [layers, batch, units] array."""
        for site, values in pooled.items():
            values = np.asarray(values, dtype=self.numpy_type)
            n_layers, batch, units = values.shape
            for layer in range(n_layers):
                flat = pa.array(values[layer].reshape(-1), type=self.arrow_type)
                offsets = pa.array(np.arange(0, (batch + 1) * units, units, dtype=np.int32))
                table = pa.table({
                    "site": pa.array([site] * batch, pa.string()),
                    "layer": pa.array([layer] * batch, pa.int32()),
                    "prompt_id": pa.array(list(prompt_ids), pa.string()),
                    "n_tokens": pa.array(list(n_tokens), pa.int32()),
                    "values": pa.ListArray.from_arrays(offsets, flat),
                }, schema=self.schema)
                self.writer.write_table(table, row_group_size=batch)

    def close(self) -> None:
        self.writer.close()


class ResponseReader:
    """Reads the responses of chosen prompts for one (site, layer) block across shard files."""

    def __init__(self, paths: Sequence[str | Path]):
        self.files = []
        for path in paths:
            parquet = open_parquet(path)
            names = parquet.schema_arrow.names
            if names != schemas.responses(pa.float16()).names:
                raise NeuronmapError(f"{path}: not a responses file (columns {names})")
            index = defaultdict(list)
            meta = parquet.metadata
            site_col, layer_col = names.index("site"), names.index("layer")
            for i in range(meta.num_row_groups):
                group = meta.row_group(i)
                site_stats, layer_stats = group.column(site_col).statistics, group.column(layer_col).statistics
                if site_stats.min != site_stats.max or layer_stats.min != layer_stats.max:
                    raise NeuronmapError(f"{path}: row group {i} mixes sites or layers")
                index[(site_stats.min, int(layer_stats.min))].append(i)
            self.files.append((path, parquet, index))

    def blocks(self) -> list[tuple[str, int]]:
        keys = set()
        for _, _, index in self.files:
            keys.update(index)
        return sorted(keys)

    def read_block(self, site: str, layer: int, prompt_ids: Sequence[str]) -> np.ndarray:
        """[len(prompt_ids), units] float32, rows in the order of `prompt_ids`."""
        wanted = {pid: row for row, pid in enumerate(prompt_ids)}
        out = None
        found = 0
        for path, parquet, index in self.files:
            groups = index.get((site, layer), [])
            if not groups:
                continue
            table = parquet.read_row_groups(groups, columns=["prompt_id", "values"])
            ids = table.column("prompt_id").to_pylist()
            keep = [i for i, pid in enumerate(ids) if pid in wanted]
            if not keep:
                continue
            values = table.column("values").combine_chunks()
            width = len(values.values) // len(ids)
            block = values.values.to_numpy(zero_copy_only=False).reshape(len(ids), width)
            if out is None:
                out = np.empty((len(prompt_ids), width), dtype=np.float32)
            rows = [wanted[ids[i]] for i in keep]
            out[rows] = block[keep]
            found += len(keep)
        if found != len(prompt_ids):
            raise NeuronmapError(f"responses for {site} layer {layer}: found {found} of {len(prompt_ids)} prompts "
                                 f"in {len(self.files)} shard files")
        return out
