"""io/parquet.py: string columns handed over as dictionaries are written as they are, and read
back as the contract's plain strings, whole files and row groups alike."""

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

import pytest

from neuronmap.io.parquet import (prefetched, read_row_group, read_table, storage_schema, write_row_groups,
                                 write_table)

CONTRACT = pa.schema([("site", pa.string()), ("layer", pa.int32()), ("value", pa.float32())])


def dictionary(values, indices) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(np.asarray(indices, np.int8)), pa.array(values, pa.string()))


def test_storage_schema_keeps_only_dictionaries_of_the_contracts_type():
    given = pa.schema([("site", pa.dictionary(pa.int8(), pa.string())), ("layer", pa.dictionary(pa.int8(), pa.int32())),
                       ("value", pa.float64())])
    stored = storage_schema(given, CONTRACT)
    assert stored.field("site").type == pa.dictionary(pa.int8(), pa.string())
    assert stored.field("layer").type == pa.int32() and stored.field("value").type == pa.float32()


def test_dictionary_strings_read_back_as_the_contracts_strings(tmp_path):
    table = pa.table({"site": dictionary(["gate", "up"], [1, 0, 1]), "layer": [3, 4, 5], "value": [0.5, 1.5, 2.5]})
    write_table(table, tmp_path / "a.parquet", CONTRACT)
    read = read_table(tmp_path / "a.parquet")
    assert pq.read_schema(tmp_path / "a.parquet").field("site").type == pa.string()
    assert b"ARROW:schema" not in (pq.ParquetFile(tmp_path / "a.parquet").metadata.metadata or {})
    assert read.schema == {"site": pl.String, "layer": pl.Int32, "value": pl.Float32}
    assert read["site"].to_list() == ["up", "gate", "up"]
    assert pl.read_parquet(tmp_path / "a.parquet").equals(read)


def test_row_groups_mix_dictionaries_and_plain_strings(tmp_path):
    parts = [pa.table({"site": dictionary(["gate"], [0, 0]), "layer": [0, 0], "value": [1.0, 2.0]}),
             pa.table({"site": ["up", "down"], "layer": [1, 1], "value": [3.0, 4.0]}),
             pa.table({"site": dictionary(["x", "act"], [1]), "layer": [2], "value": [5.0]})]
    write_row_groups(iter(parts), tmp_path / "g.parquet", CONTRACT)
    assert read_table(tmp_path / "g.parquet")["site"].to_list() == ["gate", "gate", "up", "down", "act"]
    assert read_row_group(tmp_path / "g.parquet", 2)["site"].to_list() == ["act"]
    assert read_table(tmp_path / "g.parquet").schema["site"] == pl.String


def test_plain_tables_keep_arrows_schema(tmp_path):
    write_table(pa.table({"site": ["a"], "layer": [1], "value": [1.0]}), tmp_path / "p.parquet", CONTRACT)
    assert b"ARROW:schema" in pq.ParquetFile(tmp_path / "p.parquet").metadata.metadata  # as before
    write_row_groups(iter([]), tmp_path / "empty.parquet", CONTRACT)
    assert read_table(tmp_path / "empty.parquet").height == 0


def test_prefetched_parts_keep_their_order_and_errors():
    assert list(prefetched(iter(range(5)))) == [0, 1, 2, 3, 4]

    def failing():
        yield 1
        raise ValueError("bad part")
    with pytest.raises(ValueError, match="bad part"):
        list(prefetched(failing()))
    built = []

    def counted():
        for i in range(100):
            built.append(i)
            yield i
    first = prefetched(counted())
    assert next(first) == 0
    first.close()  # the consumer stops early: the builder stops too, a part or two later
    assert len(built) < 5


def test_a_failing_part_leaves_no_file(tmp_path):
    def parts():
        yield pa.table({"site": ["a"], "layer": [1], "value": [1.0]})
        raise RuntimeError("out of memory while building")
    with pytest.raises(RuntimeError):
        write_row_groups(parts(), tmp_path / "x.parquet", CONTRACT)
    assert list(tmp_path.iterdir()) == []


def test_delta_integers_read_back_the_same(tmp_path):
    contract = pa.schema([("site", pa.string()), ("unit", pa.int32()), ("counts", pa.list_(pa.int32())),
                          ("value", pa.float32())])
    part = pa.table({"site": dictionary(["gate"], [0] * 4), "unit": [0, 1, 2, 3], "counts": [[1, 2], [], [5], [0, 7]],
                     "value": [0.5, 1.5, 2.5, 3.5]})
    write_row_groups(iter([part, part]), tmp_path / "d.parquet", contract, delta_integers=True)
    columns = pq.ParquetFile(tmp_path / "d.parquet").metadata.row_group(0)
    encodings = {columns.column(i).path_in_schema: columns.column(i).encodings for i in range(columns.num_columns)}
    assert "DELTA_BINARY_PACKED" in encodings["unit"] and "DELTA_BINARY_PACKED" in encodings["counts.list.element"]
    assert "RLE_DICTIONARY" in encodings["site"] and "RLE_DICTIONARY" not in encodings["unit"]
    read = read_table(tmp_path / "d.parquet")
    assert read["unit"].to_list() == [0, 1, 2, 3] * 2 and read["counts"].to_list() == [[1, 2], [], [5], [0, 7]] * 2
    assert read["site"].to_list() == ["gate"] * 8
