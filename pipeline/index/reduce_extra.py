"""The reduce of what a run keeps beyond the top-k: perceptual selection, bottom, statistics.

Outputs (relative to OUT), each one Parquet file per layer:

    index/<layer>.parquet    with --distinct perceptual: the walk of distinct.select_perceptual
                             over the exact global top-`depth` contents of each unit
    bottom/<layer>.parquet   --bottom K: the K least-activating distinct images per unit, schema
                             "index", rank 1 the lowest, ties by image_id ascending
    stats/<layer>.parquet    per-unit statistics (schema "stats", see index/stats.py)
    samples/<layer>.parquet  examples across the range (schema "samples", index/samples.py)

All of them are merges of per-shard partial tables (partials.EXTRA), exact under any sharding:
the bottom is the top-k of the negated activations (topk.merge's proof holds as it is); the
statistics are sums, minima, maxima and mergeable sketches.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import IndexConfig
from pipeline.index.distinct import by_column, select_perceptual
from pipeline.index.reduce import GlobalTopK, _read_ahead, merge_partials, read_topk
from pipeline.index.samples import effective_threshold, select
from pipeline.index.stats import StatsMerge
from pipeline.index.topk import negated
from pipeline.store import partials
from pipeline.store.layout import SAMPLES_DIR, STATS_DIR, layer_file
from pipeline.store.partials import CommitRecord
from pipeline.store.schemas import conform, empty
from pipeline.store.storage import Store


def perceptual_index(
    store: Store, records: Sequence[CommitRecord], cfg: IndexConfig
) -> tuple[pa.Table, int]:
    """(the perceptual top-k, units short of k): the walk over each unit's top-depth contents.

    Each partial keeps its shard's top-`depth` contents per unit, so the merged top-`depth`
    contents are exact (topk.merge with k = depth), and so is the walk over them.
    """
    contents = merge_partials(store, records, cfg.depth, by="image_hash")
    wanted = pc.unique(contents["image_hash"])
    phashes: dict[str, int] = {}
    read = functools.partial(partials.read_table, store, table="phash")
    for table in _read_ahead(read, records, store):
        table = table.filter(pc.is_in(table["image_hash"], value_set=wanted))
        pairs = zip(table["image_hash"].to_pylist(), table["phash"].to_pylist(), strict=True)
        phashes.update(pairs)
    kept, short = select_perceptual(contents, phashes, cfg.k, cfg.near, cfg.depth)
    return conform(kept, "index"), short


def bottom_index(store: Store, records: Sequence[CommitRecord], cfg: IndexConfig) -> pa.Table:
    """The exact global bottom-K per unit (rank 1 the lowest), distinct like the index
    (perceptual runs: distinct content)."""
    reducer = GlobalTopK(cfg.bottom, by=by_column(cfg.distinct))
    read = functools.partial(read_topk, store, table="bottom")
    for table in _read_ahead(read, records, store):
        reducer.add(negated(table))  # stored as real activations; merged as the top of -a
    return negated(conform(reducer.table(), "index"))


def merge_stats(store: Store, records: Sequence[CommitRecord]) -> StatsMerge:
    """Every shard's statistics merged, in shard order."""
    merged = StatsMerge()
    read = functools.partial(partials.read_table, store, table="stats")
    for table in _read_ahead(read, records, store):
        merged.add(table)
    return merged


def write_stats(target: Store, merged: StatsMerge, layers: tuple[str, ...]) -> list[str]:
    """stats/<layer>.parquet for every layer; return their relative paths."""
    paths = []
    for layer in layers:
        rel = layer_file(STATS_DIR, layer)
        target.write_parquet(rel, conform(merged.table(layer), "stats"))
        paths.append(rel)
    return paths


def samples_index(store: Store, records: Sequence[CommitRecord], cfg: IndexConfig) -> pa.Table:
    """The samples across the range of every layer (schema "samples", see index/samples.py)."""
    limit = effective_threshold(records)
    read = functools.partial(partials.read_table, store, table="samples")
    kept = [t.filter(pc.less(t["priority"], limit)) for t in _read_ahead(read, records, store)]
    rows = pa.concat_tables(kept) if kept else empty("samples_state")
    return select(rows, limit, cfg.samples or 0, by_column(cfg.distinct))


def write_samples(target: Store, table: pa.Table, layers: tuple[str, ...]) -> list[str]:
    """samples/<layer>.parquet for every layer; return their relative paths."""
    paths = []
    for layer in layers:
        rel = layer_file(SAMPLES_DIR, layer)
        target.write_parquet(rel, table.filter(pc.equal(table["layer"], layer)))
        paths.append(rel)
    return paths
