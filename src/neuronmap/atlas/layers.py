"""Reading one layer of a per-unit file, lazily, with a small cache.

The corpus files have one row group per layer: a card reads that group alone
(`ParquetFile.read_row_group`), found by the row groups' statistics of `layer`, so that it never
reads the other layers. A file written as one group (or whose groups span layers) is read a
group at a time all the same; the cache keeps the last few groups read, whichever file they are of.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from ..io.parquet import open_parquet


class GroupCache:
    """The `size` row groups read last (least recently used goes first); safe across threads."""

    def __init__(self, size: int):
        self.size = size
        self.groups: OrderedDict[tuple, pl.DataFrame] = OrderedDict()
        self.lock = threading.Lock()
        self.reads = 0  # row groups read from disk (the tests count them)

    def get(self, key: tuple, read) -> pl.DataFrame:
        with self.lock:
            if key in self.groups:
                self.groups.move_to_end(key)
                return self.groups[key]
            # Read under the lock: two requests for one layer read it once.
            frame = read()
            self.reads += 1
            self.groups[key] = frame
            if len(self.groups) > self.size:
                self.groups.popitem(last=False)
            return frame


class LayeredFile:
    """A per-unit Parquet file (site, layer, unit, ...) read one layer's row group(s) at a time."""

    def __init__(self, path: Path, cache: GroupCache, columns: list[str] | None = None):
        self.path = Path(path)
        self.cache = cache
        self.columns = columns
        self._groups: dict[int, list[int]] | None = None
        self._all: list[int] = []
        self._file: pq.ParquetFile | None = None
        self._lock = threading.Lock()

    def _layout(self) -> tuple[pq.ParquetFile, dict[int, list[int]], list[int]]:
        """layer -> the row groups that may hold it (from the footer: opened on first use)."""
        with self._lock:
            if self._file is None:
                parquet = open_parquet(self.path)
                meta = parquet.metadata
                column = parquet.schema_arrow.get_field_index("layer")
                groups: dict[int, list[int]] = {}
                spanning = []
                for i in range(meta.num_row_groups):
                    stats = meta.row_group(i).column(column).statistics
                    if stats is not None and stats.has_min_max and stats.min == stats.max:
                        groups.setdefault(int(stats.min), []).append(i)
                    else:
                        spanning.append(i)
                self._file, self._groups, self._all = parquet, groups, spanning
            return self._file, self._groups, self._all

    def layer(self, layer: int) -> pl.DataFrame:
        parquet, groups, spanning = self._layout()
        parts = []
        for group in sorted(groups.get(layer, []) + spanning):
            frame = self.cache.get((str(self.path), group), lambda g=group: pl.from_arrow(
                parquet.read_row_group(g, columns=self.columns)))
            parts.append(frame.filter(pl.col("layer") == layer) if group in spanning else frame)
        if not parts:
            return pl.from_arrow(parquet.schema_arrow.empty_table()).select(self.columns or pl.all())
        return pl.concat(parts) if len(parts) > 1 else parts[0]

    def unit(self, site: str, layer: int, unit: int) -> pl.DataFrame:
        return self.layer(layer).filter((pl.col("site") == site) & (pl.col("unit") == unit))
