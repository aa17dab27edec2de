"""`ninebest index` end to end: validate, plan shards, map on Ray actors, reduce, write manifest.

Everything a user can get wrong (model, weights, layers, data, output folder) is checked on the
driver before anything is written to OUT. Shards already committed by an earlier run with the
same fingerprint are reused (resume); the rest go to a pool of actors, one per GPU when the
cluster has GPUs, else `workers` CPU actors. A shard whose actor dies is retried elsewhere.
Once the map's actors are gone (their GPUs and CPUs back with the cluster), the reduce runs in
the same Ray session as a tree of merges on the cluster's CPUs (index/reduce_tree.py).
The manifest is written last: its presence means the index is complete.
"""

from __future__ import annotations

import contextlib
import platform
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from pipeline import __version__
from pipeline.cluster import tasks
from pipeline.cluster.connect import ray_session, ray_version
from pipeline.cluster.pool import Pool
from pipeline.config import IndexConfig
from pipeline.dataset.refs import Shard
from pipeline.dataset.spill import SpilledShard
from pipeline.errors import DataError
from pipeline.index import reduce_tree
from pipeline.index.distinct import by_column
from pipeline.index.map import ShardIndexer
from pipeline.index.plan import RunPlan, check_out, stream_plan, write_run_file
from pipeline.index.reduce import write_images, write_index
from pipeline.index.reduce_extra import (
    bottom_index,
    merge_index,
    merge_stats,
    samples_index,
    write_samples,
    write_stats,
)
from pipeline.index.reduce_tree import TreeReport, reduce_line
from pipeline.index.samples import manifest_section
from pipeline.index.stats import EDGES, PROBABILITIES, RANK_ERROR, SKETCH_K
from pipeline.progress import Progress
from pipeline.store import partials
from pipeline.store.layout import BOTTOM_DIR, ERRORS, IMAGES, MANIFEST
from pipeline.store.partials import CommitRecord
from pipeline.store.schemas import VERSIONS
from pipeline.store.storage import Store

SHARDS_IN_FLIGHT = 2  # per map actor: the next shard decodes while the current one computes


def index(cfg: IndexConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run the whole index job; return the manifest written to OUT/manifest.json."""
    started = time.time()
    p = stream_plan(cfg)  # a folder's loose images spilled to scratch, not held
    store = Store(cfg.out, cfg.storage_options)
    check_out(store, p)
    write_run_file(store, p)
    return execute(p, store, store, p.shards, progress or Progress(), started)


def execute(
    p: RunPlan,
    root: Store,
    target: Store,
    shards: Sequence[Shard | SpilledShard],
    progress: Progress,
    started: float,
    on_shard: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Map the shards not yet committed under `root`, reduce all of them into `target`.

    `on_shard` runs after every finished shard (the reindex lock's heartbeat). One Ray session
    serves the map and the reduce; the map's actors are gone before the reduce starts.
    """
    with contextlib.ExitStack() as session:
        return _execute(p, root, target, shards, progress, started, on_shard, session)


def _execute(
    p: RunPlan, root: Store, target: Store, shards: Sequence[Shard | SpilledShard],
    progress: Progress, started: float, on_shard: Callable[[], None],
    session: contextlib.ExitStack,
) -> dict[str, Any]:  # fmt: skip
    records = partials.read_commits(root, [s.key for s in shards], p.run_fingerprint)
    todo = [s for s in shards if records[s.key] is None]
    progress.start(len(shards), len(shards) - len(todo))
    map_started = time.time()
    pool_sizes: list[dict[str, float]] = []
    if todo or reduce_tree.wants_session(len(shards)):  # the reduce runs in it too
        session.enter_context(ray_session(p.cfg.address))
    held = tasks.held()  # before the pool: the reduce starts once no more is held
    for record in map_shards(p, todo, pool_sizes) if todo else ():
        records[record["shard"]] = record
        progress.shard_done(record)
        on_shard()
    map_seconds = time.time() - map_started
    released = tasks.wait_released(held) if todo else 0.0  # the pool is closed: its actors are gone
    ordered = [_committed(records[s.key]) for s in shards]
    check_precisions(ordered)
    check_decodes(ordered)
    reduce_started = time.time()
    target.remove(MANIFEST)  # rewriting the outputs: OUT is incomplete until the new manifest
    total, bad = write_images(root, ordered, target)
    check_bad_fraction(p.cfg, target, total, bad)
    cfg = p.cfg
    tree = TreeReport()
    index_table, short = merge_index(root, ordered, cfg, tree)
    progress.say(f"reduce: {reduce_line(tree)}")
    files = write_index(target, index_table, cfg.layers)
    manifest = _manifest(p, ordered, files, index_table.num_rows, total, bad)
    manifest["counts"]["computed_shards"] = len(todo)
    manifest["pool"] = pool_sizes  # actors up over the map's time, at every change
    manifest["distinct"] = {"mode": cfg.distinct, "by": by_column(cfg.distinct)}
    if short is not None:
        manifest["distinct"].update(near=cfg.near, depth=cfg.depth, perceptual_short=short)
    manifest["reduce"] = {**tree.as_json(), "released_seconds": released}
    reduce_extra(cfg, root, target, ordered, manifest)
    manifest["timings"] = {
        "map_seconds": round(map_seconds, 3),
        "reduce_seconds": round(time.time() - reduce_started, 3),
        "total_seconds": round(time.time() - started, 3),
    }
    target.write_json(MANIFEST, manifest)
    progress.finish(manifest)
    return manifest


def reduce_extra(
    cfg: IndexConfig, root: Store, target: Store, records: list[CommitRecord], manifest: dict
) -> None:
    """Write what the run keeps beyond the top-k (samples, bottom, stats) into `target` and
    describe it in `manifest`."""
    if cfg.samples:
        table = samples_index(root, records, cfg)
        manifest["outputs"]["samples"] = write_samples(target, table, cfg.layers)
        manifest["samples"] = manifest_section(cfg.samples)
        manifest["counts"]["sample_rows"] = table.num_rows
    if cfg.bottom:
        bottom = bottom_index(root, records, cfg)
        manifest["outputs"]["bottom"] = write_index(target, bottom, cfg.layers, BOTTOM_DIR)
        manifest["counts"]["bottom_rows"] = bottom.num_rows
    if cfg.stats:
        merged = merge_stats(root, records, cfg.worker_wait)
        manifest["outputs"]["stats"] = write_stats(target, merged, cfg.layers)
        manifest["stats"] = {
            "probabilities": list(PROBABILITIES),
            "sketch": f"datasketches kll_floats_sketch k={SKETCH_K}",
            "rank_error": RANK_ERROR,
            "histogram_edges": EDGES.tolist(),
        }


def _committed(record: CommitRecord | None) -> CommitRecord:
    assert record is not None  # every shard was committed or the map stage raised
    return record


def check_precisions(records: list[CommitRecord]) -> None:
    """Refuse to merge shards computed in different precisions (`--precision auto` resumed on
    other hardware): their activations would be ranked against each other unfairly."""
    _check_alike(
        records, "precision", "float32", "{n} shards in {name}",
        "this run's shards were computed in different precisions ({seen}), e.g. resumed on "
        "other hardware; rerun with --precision float32 or --precision bfloat16 to compute them "
        "all alike",
    )  # fmt: skip


def check_decodes(records: list[CommitRecord]) -> None:
    """Refuse to merge shards decoded in different ways (`--decode auto` resumed on other
    hardware): device and Pillow decodes differ by a grey level here and there."""
    _check_alike(
        records, "decode", "pil", "{n} shards decoded by {name}",
        "this run's shards were decoded in different ways ({seen}), e.g. resumed on other "
        "hardware; rerun with --decode pil or --decode device to decode them all alike",
    )  # fmt: skip


def _check_alike(records: list[CommitRecord], key: str, before: str, each: str, why: str) -> None:
    """DataError `why` when the records' `key` (`before` where a record predates it) differ."""
    counts = Counter(str(record.get(key, before)) for record in records)
    if len(counts) > 1:
        seen = ", ".join(each.format(n=n, name=name) for name, n in sorted(counts.items()))
        raise DataError(why.format(seen=seen))


def check_bad_fraction(cfg: IndexConfig, store: Store, total: int, bad: int) -> None:
    if total and bad / total > cfg.max_bad_fraction:
        raise DataError(
            f"{bad} of {total} images ({bad / total:.1%}) could not be read, more than "
            f"--max-bad-fraction {cfg.max_bad_fraction}; see {store.uri(ERRORS)}, fix "
            "or remove them, or raise --max-bad-fraction (finished shards are kept for the rerun)"
        )


def _manifest(
    p: RunPlan, records: list[CommitRecord], files: list[str], rows: int, total: int, bad: int
) -> dict[str, Any]:
    return {
        "ninebest_version": __version__,
        "run": p.run_fingerprint,
        "config": p.cfg.to_json(),
        "preprocess": p.cfg.to_json()["preprocess"],
        "model": {
            "spec": p.cfg.model,
            "weights": p.cfg.weights,
            "fingerprint": p.model_fingerprint,
        },
        "data": {"source": p.cfg.data, "fingerprint": p.data_fingerprint},
        "layers": {name: list(shape) for name, shape in p.shapes.items()},
        "schemas": VERSIONS,
        "counts": {
            "images": total,
            "indexed": total - bad,
            "bad": bad,
            "shards": len(records),
            "index_rows": rows,
        },
        "outputs": {"index": files, "images": IMAGES, "errors": ERRORS},
        "shards": [
            {
                "key": r["shard"],
                "attempt": r["attempt"],
                "node": r.get("node"),
                "actor": r.get("actor"),
            }
            for r in records
        ],  # fmt: skip
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ray": ray_version(),
            "devices": sorted({r.get("device", "?") for r in records}),
            "precisions": sorted({r.get("precision", "float32") for r in records}),
            "decodes": sorted({r.get("decode", "pil") for r in records}),
            "worker_peak_rss_mb": max((r.get("peak_rss_mb", 0) for r in records), default=0),
            "driver_peak_rss_mb": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
            ),
        },
    }


def map_shards(
    p: RunPlan, todo: list[Shard | SpilledShard], pool_sizes: list[dict[str, float]]
) -> Iterator[CommitRecord]:
    """Run `todo` on an actor pool; yield each shard's commit record as it finishes.

    A shard's refs are loaded (a spilled one read back from scratch) only when it is dispatched.

    `pool_sizes` receives the pool's size over time ({"seconds", "actors"} at every change).
    """
    units = {name: shape[0] for name, shape in p.shapes.items()}
    args = (p.cfg, p.run_fingerprint, p.model_fingerprint)
    cfg = p.cfg
    listed = p.listed
    with Pool(ShardIndexer, args, cfg.workers, cfg.decode_threads, len(todo), cfg.worker_wait,
              cfg.gpus, in_flight=SHARDS_IN_FLIGHT) as pool:  # fmt: skip
        try:
            yield from pool.map(
                "index_shard", todo, call=lambda s: (s.load(), units, listed),
                name=lambda s: f"shard {s.key}",
            )  # fmt: skip
        finally:
            pool_sizes[:] = pool.history
