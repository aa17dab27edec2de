"""One storage layer over fsspec: local folders and object stores alike, every write all-or-nothing.

Local writes go to a temporary name in the same folder and are renamed into place (atomic on
POSIX). Object stores have no rename, but a single PUT (or a multipart upload, which the store
publishes only when completed) is atomic: there the object is written under its final key, and a
failed write is discarded rather than completed. Other filesystems (memory, SFTP, ...) write a
temporary name and move it into place. Either way no reader sees half a file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.store.retry import with_retries

UPLOAD_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"}  # publish on completion
ROW_GROUP_SIZE = 64 * 1024  # rows per Parquet row group: small enough for selective reads
WRITE_ATTEMPTS = 4  # a failed write is retried this many times in all


class Store:
    """A root folder or URL; every method takes paths relative to it, with '/' separators."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/") or url
        self.storage_options = storage_options or {}
        self.fs, self.root = fsspec.core.url_to_fs(url, **self.storage_options)
        self.root = self.root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.uploads = bool(UPLOAD_STORES & set(protocols))

    def child(self, rel: str) -> Store:
        """The Store rooted at `rel` below this one."""
        return Store(f"{self.url}/{rel}", self.storage_options)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def uri(self, rel: str) -> str:
        """A user-facing location of `rel` (plain path locally, URL elsewhere)."""
        return self.path(rel) if self.local else self.fs.unstrip_protocol(self.path(rel))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def read_parquet(self, rel: str) -> pa.Table:
        with self.fs.open(self.path(rel), "rb") as f:
            return pq.read_table(f)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write `data` at `rel` atomically, retrying transient failures with backoff."""

        def write() -> None:
            with self.open_atomic(rel) as f:
                f.write(data)

        with_retries(write, WRITE_ATTEMPTS)  # throttling, a dropped connection, a torn upload

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def write_parquet(self, rel: str, table: pa.Table, row_group_size: int = ROW_GROUP_SIZE):
        buffer = io.BytesIO()
        pq.write_table(table, buffer, row_group_size=row_group_size)
        self.write_bytes(rel, buffer.getvalue())

    @contextlib.contextmanager
    def open_atomic(self, rel: str) -> Iterator[Any]:
        """A binary file handle whose content appears at `rel` only if the block succeeds."""
        final = self.path(rel)
        if self.uploads:
            with self._upload(final) as f:
                yield f
            return
        if self.local:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            temp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(temp, "wb") as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(temp, final)
            finally:
                if os.path.exists(temp):
                    os.remove(temp)
            return
        temp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with self.fs.open(temp, "wb") as f:
                yield f
            self.fs.mv(temp, final)
        finally:
            if self.fs.exists(temp):
                self.fs.rm(temp)

    @contextlib.contextmanager
    def _upload(self, final: str) -> Iterator[Any]:
        f = self.fs.open(final, "wb")
        try:
            yield f
        except BaseException:
            f.discard()  # abort the upload: the object never appears
            f.closed = True  # so that garbage collection does not try to finish it
            raise
        f.close()

    @contextlib.contextmanager
    def parquet_writer(self, rel: str, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
        """Stream row batches into one Parquet file at `rel`, published atomically at the end."""
        with self.open_atomic(rel) as f:
            writer = pq.ParquetWriter(f, schema)
            try:
                yield writer
            finally:
                writer.close()

    def listdir(self, rel: str) -> list[str]:
        """Names directly under `rel` ([] when it does not exist)."""
        try:
            entries = self.fs.ls(self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def glob(self, pattern: str) -> list[str]:
        """Paths relative to the root matching `pattern` (fsspec glob: one listing of its
        prefix on an object store, not a request per name), sorted."""
        prefix = self.root + "/"
        found = self.fs.glob(self.path(pattern))
        return sorted(str(e)[len(prefix) :] for e in found if str(e).startswith(prefix))

    def remove(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=True)
