"""The streamed plan (`ninebest index`) decides exactly what the in-memory plan decides."""

from __future__ import annotations

import shutil

import pytest

from pipeline.config import IndexConfig, Preprocess
from pipeline.dataset.spill import SpilledShard
from pipeline.errors import DataError
from pipeline.index.plan import plan, stream_plan


def config(data, **kw) -> IndexConfig:
    return IndexConfig(
        model="tiny_models:tiny", data=str(data), out="unused", layers=("conv2", "fc"), k=3,
        preprocess=Preprocess(resize=32, crop=32), **kw,
    )  # fmt: skip


@pytest.mark.parametrize("shard_size", [1, 5, 256])
def test_stream_plan_equals_plan_on_a_folder(photos, tmp_path, shard_size):
    data = tmp_path / "data"
    shutil.copytree(photos, data)
    (data / "box").mkdir()
    (data / "box" / "x.tar").write_bytes(b"")  # a container among loose images: its own shard
    cfg = config(data, shard_size=shard_size)
    streamed, held = stream_plan(cfg), plan(cfg)
    assert [s.key for s in streamed.shards] == [s.key for s in held.shards]
    assert [s.load() for s in streamed.shards] == held.shards
    assert streamed.data_fingerprint == held.data_fingerprint
    assert streamed.run_fingerprint == held.run_fingerprint
    assert streamed.listed == len(held.refs) == 49
    assert streamed.shapes == held.shapes
    assert sum(isinstance(s, SpilledShard) for s in streamed.shards) == -(-48 // shard_size)


def test_an_empty_folder_is_refused_by_both(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    for planner in (plan, stream_plan):
        with pytest.raises(DataError, match="holds no images"):
            planner(config(tmp_path))
