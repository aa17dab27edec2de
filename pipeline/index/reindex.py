"""`ninebest reindex`: a new immutable version of the index, recomputing only what changed.

The index is always the exact merge of per-shard partials, and each partial keeps `depth` rows
per unit (k plus a buffer). Against the previous version (LATEST, or a plain `index` run):

- unchanged shard: its partial is reused as it is;
- shard that lost images (removed, or rewritten, by listing stamp and size): its partial minus
  those images is still exact for a unit if at least min(k, images left) rows remain, so a
  *derived* partial is written without reading a pixel; otherwise the shard is recomputed;
- new and rewritten images: new shards;
- containers (tar or Parquet files of images) are reindexed whole: an unchanged file keeps its
  shard and partial, a new or rewritten one is indexed, a removed one's shard is dropped.

Changed weights mean a full index; changed layers, k, buffer, preprocessing, data source,
precision, distinct mode, near, stats, bottom or samples need `--full`. Derived partials need
the top-k alone (no stats, bottom or perceptual index: those shards are recomputed, see
`derivable`), and with distinct content no removed image may share its bytes with one that
stays; statistics of reused shards are reused, so they stay exact. The result always equals a
from-scratch index of today's data (tests/test_reindex.py). A lock keeps two runs off one OUT;
a killed run leaves LATEST on the previous version and a rerun resumes from the committed
partials.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.config import LEGACY, IndexConfig
from pipeline.dataset.containers import READ_FAILED, container_of
from pipeline.dataset.refs import CONTAINER_KEY, ImageRef, Shard, shard_of
from pipeline.errors import ConfigError
from pipeline.index.distinct import NEAR, by_column
from pipeline.index.plan import Plan, check_out, plan, write_run_file
from pipeline.index.run import execute
from pipeline.index.topk import merge
from pipeline.progress import Progress
from pipeline.store import partials, versions
from pipeline.store.layout import DRIFT, IMAGES, REPORT, index_file
from pipeline.store.partials import AttemptRef, ShardReport
from pipeline.store.storage import Store
from pipeline.store.versions import Previous

COMPARED = ("model", "layers", "k", "buffer", "preprocess", "data", "precision", "decode", "draft",
            *LEGACY, "near")  # fmt: skip
# (changing any of them needs --full); the settings of versions written before one existed:
BEFORE = {"precision": "auto", "decode": "auto", "draft": False, **LEGACY, "near": NEAR}


@dataclass
class Delta:
    """How today's listing differs from the previous version's images."""

    new: list[ImageRef] = field(default_factory=list)
    changed: list[ImageRef] = field(default_factory=list)
    removed: set[str] = field(default_factory=set)
    unchanged: int = 0
    containers: dict[str, int] = field(default_factory=dict)  # new, changed, removed, unchanged
    retry: set[str] = field(default_factory=set)  # container shards whose read failed last time


def reindex(
    cfg: IndexConfig, keep: int | None = None, full: bool = False, progress: Progress | None = None
) -> dict[str, Any]:
    """Write a new version under OUT/versions/ and move LATEST to it; return the run report."""
    started = time.time()
    progress = progress or Progress()
    if keep is not None and keep < 1:
        raise ConfigError(f"--keep must be at least 1, got {keep}")
    p = plan(cfg)
    root = Store(cfg.out, cfg.storage_options)
    if versions.previous(root) is None:
        check_out(root, p)  # an empty OUT, or a refusal to write among foreign files
    with versions.Lock(root) as lock:
        prev = versions.previous(root)
        mode = decide(p, prev, full)
        if prev is not None and mode == "incremental":
            delta = compare(p, prev)
            shards, counts = incremental_shards(p, prev, delta, root)
        else:
            delta = Delta(
                new=[ref for ref in p.refs if not ref.is_container],
                containers={"new": sum(ref.is_container for ref in p.refs)},
            )
            counts = {"shards_reused": 0, "shards_derived": 0}
            shards = p.shards
        write_run_file(root, p)
        run_id = versions.new_run_id()
        target = versions.version(root, run_id)
        manifest = execute(p, root, target, shards, progress, started, lock.heartbeat)
        report = write_report(target, run_id, prev, mode, delta, counts, manifest, started)
        lock.heartbeat(force=True)  # still ours: only then publish and prune
        versions.set_latest(root, run_id)
        if keep:
            report["pruned"] = versions.prune(root, keep)
    progress.say(summary_line(report))
    return report


def decide(p: Plan, prev: Previous | None, full: bool) -> str:
    """'full' or 'incremental'; refuses a changed config unless --full."""
    if prev is None or full:
        return "full"
    old = prev.manifest["config"]
    new = p.cfg.to_json()
    differ = [key for key in COMPARED if old.get(key, BEFORE.get(key)) != new.get(key)]
    if differ:
        raise ConfigError(
            f"this reindex changes {', '.join(differ)} against the previous version of "
            f"{p.cfg.out!r}; pass --full to index from scratch with the new settings"
        )
    if prev.manifest["model"]["fingerprint"] != p.model_fingerprint:
        return "full"  # retrained weights: every activation changes
    if prev.manifest.get("run") != p.run_fingerprint:
        return "full"  # same settings, but partials of another format (an older ninebest)
    return "incremental"


def compare(p: Plan, prev: Previous) -> Delta:
    """Classify today's images and containers against the previous version's."""
    columns = ["image_id", "uri", "stamp", "bytes", "error", "shard"]
    images = prev.store.read_parquet(IMAGES).select(columns).to_pylist()
    before = {row["image_id"]: row for row in images if not _in_container(row["shard"])}
    loose = [ref for ref in p.refs if not ref.is_container]
    delta = Delta(removed=set(before) - {ref.image_id for ref in loose})
    for ref in loose:
        row = before.get(ref.image_id)
        if row is None:
            delta.new.append(ref)
        elif (
            row["stamp"] != ref.stamp
            or row["bytes"] not in (None, ref.size)
            or (row["error"] or "").startswith(READ_FAILED)  # not the file's fault: read again
        ):
            delta.changed.append(ref)
        else:
            delta.unchanged += 1
    _compare_containers(p, prev, images, delta)
    return delta


def _in_container(shard_key: str) -> bool:
    return shard_key.startswith(CONTAINER_KEY)


RETRY = "~"  # container shard key + RETRY + failed attempt: the container read again


def _base(shard_key: str) -> str:
    return shard_key.split(RETRY)[0]


def _compare_containers(p: Plan, prev: Previous, images: list[dict], delta: Delta):
    """Containers are compared whole, by their shard key (id, size and stamp of the file)."""
    rows = [row for row in images if _in_container(row["shard"])]
    old_files = {container_of(row["uri"]) for row in rows}
    old_keys = {
        _base(entry["key"]) for entry in prev.manifest["shards"] if _in_container(entry["key"])
    }
    delta.retry = {row["shard"] for row in rows if (row["error"] or "").startswith(READ_FAILED)}
    today = [(shard.key, shard.container) for shard in p.shards if shard.container is not None]
    counts = dict.fromkeys(("new", "changed", "removed", "unchanged"), 0)
    for key, container in today:
        if key in old_keys:
            counts["unchanged"] += 1
        else:
            counts["changed" if container.uri in old_files else "new"] += 1
    counts["removed"] = len(old_files - {container.uri for _, container in today})
    delta.containers = counts


def incremental_shards(p: Plan, prev: Previous, delta: Delta, root: Store):
    """Shards of the new version: reused, derived (written here), recomputed, and new ones."""
    gone = delta.removed | {ref.image_id for ref in delta.changed}
    today = {ref.image_id: ref for ref in p.refs}
    members = _members(prev.store)
    shards, counts = [], {"shards_reused": 0, "shards_derived": 0}
    attempts = {entry["key"]: entry["attempt"] for entry in prev.manifest["shards"]}
    listed = partials.committed(root)  # one listing answers "derived by an interrupted run?"
    previous = {_base(key): key for key in attempts if _in_container(key)}
    for shard in p.shards:  # containers: reused by key; one whose read failed is read again
        if shard.container is None:
            continue
        key = previous.get(shard.key)
        if key in delta.retry:  # a key of its own, so the failed partial is not reused
            shard = Shard(f"{shard.key}{RETRY}{attempts[key][:8]}", shard.refs)
        elif key is not None:
            shard = Shard(key, shard.refs)
            counts["shards_reused"] += 1
        shards.append(shard)
    for entry in prev.manifest["shards"]:
        if _in_container(entry["key"]):
            continue
        record = AttemptRef(shard=entry["key"], attempt=entry["attempt"], run=prev.manifest["run"])
        ids = members.get(record["shard"], [])
        if not gone.intersection(ids):
            shards.append(Shard(record["shard"], tuple(today[i] for i in ids)))
            counts["shards_reused"] += 1
            continue
        left = [today[i] for i in ids if i not in gone]
        if not left:
            continue
        shard = shard_of(left, "d")
        if derive(p, root, record, shard, gone, listed):
            counts["shards_derived"] += 1
        shards.append(shard)  # recomputed by the map stage unless derived
    fresh = sorted(delta.new + delta.changed, key=lambda r: r.image_id)
    for n, start in enumerate(range(0, len(fresh), p.cfg.shard_size)):
        shards.append(shard_of(fresh[start : start + p.cfg.shard_size], f"n{n:05d}"))
    return shards, counts


def _members(prev: Store) -> dict[str, list[str]]:
    table = prev.read_parquet(IMAGES).select(["image_id", "shard"])
    members: dict[str, list[str]] = defaultdict(list)
    for image_id, shard in zip(
        table["image_id"].to_pylist(), table["shard"].to_pylist(), strict=True
    ):
        members[shard].append(image_id)
    return members


def derive(
    p: Plan, root: Store, record: AttemptRef, shard: Shard, gone: set[str], listed: set[str]
) -> bool:
    """Commit `shard`'s partial as the previous partial minus `gone`, if that is still exact.

    `listed`: the shard keys with a commit record (`partials.committed`)."""
    if shard.key in listed and partials.read_commit(root, shard.key, p.run_fingerprint):
        return True  # committed by an earlier, interrupted run of this reindex
    if not derivable(p.cfg):
        return False
    topk = partials.read_table(root, record, "topk")
    images = partials.read_table(root, record, "images")
    keep = pa.array([i not in gone for i in topk["image_id"].to_pylist()], pa.bool_())
    topk = topk.filter(keep)
    stay = pa.array([i not in gone for i in images["image_id"].to_pylist()])
    if p.cfg.distinct != "id" and _content_stays(images, stay):
        return False  # a removed image's content stays under another id: its row is unknown
    images = images.filter(stay)
    good = images["error"].null_count  # images indexed (no error)
    need = min(p.cfg.k, good)
    if need and not _deep_enough(topk, p.shapes, need):
        return False
    images = images.set_column(
        images.schema.get_field_index("shard"), "shard", pa.array([shard.key] * images.num_rows)
    )
    report = ShardReport(
        images=images.num_rows,
        indexed=good,
        bad=images.num_rows - good,
        rows=topk.num_rows,
        derived_from=record["shard"],
    )
    topk = merge([topk], p.cfg.depth, by_column(p.cfg.distinct))  # re-rank 1..n in the shard
    partials.write(root, shard.key, partials.new_attempt(), p.run_fingerprint, topk, images, report)
    return True


def _content_stays(images: pa.Table, stay: pa.Array) -> bool:
    """Whether a removed image shares its content hash with an image that stays."""
    hashes = images["image_hash"].to_pylist()
    kept = {h for h, keep in zip(hashes, stay.to_pylist(), strict=True) if keep and h}
    return any(h in kept for h, keep in zip(hashes, stay.to_pylist(), strict=True) if not keep)


def derivable(cfg: IndexConfig) -> bool:
    """Whether a partial minus removed images can stay exact: not with statistics (a sketch,
    a minimum cannot forget an image), a bottom (not kept deeper than K), samples (a derived
    partial would lack their table) or a perceptual index (needs each shard's full top-depth
    contents); those shards are recomputed."""
    return not (cfg.stats or cfg.bottom or cfg.samples) and cfg.distinct != "perceptual"


def _deep_enough(topk: pa.Table, shapes: dict[str, tuple[int, ...]], need: int) -> bool:
    """Every unit of every layer keeps at least `need` rows."""
    counts = topk.group_by(["layer", "unit"]).aggregate([("rank", "count")])
    columns = (counts[c].to_pylist() for c in ("layer", "unit", "rank_count"))
    have = {(layer, unit): n for layer, unit, n in zip(*columns, strict=True)}
    return all(
        have.get((layer, unit), 0) >= need
        for layer, shape in shapes.items()
        for unit in range(shape[0])
    )


def drift(prev: Store, target: Store, layers: tuple[str, ...]) -> pa.Table:
    """Units whose top-k changed: layer, unit, entered and left image ids."""
    rows = []
    for layer in layers:
        old = _top_lists(prev, layer)
        new = _top_lists(target, layer)
        for unit in sorted(set(old) | set(new)):
            if old.get(unit) != new.get(unit):
                before, after = old.get(unit, []), new.get(unit, [])
                entered = [i for i in after if i not in before]
                left = [i for i in before if i not in after]
                rows.append({"layer": layer, "unit": unit, "entered": entered, "left": left})
    schema = pa.schema(
        [
            ("layer", pa.string()),
            ("unit", pa.int32()),
            ("entered", pa.list_(pa.string())),
            ("left", pa.list_(pa.string())),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def _top_lists(store: Store, layer: str) -> dict[int, list[str]]:
    rel = index_file(layer)
    if not store.exists(rel):
        return {}
    table = store.read_parquet(rel).sort_by([("unit", "ascending"), ("rank", "ascending")])
    lists: dict[int, list[str]] = defaultdict(list)
    for unit, image_id in zip(
        table["unit"].to_pylist(), table["image_id"].to_pylist(), strict=True
    ):
        lists[unit].append(image_id)
    return lists


def write_report(
    target: Store,
    run_id: str,
    prev: Previous | None,
    mode: str,
    delta: Delta,
    counts: dict[str, int],
    manifest: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """report.parquet (one row) and drift.parquet in the version; return the report."""
    drifted = drift(prev.store, target, tuple(manifest["layers"])) if prev else None
    seconds = time.time() - started
    processed = manifest["counts"]["computed_shards"]
    report = {
        "run_id": run_id,
        "previous": prev.run_id if prev else None,
        "mode": mode,
        "images": manifest["counts"]["images"],
        "images_new": len(delta.new),
        "images_changed": len(delta.changed),
        "images_removed": len(delta.removed),
        "images_unchanged": delta.unchanged,
        **{f"containers_{name}": count for name, count in delta.containers.items()},
        "shards": manifest["counts"]["shards"],
        "shards_reused": counts["shards_reused"],
        "shards_derived": counts["shards_derived"],
        "shards_computed": processed,
        "units_drifted": drifted.num_rows if drifted is not None else 0,
        "seconds": round(seconds, 3),
        "map_seconds": manifest["timings"]["map_seconds"],
    }
    target.write_parquet(REPORT, pa.Table.from_pylist([report]))
    if drifted is not None:
        target.write_parquet(DRIFT, drifted)
    return report


def _containers(report: dict[str, Any]) -> str:
    names = ("new", "changed", "removed", "unchanged")
    if not any(report.get(f"containers_{name}") for name in names):
        return ""
    counts = ", ".join(f"{report.get(f'containers_{name}', 0)} {name}" for name in names)
    return f"containers {counts}; "


def summary_line(report: dict[str, Any]) -> str:
    return (
        f"reindex {report['run_id']} ({report['mode']}): {report['images']} images, "
        f"{report['images_new']} new, {report['images_changed']} changed, "
        f"{report['images_removed']} removed; {_containers(report)}"
        f"shards {report['shards_reused']} reused, "
        f"{report['shards_derived']} derived, {report['shards_computed']} computed; "
        f"{report['units_drifted']} units' top-k changed; {report['seconds']:.1f} s"
    )
