"""The commit protocol for per-shard partial results ("workers write fragments, driver commits").

An attempt at shard S writes its tables under `partials/S/<attempt>/`, then publishes
`partials/S/_COMMIT.json`, one small atomic write that names the attempt, the run fingerprint and
the shard's counts. Readers only ever follow a commit record, so files of a dead or duplicate
attempt are never read and no shard is counted twice; a commit of another run is ignored.
Besides `topk` and `images`, an attempt holds the optional tables its run keeps (EXTRA: bottom,
stats, phash, samples), listed in the record under "tables"; partials written before they
existed hold none and still read.
"""

from __future__ import annotations

import posixpath
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NotRequired, TypedDict, cast

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DataError
from pipeline.store.layout import COMMIT, PARTIALS, partial_commit, partial_table
from pipeline.store.schemas import conform
from pipeline.store.storage import Store

RUN_KEY = b"ninebest.run"  # Parquet metadata: the run fingerprint that wrote the partial
COMMIT_READERS = 32  # commit records read at once (resume, reindex): object-store latency


class ShardReport(TypedDict):
    """What the map worker (or a reindex deriving a shard) reports about one shard."""

    images: int  # listed images the shard holds, bad ones included
    indexed: int  # of which decoded and indexed
    bad: int  # of which skipped (recorded in errors.parquet)
    rows: int  # rows in the partial's topk table
    seconds: NotRequired[float]  # compute time of the attempt
    started: NotRequired[float]  # when the attempt began (unix time): fixed-cost measurements
    device: NotRequired[str]  # "cpu", "cuda:0", ...
    precision: NotRequired[str]  # "float32" or "bfloat16"; absent in records before --precision
    decode: NotRequired[str]  # "pil" or "device"; absent in records before --decode (pil)
    peak_rss_mb: NotRequired[float]  # the worker's peak resident memory
    device_seconds: NotRequired[float]  # of `seconds`, time holding the device (forward passes)
    node: NotRequired[str]  # the Ray node id that computed it (runtime context's get_node_id)
    actor: NotRequired[str]  # the Ray actor id that computed it
    derived_from: NotRequired[str]  # reindex: the previous shard this partial was cut from
    sample_threshold: NotRequired[int]  # --samples: the priority threshold of the sample S


class AttemptRef(TypedDict):
    """Which attempt's tables to read: all a reader needs of a commit record."""

    shard: str  # the shard key
    attempt: str  # the attempt folder holding the tables
    run: str  # the run fingerprint that wrote them
    tables: NotRequired[list[str]]  # the optional tables (EXTRA) it holds; absent: none


class CommitRecord(ShardReport, AttemptRef):
    """OUT/partials/<shard>/_COMMIT.json: the attempt that counts for a shard, and its report."""


EXTRA = {  # optional partial tables -> their schema
    "bottom": "partial",  # the shard's bottom rows per unit (rank 1 the lowest)
    "stats": "stats_state",  # per-unit running statistics and quantile sketches
    "phash": "phash",  # pHash of each content in topk (--distinct perceptual)
    "samples": "samples_state",  # the shard's images of the uniform sample S, every unit
}


def new_attempt() -> str:
    return uuid.uuid4().hex[:12]


def write(
    store: Store,
    shard_key: str,
    attempt: str,
    run_fingerprint: str,
    topk: pa.Table,
    images: pa.Table,
    report: ShardReport,
    extra: dict[str, pa.Table] | None = None,
) -> CommitRecord:
    """Write one attempt's tables, then its commit record; return the record.

    `extra` holds the optional tables (EXTRA: name -> schema) of runs that keep them; the
    record lists them under "tables" (absent: a partial of topk and images only).
    """
    stamp = {RUN_KEY: run_fingerprint.encode()}
    tables = [("topk", topk, "partial"), ("images", images, "images")]
    tables += [(name, table, EXTRA[name]) for name, table in sorted((extra or {}).items())]
    for name, table, schema_name in tables:
        table = conform(table, schema_name)
        table = table.replace_schema_metadata({**table.schema.metadata, **stamp})
        store.write_parquet(partial_table(shard_key, attempt, name), table)
    record = CommitRecord(**report, shard=shard_key, attempt=attempt, run=run_fingerprint)
    if extra:
        record["tables"] = sorted(extra)
    store.write_json(partial_commit(shard_key), record)
    return record


def committed(store: Store) -> set[str]:
    """Keys of the shards with a commit record under partials/, of any run: one listing."""
    found = store.glob(posixpath.join(PARTIALS, "*", COMMIT))
    return {posixpath.basename(posixpath.dirname(rel)) for rel in found}


def read_commits(
    store: Store, shard_keys: Sequence[str], run_fingerprint: str
) -> dict[str, CommitRecord | None]:
    """`read_commit` of every shard, answered from one listing of partials/: only the records
    it finds are read (COMMIT_READERS at a time), so a fresh run of N shards makes one request,
    not N."""
    listed = committed(store)
    found: dict[str, CommitRecord | None] = dict.fromkeys(shard_keys)
    present = [key for key in shard_keys if key in listed]
    with ThreadPoolExecutor(max_workers=COMMIT_READERS) as readers:
        records = readers.map(lambda key: read_commit(store, key, run_fingerprint), present)
        found.update(zip(present, records, strict=True))
    return found


def read_commit(store: Store, shard_key: str, run_fingerprint: str) -> CommitRecord | None:
    """The shard's commit record if it belongs to this run, else None (the shard must be run)."""
    try:
        record = store.read_json(partial_commit(shard_key))
    except FileNotFoundError:  # never committed, or removed since it was listed
        return None
    if record.get("run") != run_fingerprint or record.get("shard") != shard_key:
        return None
    return cast(CommitRecord, record)


def read_table(
    store: Store, record: AttemptRef, table: str, read_dictionary: list[str] | None = None
) -> pa.Table:
    """Read the committed attempt's `topk`, `images` or one of its EXTRA tables (one GET:
    partials are small).

    `read_dictionary` names string columns to keep dictionary-encoded, as Parquet stores them
    (the reduce decodes only the strings of rows it keeps).
    """
    assert table in ("topk", "images", *EXTRA), table
    if table in EXTRA and table not in record.get("tables", []):
        raise DataError(
            f"the partial of shard {record['shard']!r} has no {table} table (written by a run "
            f"without it); rerun with --full to compute it"
        )
    rel = partial_table(record["shard"], record["attempt"], table)
    raw = pa.BufferReader(store.read_bytes(rel))
    data = pq.ParquetFile(raw, read_dictionary=read_dictionary).read()
    written_by = (data.schema.metadata or {}).get(RUN_KEY, b"").decode()
    if written_by != record["run"]:
        raise DataError(
            f"partial {store.uri(rel)} was written by run {written_by[:12] or '?'}, not by this "
            f"run ({record['run'][:12]}); remove {store.uri(posixpath.dirname(rel))} and rerun"
        )
    return data
