"""The commit protocol for per-shard partial results ("workers write fragments, driver commits").

An attempt at shard S writes its tables under `partials/S/<attempt>/`, then publishes
`partials/S/_COMMIT.json`, one small atomic write that names the attempt, the run fingerprint and
the shard's counts. Readers only ever follow a commit record, so files of a dead or duplicate
attempt are never read and no shard is counted twice; a commit of another run is ignored.
"""

from __future__ import annotations

import posixpath
import uuid
from typing import NotRequired, TypedDict, cast

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DataError
from pipeline.store.layout import partial_commit, partial_table
from pipeline.store.schemas import conform
from pipeline.store.storage import Store

RUN_KEY = b"ninebest.run"  # Parquet metadata: the run fingerprint that wrote the partial


class ShardReport(TypedDict):
    """What the map worker (or a reindex deriving a shard) reports about one shard."""

    images: int  # listed images the shard holds, bad ones included
    indexed: int  # of which decoded and indexed
    bad: int  # of which skipped (recorded in errors.parquet)
    rows: int  # rows in the partial's topk table
    seconds: NotRequired[float]  # compute time of the attempt
    device: NotRequired[str]  # "cpu", "cuda:0", ...
    precision: NotRequired[str]  # "float32" or "bfloat16"; absent in records before --precision
    decode: NotRequired[str]  # "pil" or "device"; absent in records before --decode (pil)
    peak_rss_mb: NotRequired[float]  # the worker's peak resident memory
    derived_from: NotRequired[str]  # reindex: the previous shard this partial was cut from


class AttemptRef(TypedDict):
    """Which attempt's tables to read: all a reader needs of a commit record."""

    shard: str  # the shard key
    attempt: str  # the attempt folder holding the tables
    run: str  # the run fingerprint that wrote them


class CommitRecord(ShardReport, AttemptRef):
    """OUT/partials/<shard>/_COMMIT.json: the attempt that counts for a shard, and its report."""


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
) -> CommitRecord:
    """Write one attempt's tables, then its commit record; return the record."""
    stamp = {RUN_KEY: run_fingerprint.encode()}
    for name, table, schema_name in (("topk", topk, "partial"), ("images", images, "images")):
        table = conform(table, schema_name)
        table = table.replace_schema_metadata({**table.schema.metadata, **stamp})
        store.write_parquet(partial_table(shard_key, attempt, name), table)
    record = CommitRecord(**report, shard=shard_key, attempt=attempt, run=run_fingerprint)
    store.write_json(partial_commit(shard_key), record)
    return record


def read_commit(store: Store, shard_key: str, run_fingerprint: str) -> CommitRecord | None:
    """The shard's commit record if it belongs to this run, else None (the shard must be run)."""
    rel = partial_commit(shard_key)
    if not store.exists(rel):
        return None
    record = store.read_json(rel)
    if record.get("run") != run_fingerprint or record.get("shard") != shard_key:
        return None
    return cast(CommitRecord, record)


def read_table(
    store: Store, record: AttemptRef, table: str, read_dictionary: list[str] | None = None
) -> pa.Table:
    """Read the committed attempt's `topk` or `images` table (one GET: partials are small).

    `read_dictionary` names string columns to keep dictionary-encoded, as Parquet stores them
    (the reduce decodes only the strings of rows it keeps).
    """
    assert table in ("topk", "images"), table
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
