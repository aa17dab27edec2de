"""partials + reduce: only committed attempts of this run are read; merged output equals merge()."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from pipeline import partials
from pipeline.reduce import merge_partials, write_images, write_index
from pipeline.storage import Store
from pipeline.topk import RunningTopK, merge


def topk_table(ids: list[str], values: list[float]) -> pa.Table:
    t = RunningTopK(units=1, k=2)
    v = torch.tensor(values)[:, None]  # (B, 1)
    zeros = torch.zeros_like(v, dtype=torch.int64)
    t.add(v, torch.arange(len(ids)), zeros, zeros)
    return t.table("l", ids, [f"h{i}" for i in ids])


def images_table(ids: list[str], error: str | None = None) -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            "image_id": ids, "uri": [f"/d/{i}" for i in ids],
            "stamp": pa.array([None] * n, pa.string()),
            "image_hash": [None if error else f"h{i}" for i in ids],
            "bytes": pa.array([None if error else 10] * n, pa.int64()),
            "height": pa.array([None if error else 5] * n, pa.int32()),
            "width": pa.array([None if error else 5] * n, pa.int32()),
            "error": pa.array([error] * n, pa.string()),
            "shard": ["s"] * n,
        }
    )  # fmt: skip


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(str(tmp_path / "out"))


def commit(store, key, ids, values, run="r1", error=None):
    table = topk_table(ids, values) if error is None else topk_table([], [])
    report = {"images": len(ids), "bad": 0 if error is None else len(ids)}
    return partials.write(
        store, key, partials.new_attempt(), run, table, images_table(ids, error), report
    )


def test_only_this_runs_commit_is_read(store):
    commit(store, "s1", ["a", "b"], [1.0, 2.0])
    assert partials.read_commit(store, "s1", "r1")["images"] == 2
    assert partials.read_commit(store, "s1", "other-run") is None
    assert partials.read_commit(store, "s2", "r1") is None


def test_stray_attempt_is_never_read(store):
    record = commit(store, "s1", ["a", "b"], [1.0, 2.0])
    stray = topk_table(["zzz"], [100.0])
    store.write_parquet("partials/s1/deadbeef0000/topk.parquet", stray)  # a dead attempt's file
    index = merge_partials(store, [record], k=2)
    assert index["image_id"].to_pylist() == ["b", "a"]


def test_reduce_equals_merge_and_counts_errors(store):
    r1 = commit(store, "s1", ["a", "b"], [1.0, 5.0])
    r2 = commit(store, "s2", ["c", "d"], [3.0, 5.0])
    r3 = commit(store, "s3", ["e"], [0.0], error="truncated")
    index = merge_partials(store, [r1, r2, r3], k=2)
    expected = merge([topk_table(["a", "b"], [1.0, 5.0]), topk_table(["c", "d"], [3.0, 5.0])], 2)
    assert index["image_id"].to_pylist() == expected["image_id"].to_pylist() == ["b", "d"]
    assert write_images(store, [r1, r2, r3], store) == (5, 1)
    assert store.read_parquet("errors.parquet")["image_id"].to_pylist() == ["e"]
    assert write_index(store, index, ("l", "empty")) == ["index/l.parquet", "index/empty.parquet"]
    assert store.read_parquet("index/empty.parquet").num_rows == 0
