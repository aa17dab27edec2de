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
statistics are sums, minima, maxima and mergeable sketches. Each is reduced as a tree of merges
over groups of partials, on the cluster's CPUs when there are several groups
(index/reduce_tree.py), like the index (`merge_index`).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import IndexConfig
from pipeline.index import reduce_tree
from pipeline.index.distinct import by_column, select_perceptual
from pipeline.index.reduce_tree import TopKJob, TreeReport
from pipeline.index.samples import effective_threshold, select
from pipeline.index.stats import StatsMerge
from pipeline.index.topk import negated
from pipeline.store.layout import SAMPLES_DIR, STATS_DIR, layer_file
from pipeline.store.partials import CommitRecord
from pipeline.store.schemas import conform
from pipeline.store.storage import Store


def merge_index(
    store: Store, records: Sequence[CommitRecord], cfg: IndexConfig, report: TreeReport | None
) -> tuple[pa.Table, int | None]:
    """(the run's index in schema "index", units short of k with --distinct perceptual, else
    None): the exact global top-k, distinct as `cfg.distinct` asks, reduced as a tree of
    merges on the cluster's CPUs (index/reduce_tree.py)."""
    if cfg.distinct == "perceptual":
        return perceptual_index(store, records, cfg, report)
    job = TopKJob(cfg.k, by=by_column(cfg.distinct))
    table, _ = reduce_tree.merge_topk(store, records, job, report, cfg.worker_wait)
    return conform(table, "index"), None


def perceptual_index(
    store: Store,
    records: Sequence[CommitRecord],
    cfg: IndexConfig,
    report: TreeReport | None = None,
) -> tuple[pa.Table, int]:
    """(the perceptual top-k, units short of k): the walk over each unit's top-depth contents.

    Each partial keeps its shard's top-`depth` contents per unit, so the merged top-`depth`
    contents are exact (topk.merge with k = depth), and so is the walk over them; the pHashes
    of the contents come back with each group's merge.
    """
    job = TopKJob(cfg.depth, by="image_hash", phash=True)
    contents, phashes = reduce_tree.merge_topk(store, records, job, report, cfg.worker_wait)
    kept, short = select_perceptual(conform(contents, "index"), phashes, cfg.k, cfg.near, cfg.depth)
    return conform(kept, "index"), short


def bottom_index(store: Store, records: Sequence[CommitRecord], cfg: IndexConfig) -> pa.Table:
    """The exact global bottom-K per unit (rank 1 the lowest), distinct like the index
    (perceptual runs: distinct content)."""
    job = TopKJob(cfg.bottom, by=by_column(cfg.distinct), table="bottom", negate=True)
    table, _ = reduce_tree.merge_topk(store, records, job, wait=cfg.worker_wait)  # top of -a
    return negated(conform(table, "index"))


def merge_stats(
    store: Store, records: Sequence[CommitRecord], wait: float = reduce_tree.WAIT_SECONDS
) -> StatsMerge:
    """Every shard's statistics merged (a tree of merges: see index/reduce_tree.py)."""
    return reduce_tree.merge_stats(store, records, wait)


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
    rows = reduce_tree.merge_samples(store, records, limit, cfg.worker_wait)
    return select(rows, limit, cfg.samples or 0, by_column(cfg.distinct))


def write_samples(target: Store, table: pa.Table, layers: tuple[str, ...]) -> list[str]:
    """samples/<layer>.parquet for every layer; return their relative paths."""
    paths = []
    for layer in layers:
        rel = layer_file(SAMPLES_DIR, layer)
        target.write_parquet(rel, table.filter(pc.equal(table["layer"], layer)))
        paths.append(rel)
    return paths
