"""Shards planned while a listing streams: loose images spilled to disk, one row group a shard.

`refs.plan_shards` needs the whole sorted listing in memory. `plan_streamed` takes the same
refs one at a time (in `image_id` order, as `walk.walk_folder` yields them) and makes the same
shards, keys and data fingerprint, keeping only O(shards) small records: each run of
`shard_size` loose images is written as one row group of a Parquet listing in a local scratch
file and becomes a `SpilledShard` (key, count, row group); its refs are read back when the shard
is dispatched (`SpilledShard.load`). Containers are one entry per file already and stay `Shard`s.

The scratch file is an anonymous temporary file (`tempfile.TemporaryFile`, under $TMPDIR): it
is never in OUT (whose first write is run.json, after the plan is validated), it needs no name,
and the operating system removes it when the run ends, however it ends.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.dataset.refs import DataFingerprint, ImageRef, Shard, container_shard, loose_key

LISTING_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("size", pa.int64()),
        ("stamp", pa.string()),
    ]
)  # the loose images of one shard per row group, in image_id order (kind is always "image")


class SpilledListing:
    """Loose images on local scratch, one Parquet row group per shard; written, then read."""

    def __init__(self) -> None:
        self._file: IO[bytes] = tempfile.TemporaryFile(prefix="ninebest-listing-")
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(
            self._file, LISTING_SCHEMA, compression="zstd", write_statistics=False
        )
        self._reader: pq.ParquetFile | None = None
        self._lock = threading.Lock()  # one file position: one read at a time
        self.groups = 0

    def append(self, chunk: list[ImageRef]) -> int:
        """Write one shard's refs as the next row group; return its number."""
        assert self._writer is not None, "the listing is closed for writing"
        columns = {
            "image_id": [ref.image_id for ref in chunk],
            "uri": [ref.uri for ref in chunk],
            "size": [ref.size for ref in chunk],
            "stamp": [ref.stamp for ref in chunk],
        }
        self._writer.write_table(pa.table(columns, schema=LISTING_SCHEMA))
        self.groups += 1
        return self.groups - 1

    def finish(self) -> None:
        """Close the writer (the Parquet footer) and open the file for reading."""
        assert self._writer is not None
        self._writer.close()
        self._writer = None
        self._file.flush()
        self._reader = pq.ParquetFile(self._file)

    def read(self, group: int) -> tuple[ImageRef, ...]:
        """The refs of row group `group`, as they were appended."""
        assert self._reader is not None, "the listing is still being written"
        with self._lock:
            table = self._reader.read_row_group(group)
        return tuple(ImageRef(**row) for row in table.to_pylist())

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._reader = None
        self._file.close()


@dataclass(frozen=True)
class SpilledShard:
    """A shard of loose images whose refs wait in a spilled listing: the driver holds this."""

    key: str  # "<ordinal>-<digest>", as `refs.plan_shards` keys the same images
    count: int  # images in the shard
    group: int  # its row group in `listing`
    listing: SpilledListing = field(repr=False, compare=False)

    @property
    def container(self) -> None:
        return None  # containers are never spilled

    def load(self) -> Shard:
        """The shard with its refs, read back from the listing (when it is dispatched)."""
        refs = self.listing.read(self.group)
        assert len(refs) == self.count, f"spilled shard {self.key} lost refs"
        return Shard(self.key, refs)


@dataclass(frozen=True)
class StreamedPlan:
    """What `plan_streamed` decided: the shards in `plan_shards` order, the data fingerprint
    over every ref, and how many refs (images and containers) were listed."""

    shards: list[Shard | SpilledShard]
    data_fingerprint: str
    listed: int


def plan_streamed(refs: Iterable[ImageRef], shard_size: int) -> StreamedPlan:
    """`refs.plan_shards(list(refs), shard_size)` and `data_fingerprint(refs)` without holding
    `refs`: the loose ones are spilled shard by shard as they arrive (sorted by image_id)."""
    listing = SpilledListing()
    try:
        fingerprint = DataFingerprint()
        loose: list[SpilledShard] = []
        containers: list[Shard] = []
        chunk: list[ImageRef] = []
        listed = 0

        def cut() -> None:
            key = loose_key(len(loose), chunk)
            loose.append(SpilledShard(key, len(chunk), listing.append(chunk), listing))
            chunk.clear()

        for ref in refs:
            listed += 1
            fingerprint.update(ref)
            if ref.is_container:
                containers.append(container_shard(ref))
                continue
            chunk.append(ref)
            if len(chunk) == shard_size:
                cut()
        if chunk:
            cut()
        listing.finish()
    except BaseException:
        listing.close()
        raise
    return StreamedPlan([*loose, *containers], fingerprint.hexdigest(), listed)
