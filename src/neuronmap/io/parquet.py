"""Reading and writing the Parquet files that are the only interface between stages.

Every write goes to a temporary name beside the target and is renamed into place, so a
crash or a bad input never leaves a partial file that Snakemake would take as done.
"""

from __future__ import annotations

import contextlib
import glob
import os
import queue
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import NeuronmapError

UMASK = os.umask(0o022)
os.umask(UMASK)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path next to `target`; rename it onto `target` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # An attempt killed by SIGKILL could not clean up after itself: do it before this one.
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*{suffix}.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    # mkstemp makes the file private (0600); results on a shared filesystem are for the group too.
    os.chmod(tmp, 0o666 & ~UMASK)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The Parquet columns worth a dictionary: all but floating-point ones. A float column's
    values rarely repeat, and by default the writer builds a dictionary for it anyway before
    falling back: on the corpus records' 9.3 M extreme rows (2 cores) that took the write from
    1.3-1.8 s to 2.7 s and made the file 72 MB instead of 55."""
    return leaf_columns(schema, lambda kind: not pa.types.is_floating(kind))


def integer_columns(schema: pa.Schema) -> list[str]:
    return leaf_columns(schema, pa.types.is_integer)


def leaf_columns(schema: pa.Schema, wanted) -> list[str]:
    """The Parquet paths of the columns whose values' type is `wanted`, list items included."""
    def leaves(name: str, kind: pa.DataType) -> list[str]:
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            return leaves(f"{name}.list.element", kind.value_type)
        return [name] if wanted(kind) else []
    return [path for field in schema for path in leaves(field.name, field.type)]


def storage_schema(given: pa.Schema, contract: pa.Schema) -> pa.Schema:
    """`contract` as written: a string column that comes as an Arrow dictionary (a few distinct
    strings over millions of rows: a site, a prompt id, a token) stays one. Parquet stores a
    string column as dictionary pages either way; handing the writer the dictionary skips
    materializing every row's string and hashing it again (1.55 M top-activation rows: 0.18 s
    of `take` and a slower write)."""
    fields = []
    for field in contract:
        kind = given.field(field.name).type if field.name in given.names else None
        keep = (kind is not None and pa.types.is_string(field.type) and pa.types.is_dictionary(kind)
                and kind.value_type == field.type)
        fields.append(field.with_type(kind) if keep else field)
    return pa.schema(fields, metadata=contract.metadata)


def dictionary_strings(indices, values) -> pa.DictionaryArray:
    """A string column given as indices into its distinct values: what `storage_schema` keeps."""
    return pa.DictionaryArray.from_arrays(pa.array(indices), pa.array(values, pa.string()))


def one_dictionary_per_column(table: pa.Table) -> pa.Table:
    """`table` with each dictionary column's chunks sharing one dictionary. Where the dictionary
    changes from one chunk to the next (parts built one site at a time, each with its own), the
    writer falls back to a plain string per row for the rest of the column chunk: on a records
    job's extremes, 1.5-1.8 MB of `site` and `kind` strings per layer instead of 600 bytes of
    indices, and 0.1 s more per job. Unifying costs about 0.3 ms per half a million rows."""
    return table.unify_dictionaries() if has_dictionaries(table.schema) else table


def has_dictionaries(schema: pa.Schema) -> bool:
    return any(pa.types.is_dictionary(field.type) for field in schema)


def writer_options(schema: pa.Schema, delta_integers: bool = False) -> dict:
    """How a table of this (storage) schema is written. With dictionary columns: without Arrow's
    own schema, so that readers get the contract's plain strings back (the Parquet column is a
    string column; only the stored Arrow schema would make it a dictionary), and without min/max
    statistics of those columns, which nothing filters on and which took 50 ms of a 130 ms write
    of 1.55 M top activations.

    `delta_integers`: integer columns delta-encoded instead of through a dictionary, for files
    of millions of rows written once and read once (the corpus records' partial files). A
    dictionary hashes every value on the way in and decodes through it on the way out; a delta
    encoding only subtracts. Measured on a records job's 9.3 M extreme rows (2 cores): write 0.52
    -> 0.45 s, read 0.80 -> 0.17 s, about the same size; its units file 0.37 -> 0.27 s, 36 -> 31 MB."""
    deltas = integer_columns(schema) if delta_integers else []
    options = {"use_dictionary": [name for name in dictionary_columns(schema) if name not in deltas]}
    if deltas:
        options["column_encoding"] = dict.fromkeys(deltas, "DELTA_BINARY_PACKED")
    if has_dictionaries(schema):
        options.update(store_schema=False,
                       write_statistics=[f.name for f in schema if not pa.types.is_dictionary(f.type)])
    return options


def write_table(table: pa.Table | pl.DataFrame, target: str | os.PathLike, schema: pa.Schema | None = None,
                **kwargs) -> None:
    """Write a table atomically; cast to `schema` first so the file matches its documented contract."""
    if isinstance(table, pl.DataFrame):
        table = table.to_arrow()
    if schema is not None:
        table = table.select(schema.names).cast(storage_schema(table.schema, schema))
    table = one_dictionary_per_column(table)
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp, **{**writer_options(table.schema), **kwargs})


def write_text(text: str, target: str | os.PathLike) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_table(path: str | os.PathLike, columns: list[str] | None = None) -> pl.DataFrame:
    """Read a stage output, naming the file when it is missing, truncated or not Parquet."""
    try:
        return pl.from_arrow(pq.read_table(path, columns=columns))
    except FileNotFoundError:
        raise NeuronmapError(f"{path}: file not found") from None
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise NeuronmapError(f"{path}: not a readable Parquet file (corrupt or truncated?): {exc}") from None


def open_parquet(path: str | os.PathLike) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise NeuronmapError(f"{path}: file not found") from None
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise NeuronmapError(f"{path}: not a readable Parquet file (corrupt or truncated?): {exc}") from None


def prefetched(parts: Iterable, depth: int = 1) -> Iterator:
    """`parts` built in a thread of its own, up to `depth` ahead of the consumer: a part is
    built (numpy, mostly holding the GIL) while the one before is encoded and written (Arrow,
    without it). An error while building is raised to the consumer."""
    queue_: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def build():
        try:
            for part in parts:
                queue_.put((part, None))
                if stop.is_set():
                    break
        except BaseException as error:  # noqa: BLE001 - raised in the consumer's thread
            queue_.put((None, error))
        queue_.put((done, None))

    thread = threading.Thread(target=build, name="row-group-builder", daemon=True)
    thread.start()
    try:
        while True:
            part, error = queue_.get()
            if error is not None:
                raise error
            if part is done:
                return
            yield part
    finally:
        stop.set()
        while thread.is_alive():  # the consumer stopped early: unblock the builder, which stops
            with contextlib.suppress(queue.Empty):
                queue_.get(timeout=0.1)


def write_row_groups(parts, target: str | os.PathLike, schema: pa.Schema, delta_integers: bool = False) -> None:
    """Write tables (an iterable: one is built at a time, the next while one is written) as one
    row group each, atomically: a reader takes one group (one layer, say) without reading the
    others (`read_row_group`). `delta_integers`: see `writer_options`."""
    with atomic_path(target) as tmp:
        writer = None
        try:
            for part in prefetched(parts):
                if isinstance(part, pl.DataFrame):
                    part = part.to_arrow()
                if writer is None:  # the first part decides which string columns come as dictionaries
                    stored = storage_schema(part.schema, schema)
                    writer = pq.ParquetWriter(tmp, stored, **writer_options(stored, delta_integers))
                part = one_dictionary_per_column(part.select(schema.names).cast(stored))
                writer.write_table(part, row_group_size=max(part.num_rows, 1))
            if writer is None:
                writer = pq.ParquetWriter(tmp, schema, **writer_options(schema, delta_integers))
        finally:
            if writer is not None:
                writer.close()


def read_row_group(path: str | os.PathLike, index: int, columns: list[str] | None = None) -> pl.DataFrame:
    return pl.from_arrow(open_parquet(path).read_row_group(index, columns=columns))
