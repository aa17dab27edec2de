"""`ninebest index` end to end: validate, plan shards, map on Ray actors, reduce, write manifest.

Everything a user can get wrong (model, weights, layers, data, output folder) is checked on the
driver before anything is written to OUT. Shards already committed by an earlier run with the
same fingerprint are reused (resume); the rest go to a pool of actors, one per GPU when the
cluster has GPUs, else `workers` CPU actors. A shard whose actor dies is retried elsewhere.
The manifest is written last: its presence means the index is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray
import torch

from . import __version__, partials
from .config import IndexConfig
from .data import ImageRef, Shard, data_fingerprint, list_images, plan_shards
from .errors import ConfigError, DataError
from .hooks import probe
from .models import load_model, resolve_layers
from .pool import Pool
from .progress import Progress
from .reduce import merge_partials, write_images, write_index
from .schemas import VERSIONS
from .storage import Store
from .worker import ShardIndexer

RUN_FILE = "run.json"
COMMIT_READERS = 32  # commit records read at once when a run starts (resume, reindex)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Plan:
    """What the driver validated and decided before the map stage."""

    cfg: IndexConfig
    model_fingerprint: str
    run_fingerprint: str
    data_fingerprint: str
    shapes: dict[str, tuple[int, ...]]  # layer -> (C,) or (C, H, W)
    refs: list[ImageRef]  # every listed image, sorted by image_id
    shards: list[Shard]


def plan(cfg: IndexConfig) -> Plan:
    """Validate the config against the model and data; nothing is written."""
    loaded = load_model(cfg.model, cfg.weights, cfg.storage_options)
    layers = resolve_layers(loaded.module, cfg.layers)
    shapes = probe(loaded.module, layers, cfg.preprocess.crop)
    refs = list_images(cfg.data, cfg.storage_options)
    if not refs:
        raise DataError(
            f"--data {cfg.data!r} holds no images (looked for common image extensions, .tar and "
            ".parquet files)"
        )
    run_fp = run_fingerprint(cfg, loaded.fingerprint)
    shards = plan_shards(refs, cfg.shard_size)
    return Plan(cfg, loaded.fingerprint, run_fp, data_fingerprint(refs), shapes, refs, shards)


def run_fingerprint(cfg: IndexConfig, model_fingerprint: str) -> str:
    """Hash of everything that changes a partial's content: model, weights, layers, k, geometry."""
    key = {
        "model": cfg.model,
        "weights": model_fingerprint,
        "layers": list(cfg.layers),
        "k": cfg.k,
        "depth": cfg.depth,
        "preprocess": cfg.to_json()["preprocess"],
        "precision": cfg.precision,
        "data": cfg.data,
        "schemas": {name: VERSIONS[name] for name in ("partial", "images")},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def write_run_file(store: Store, p: Plan) -> None:
    """Record the run's fingerprint in OUT: the first write, so an unwritable OUT fails here."""
    try:
        store.write_json(RUN_FILE, {"run": p.run_fingerprint, "config": p.cfg.to_json()})
    except OSError as e:
        raise DataError(f"cannot write to --out {store.url!r} ({e}); check that it exists") from e


def check_out(store: Store, p: Plan) -> None:
    """Refuse an OUT that holds another run, or files that are not a ninebest run."""
    if store.exists(RUN_FILE):
        previous = store.read_json(RUN_FILE)
        if previous.get("run") == p.run_fingerprint:
            return
        old, new = previous.get("config", {}), p.cfg.json()
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        what = ", ".join(differ) if differ else "model weights or ninebest's partial format"
        raise DataError(
            f"--out {store.url!r} already holds a different run ({what} differ); "
            "choose a new --out, or delete the old one"
        )
    if store.listdir(""):
        raise DataError(
            f"--out {store.url!r} is not empty and holds no ninebest run; "
            "choose a new or empty folder"
        )


def index(cfg: IndexConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run the whole index job; return the manifest written to OUT/manifest.json."""
    started = time.time()
    p = plan(cfg)
    store = Store(cfg.out, cfg.storage_options)
    check_out(store, p)
    write_run_file(store, p)
    return execute(p, store, store, p.shards, progress or Progress(), started)


def execute(
    p: Plan,
    root: Store,
    target: Store,
    shards: list[Shard],
    progress: Progress,
    started: float,
    on_shard: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Map the shards not yet committed under `root`, reduce all of them into `target`.

    `on_shard` runs after every finished shard (the reindex lock's heartbeat).
    """
    with ThreadPoolExecutor(max_workers=COMMIT_READERS) as readers:  # one request each
        found = readers.map(lambda s: partials.read_commit(root, s.key, p.run_fingerprint), shards)
        records = {s.key: record for s, record in zip(shards, found, strict=True)}
    todo = [s for s in shards if records[s.key] is None]
    progress.start(len(shards), len(shards) - len(todo))
    map_started = time.time()
    if todo:
        with ray_session(p.cfg.address):
            for record in map_shards(p, todo):
                records[record["shard"]] = record
                progress.shard_done(record)
                on_shard()
    map_seconds = time.time() - map_started
    ordered = [records[s.key] for s in shards]
    check_precisions(ordered)
    reduce_started = time.time()
    target.remove(MANIFEST)  # rewriting the outputs: OUT is incomplete until the new manifest
    total, bad = write_images(root, ordered, target)
    check_bad_fraction(p.cfg, target, total, bad)
    index_table = merge_partials(root, ordered, p.cfg.k)
    files = write_index(target, index_table, p.cfg.layers)
    manifest = _manifest(p, ordered, files, index_table.num_rows, total, bad)
    manifest["counts"]["computed_shards"] = len(todo)
    manifest["timings"] = {
        "map_seconds": round(map_seconds, 3),
        "reduce_seconds": round(time.time() - reduce_started, 3),
        "total_seconds": round(time.time() - started, 3),
    }
    target.write_json(MANIFEST, manifest)
    progress.finish(manifest)
    return manifest


def check_precisions(records: list[dict[str, Any]]) -> None:
    """Refuse to merge shards computed in different precisions (`--precision auto` resumed on
    other hardware): their activations would be ranked against each other unfairly."""
    counts = Counter(record.get("precision", "float32") for record in records)
    if len(counts) > 1:
        seen = ", ".join(f"{n} shards in {name}" for name, n in sorted(counts.items()))
        raise DataError(
            f"this run's shards were computed in different precisions ({seen}), e.g. resumed "
            "on other hardware; rerun with --precision float32 or --precision bfloat16 to "
            "compute them all alike"
        )


def check_bad_fraction(cfg: IndexConfig, store: Store, total: int, bad: int) -> None:
    if total and bad / total > cfg.max_bad_fraction:
        raise DataError(
            f"{bad} of {total} images ({bad / total:.1%}) could not be read, more than "
            f"--max-bad-fraction {cfg.max_bad_fraction}; see {store.uri('errors.parquet')}, fix "
            "or remove them, or raise --max-bad-fraction (finished shards are kept for the rerun)"
        )


def _manifest(p: Plan, records, files, rows: int, total: int, bad: int) -> dict:
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
        "outputs": {"index": files, "images": "images.parquet", "errors": "errors.parquet"},
        "shards": [{"key": r["shard"], "attempt": r["attempt"]} for r in records],
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "devices": sorted({r.get("device", "?") for r in records}),
            "precisions": sorted({r.get("precision", "float32") for r in records}),
            "worker_peak_rss_mb": max((r.get("peak_rss_mb", 0) for r in records), default=0),
            "driver_peak_rss_mb": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
            ),
        },
    }


class ray_session:
    """Connect to `address`, or start a local loopback instance; shut down only what we started."""

    def __init__(self, address: str | None):
        self.address = address
        self.started = False

    def __enter__(self) -> ray_session:
        if ray.is_initialized():
            return self
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if self.address is None and not os.environ.get("RAY_ADDRESS"):
            ray.init(
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                object_store_memory=256 * 1024**2,
                logging_level=logging.WARNING,
                runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(_import_paths())}},
            )
        else:
            try:
                ray.init(address=self.address, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = self.address or os.environ["RAY_ADDRESS"]
                raise ConfigError(
                    f"cannot connect to the Ray cluster at {where!r}"
                    f" ({str(e).splitlines()[0]}); check --address and that the cluster is up"
                ) from e
        self.started = True
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            ray.shutdown()


def _import_paths() -> list[str]:
    """The driver's import path, so a local instance's workers import what the driver can."""
    cwd = os.getcwd()
    return [cwd] + [p for p in sys.path if p and os.path.isdir(p) and p != cwd]


def map_shards(p: Plan, todo: list[Shard]):
    """Run `todo` on an actor pool; yield each shard's commit record as it finishes."""
    units = {name: shape[0] for name, shape in p.shapes.items()}
    args = (p.cfg, p.run_fingerprint, p.model_fingerprint)
    with Pool(ShardIndexer, args, p.cfg.workers, p.cfg.decode_threads, len(todo)) as pool:
        yield from pool.map(
            "index_shard", todo, call=lambda s: (s, units), name=lambda s: f"shard {s.key}"
        )
