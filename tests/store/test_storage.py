"""Store: the same contract on local disk and an in-memory fsspec filesystem; atomic writes."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from pipeline.store.storage import Store


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "root"))
    return Store(f"memory://store-{tmp_path.name}")  # memory is process-wide: a unique root


def test_roundtrip_json_parquet_bytes_and_listing(store):
    store.write_json("a/run.json", {"x": 1})
    store.write_parquet("a/t.parquet", pa.table({"v": [1, 2]}))
    store.write_bytes("b.bin", b"\x00\x01")
    assert store.read_json("a/run.json") == {"x": 1}
    assert store.read_parquet("a/t.parquet")["v"].to_pylist() == [1, 2]
    assert store.read_bytes("b.bin") == b"\x00\x01"
    assert store.listdir("a") == ["run.json", "t.parquet"]
    assert store.listdir("missing") == []
    store.remove("a")
    assert not store.exists("a/run.json")


def test_failed_write_leaves_nothing(store):
    with pytest.raises(RuntimeError), store.open_atomic("x/half.bin") as f:
        f.write(b"partial")
        raise RuntimeError("disk full")
    assert not store.exists("x/half.bin")
    if store.local:
        assert os.listdir(store.path("x")) == []  # no temp file left behind


def test_failed_write_keeps_the_previous_version(store):
    store.write_bytes("v.bin", b"old")
    with pytest.raises(RuntimeError), store.open_atomic("v.bin") as f:
        f.write(b"new but torn")
        raise RuntimeError("interrupted")
    assert store.read_bytes("v.bin") == b"old"


def test_streamed_parquet(store):
    schema = pa.schema([("v", pa.int64())])
    with store.parquet_writer("s.parquet", schema) as writer:
        for i in range(3):
            writer.write_table(pa.table({"v": [i]}, schema=schema))
    assert store.read_parquet("s.parquet")["v"].to_pylist() == [0, 1, 2]
