import numpy as np
import pytest

from neuronmap.errors import NeuronmapError
from neuronmap.io.parquet import read_table
from neuronmap.io.responses import ResponseReader, ResponseWriter


def write_shard(path, ids, rng, dtype="float16"):
    writer = ResponseWriter(path, {"gate": 6, "down": 4}, 2, ["mean", "max"], dtype)
    values = {}
    for start in range(0, len(ids), 3):  # several batches, as extraction writes them
        batch = ids[start:start + 3]
        pooled = {(pooling, site): rng.normal(size=(2, len(batch), width))
                  for pooling in ("mean", "max") for site, width in (("gate", 6), ("down", 4))}
        writer.write_batch(batch, [5] * len(batch), pooled)
        for (pooling, site), array in pooled.items():
            for layer in range(2):
                for i, pid in enumerate(batch):
                    values[(pooling, site, layer, pid)] = array[layer, i]
    writer.close()
    return values


@pytest.mark.parametrize("dtype, tolerance", [("float16", 2e-3), ("float32", 1e-7)])
def test_blocks_read_back_in_requested_order(tmp_path, dtype, tolerance):
    rng = np.random.default_rng(0)
    expected = {}
    expected.update(write_shard(tmp_path / "a.parquet", [f"a{i}" for i in range(7)], rng, dtype))
    expected.update(write_shard(tmp_path / "b.parquet", [f"b{i}" for i in range(4)], rng, dtype))
    reader = ResponseReader([tmp_path / "a.parquet", tmp_path / "b.parquet"])
    assert reader.blocks("max") == [("down", 0), ("down", 1), ("gate", 0), ("gate", 1)]
    wanted = ["b3", "a0", "a6", "b0"]
    block = reader.read_block("max", "gate", 1, wanted)
    assert block.shape == (4, 6) and block.dtype == np.float32
    for row, pid in enumerate(wanted):
        np.testing.assert_allclose(block[row], expected[("max", "gate", 1, pid)], rtol=tolerance, atol=tolerance)


def test_a_layer_is_read_from_its_own_column_only(tmp_path):
    import pyarrow.parquet as pq
    write_shard(tmp_path / "a.parquet", [f"a{i}" for i in range(7)], np.random.default_rng(0))
    metadata = pq.ParquetFile(tmp_path / "a.parquet").metadata
    names = [metadata.row_group(0).column(c).path_in_schema for c in range(metadata.num_columns)]
    assert any(name.startswith("mean/gate/001") for name in names)  # one column chunk per block
    assert metadata.num_row_groups == 3  # one per batch


def test_missing_prompt_is_an_error(tmp_path):
    write_shard(tmp_path / "a.parquet", ["a0", "a1"], np.random.default_rng(1))
    with pytest.raises(NeuronmapError, match="found 1 of 2"):
        ResponseReader([tmp_path / "a.parquet"]).read_block("mean", "gate", 0, ["a0", "zz"])


def test_truncated_parquet_names_the_file(tmp_path):
    path = tmp_path / "a.parquet"
    write_shard(path, ["a0", "a1"], np.random.default_rng(1))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(NeuronmapError, match=str(path)):
        ResponseReader([path])
    with pytest.raises(NeuronmapError, match="corrupt or truncated"):
        read_table(path)


def test_the_background_writer_writes_what_the_writer_writes(tmp_path):
    from neuronmap.io.responses import BackgroundWriter
    rng = np.random.default_rng(2)
    batches = [(["a", "b"], rng.normal(size=(2, 2, 6)).astype(np.float16)),
               (["c"], rng.normal(size=(2, 1, 6)).astype(np.float16))]
    released = []
    for name, background in (("plain", False), ("thread", True)):
        writer = ResponseWriter(tmp_path / f"{name}.parquet", {"gate": 6}, 2, ["mean"])
        if background:
            writer = BackgroundWriter(writer, depth=1)
        for ids, values in batches:
            if background:
                writer.write_batch(ids, [3] * len(ids), lambda v=values: {("mean", "gate"): v},
                                   lambda i=ids: released.append(i))
            else:
                writer.write_batch(ids, [3] * len(ids), {("mean", "gate"): values})
        writer.close()
    assert released == [["a", "b"], ["c"]]  # every batch's buffers handed back, in order
    assert read_table(tmp_path / "plain.parquet").equals(read_table(tmp_path / "thread.parquet"))


def test_an_error_in_the_writer_thread_is_raised_and_every_batch_released(tmp_path):
    from neuronmap.io.responses import BackgroundWriter
    writer = BackgroundWriter(ResponseWriter(tmp_path / "a.parquet", {"gate": 6}, 2, ["mean"]), depth=1)
    released = []

    def broken():
        raise OSError("disk full")
    queued = []
    with pytest.raises(OSError, match="disk full"):
        try:
            for i in range(5):  # raised by a later batch, or at the latest by close
                writer.write_batch([f"b{i}"], [1], broken, lambda i=i: released.append(i))
                queued.append(i)
        finally:
            writer.close()
    assert released == queued and not writer._thread.is_alive()  # nothing held back, no thread left
