"""Shards planned while the listing streams equal the shards of the listing held in memory."""

from __future__ import annotations

import uuid

import fsspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.dataset.listing import list_images, stream_images
from pipeline.dataset.refs import ImageRef, Shard, data_fingerprint, plan_shards
from pipeline.dataset.spill import SpilledShard, plan_streamed
from tests.dataset.test_walk import trees


def assert_same_plan(refs: list[ImageRef], shard_size: int) -> None:
    streamed = plan_streamed(iter(refs), shard_size)
    held = plan_shards(refs, shard_size)
    assert [s.key for s in streamed.shards] == [s.key for s in held]
    assert [s.load() for s in streamed.shards] == held  # the same refs, read back from disk
    assert streamed.data_fingerprint == data_fingerprint(refs)
    assert streamed.listed == len(refs)
    spilled = [s for s in streamed.shards if isinstance(s, SpilledShard)]
    assert [s.count for s in spilled] == [len(s.refs) for s in held if s.container is None]
    assert all(isinstance(s, Shard) for s in streamed.shards if s not in spilled)


@given(trees(), st.sampled_from([1, 2, 3, 7, 256]))
@settings(max_examples=60, deadline=None)
def test_streamed_plan_of_a_folder_equals_the_plan_of_its_listing(files, shard_size):
    fs = fsspec.filesystem("memory")
    root = f"/spill-{uuid.uuid4().hex}"
    fs.pipe({f"{root}/{rel}": data for rel, data in files.items()})
    try:
        refs = list_images(f"memory://{root}")
        assert list(stream_images(f"memory://{root}")) == refs
        assert_same_plan(refs, shard_size)
    finally:
        fs.rm(root, recursive=True)


@pytest.mark.parametrize("shard_size", [1, 4, 10, 11, 1000])
def test_sizes_and_stamps_round_trip_including_unknown_ones(shard_size):
    refs = [
        ImageRef(f"{i:03d}.jpg", f"s3://b/{i:03d}.jpg", size=None if i % 3 else i * 7,
                 stamp=None if i % 4 else f"etag-{i}")
        for i in range(23)
    ]  # fmt: skip
    refs.insert(5, ImageRef("004.tar", "s3://b/004.tar", 10, "t", kind="tar"))
    refs.sort(key=lambda r: r.image_id)
    assert_same_plan(refs, shard_size)


def test_a_failing_listing_leaves_nothing_behind():
    def listing():
        yield ImageRef("a.jpg", "/a.jpg", 1, "1")
        raise RuntimeError("lost the bucket")

    with pytest.raises(RuntimeError, match="lost the bucket"):
        plan_streamed(listing(), 1)
