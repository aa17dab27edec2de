"""Versioned outputs of `ninebest reindex`: immutable versions, LATEST, a lock, pruning, history.

    OUT/versions/<run-id>/   one complete index (index/, images, errors, manifest, report, drift)
    OUT/LATEST               the run id of the newest complete version, replaced atomically last
    OUT/_LOCK                held by the running reindex; expires if its owner dies
    OUT/partials/            per-shard partials shared by every version (see partials.py)

Run ids sort by time (`20261125T031500Z-1a2b3c`), so version order is name order. A version is
complete once its manifest.json exists; readers follow LATEST and never see a half version.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import DataError
from pipeline.store.layout import (
    COMMIT,
    LATEST,
    LOCK,
    MANIFEST,
    PARTIALS,
    VERSIONS,
    index_file,
    partial_folder,
    version_folder,
)
from pipeline.store.storage import Store

LOCK_TTL = 15 * 60  # seconds a lock lives without a heartbeat
HEARTBEAT_EVERY = LOCK_TTL / 30  # seconds between routine heartbeats, at most one write each


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def version(store: Store, run_id: str) -> Store:
    return store.child(version_folder(run_id))


def latest(store: Store) -> str | None:
    if not store.exists(LATEST):
        return None
    return store.read_bytes(LATEST).decode().strip() or None


def set_latest(store: Store, run_id: str) -> None:
    store.write_bytes(LATEST, f"{run_id}\n".encode())


def complete(store: Store) -> list[str]:
    """Run ids of complete versions, oldest first."""
    return [
        r
        for r in store.listdir(VERSIONS)
        if store.exists(posixpath.join(version_folder(r), MANIFEST))
    ]


def newest(store: Store) -> Store:
    """Where the newest complete index under OUT lives: the LATEST version, else OUT itself."""
    run_id = latest(store)
    return version(store, run_id) if run_id is not None else store


@dataclass(frozen=True)
class Previous:
    """The newest complete output under OUT, which a reindex compares today's data against."""

    run_id: str  # its version's run id, or "index" for a plain `ninebest index` run in OUT
    store: Store  # where its files are
    manifest: dict[str, Any]  # its manifest.json


def previous(store: Store) -> Previous | None:
    """The newest complete output under OUT: the LATEST version, else a plain `index` run."""
    run_id = latest(store)
    if run_id is not None:
        target = version(store, run_id)
        return Previous(run_id, target, target.read_json(MANIFEST))
    if store.exists(MANIFEST):
        return Previous("index", store, store.read_json(MANIFEST))
    return None


@dataclass
class Lock:
    """An expiring lock file: a second reindex on the same OUT refuses while the first lives."""

    store: Store
    ttl: float = LOCK_TTL
    owner: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    )
    beaten: float = 0.0  # when the lock was last extended (time.monotonic)

    def __enter__(self) -> Lock:
        self.since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if self.store.exists(LOCK):
            held = self._held()
            if held.get("expires", 0) > time.time():
                until = time.strftime("%H:%M:%S", time.localtime(held["expires"]))
                raise DataError(
                    f"another reindex holds {self.store.url!r} (owner {held.get('owner')}, since "
                    f"{held.get('since')}); wait for it, or remove {LOCK} if that run is dead "
                    f"(it expires by itself at {until})"
                )
            self.store.remove(LOCK)  # expired: its owner died
        if self.store.local:  # create-if-absent is atomic on a local filesystem
            self._create_exclusively()
        self.heartbeat(force=True)
        return self

    def _create_exclusively(self) -> None:
        path = self.store.path(LOCK)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            raise DataError(
                f"another reindex took the lock on {self.store.url!r} a moment ago; wait for it"
            ) from None
        os.close(fd)

    def heartbeat(self, force: bool = False) -> None:
        """Extend the lock; stop if another run holds it (an expired lock taken over).

        Called after every finished shard, it writes at most every HEARTBEAT_EVERY seconds (an
        object store pays five requests per heartbeat); `force` checks and extends it now.
        """
        if not force and time.monotonic() - self.beaten < min(HEARTBEAT_EVERY, self.ttl / 30):
            return
        self.beaten = time.monotonic()
        if self.store.exists(LOCK) and self.store.read_bytes(LOCK).strip():
            if self.store.read_json(LOCK).get("owner") != self.owner:
                raise DataError(
                    f"another reindex took the lock on {self.store.url!r}; this run stops"
                )
        record = {"owner": self.owner, "since": self.since, "expires": time.time() + self.ttl}
        self.store.write_json(LOCK, record)
        if self.store.read_json(LOCK).get("owner") != self.owner:
            raise DataError(f"another reindex took the lock on {self.store.url!r}; this run stops")

    def __exit__(self, *exc) -> None:
        if self.store.exists(LOCK) and self._held().get("owner") == self.owner:
            self.store.remove(LOCK)

    def _held(self) -> dict[str, Any]:
        """The lock record; an empty file (its creator died, or is writing it this instant)
        counts as a lock of unknown owner that expires `ttl` after the file was made."""
        raw = self.store.read_bytes(LOCK)
        if raw.strip():
            return json.loads(raw)
        try:
            made = self.store.fs.modified(self.store.path(LOCK)).timestamp()
        except (NotImplementedError, OSError, AttributeError):
            made = time.time()
        return {"owner": "unknown (an empty lock file)", "since": "?", "expires": made + self.ttl}


def prune(store: Store, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete versions (never LATEST) and half-written ones,
    then the partial attempts no remaining version uses; return the removed run ids."""
    current = latest(store)
    done = complete(store)
    kept = set(done[-keep:]) | ({current} if current else set())
    removed = [r for r in store.listdir(VERSIONS) if r not in kept]
    for run_id in removed:
        store.remove(version_folder(run_id))
    used: dict[str, set[str]] = {}
    for target in [version(store, r) for r in sorted(kept)] + (
        [store] if store.exists(MANIFEST) else []
    ):
        for shard in target.read_json(MANIFEST)["shards"]:
            used.setdefault(shard["key"], set()).add(shard["attempt"])
    for key in store.listdir(PARTIALS):
        if key not in used:
            store.remove(posixpath.join(PARTIALS, key))
            continue
        for attempt in store.listdir(posixpath.join(PARTIALS, key)):
            if attempt != COMMIT and attempt not in used[key]:
                store.remove(partial_folder(key, attempt))
    return removed


def history(store: Store, layer: str, units: int | list[int]) -> pa.Table:
    """Units' top-k in every complete version, oldest first: version, unit, rank, activation, ..."""
    wanted = pa.array([units] if isinstance(units, int) else list(units), pa.int32())
    tables = []
    for run_id in complete(store):
        rel = posixpath.join(version_folder(run_id), index_file(layer))
        if not store.exists(rel):
            continue
        rows = store.read_parquet(rel)
        rows = rows.filter(pc.is_in(rows["unit"], value_set=wanted))
        tables.append(
            rows.append_column("version", pa.array([run_id] * rows.num_rows, pa.string()))
        )
    if not tables:
        raise DataError(
            f"no version under {store.url!r} indexes layer {layer!r}; "
            "run `ninebest reindex` first, or check --layer"
        )
    table = pa.concat_tables(tables)
    return table.select(["version", "unit", "rank", "activation", "image_id", "y", "x"])
