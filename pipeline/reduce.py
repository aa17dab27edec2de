"""The reduce stage: merge committed partials into the global index, images and errors tables.

Partials are merged in groups, so memory holds one group plus a running result of
O(layers x units x k) rows, however many shards there are. The images table streams shard by
shard into one Parquet file. Outputs (relative to OUT):

    index/<layer>.parquet   the nine-best index, one file per layer, sorted by unit and rank
    images.parquet          every listed image: hash, size, or the error that skipped it
    errors.parquet          the skipped images alone
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from . import partials
from .schemas import conform, empty, schema
from .storage import Store
from .topk import merge

GROUP = 32  # partials merged at once


@dataclass(frozen=True)
class Reduced:
    index: pa.Table  # schema "index"
    images: int
    bad: int


def merge_partials(store: Store, records: list[dict[str, Any]], k: int) -> pa.Table:
    """The exact global top-k over every committed shard, streaming GROUP partials at a time."""
    state = empty("partial")
    for start in range(0, len(records), GROUP):
        group = records[start : start + GROUP]
        tables = [top(partials.read_table(store, record, "topk"), k) for record in group]
        state = merge([state, *tables], k)
    return conform(state, "index")


def top(partial: pa.Table, k: int) -> pa.Table:
    """A partial's first k rows per unit (its rows beyond k, the reindex buffer, cannot win)."""
    return conform(partial.filter(pc.less_equal(partial["rank"], k)), "partial")


def write_images(root: Store, records: list[dict[str, Any]], target: Store) -> tuple[int, int]:
    """Stream every shard's images table (partials under `root`) into images.parquet and
    errors.parquet under `target`; return (images, bad images)."""
    total = bad = 0
    with (
        target.parquet_writer("images.parquet", schema("images")) as images,
        target.parquet_writer("errors.parquet", schema("errors")) as errors,
    ):
        for record in records:
            table = conform(partials.read_table(root, record, "images"), "images")
            images.write_table(table)
            failed = table.filter(pc.is_valid(table["error"]))
            errors.write_table(conform(failed.select(["image_id", "uri", "error"]), "errors"))
            total += table.num_rows
            bad += failed.num_rows
    return total, bad


def write_index(store: Store, index: pa.Table, layers: tuple[str, ...]) -> list[str]:
    """Write one Parquet file per layer under index/; return their relative paths."""
    paths = []
    for layer in layers:
        rows = index.filter(pc.equal(index["layer"], layer))
        rel = f"index/{layer}.parquet"
        store.write_parquet(rel, rows)
        paths.append(rel)
    return paths
