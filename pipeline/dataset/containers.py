"""Read image bytes: loose files, members of tar shards, and rows of Parquet files of image bytes.

Datasets of 10^8 to 10^9 images are stored as a few thousand large files: WebDataset-style tar
shards (img2dataset, webdataset's ShardWriter) or Parquet files with a column of encoded images
(img2dataset's parquet output, Hugging Face datasets). A container is one map shard; its worker
streams it once, front to back, so an object store serves one sequential read per container.

Members are named so that users and the export step can find them again:

* a tar member: id `<container id>/<member name>` (a leading `./` dropped), URI
  `tar://<member name as stored>::<container URI>` (fsspec opens it: `fsspec.open(uri, "rb")`);
* a Parquet row: id `<container id>/<key>` when the file has a string `key` column (as
  img2dataset writes), else `<container id>/<row, 9 digits>`; URI `parquet://<row>::<container
  URI>` (`read_bytes` opens it).

A shard's positions must follow `image_id` order: the top-k breaks ties by position. Parquet ids
are known before any image is read (one column), so positions are their ranks. A tar is read once
when its members are stored in name order, as WebDataset writers store them; a tar out of order
raises `Unsorted` and is indexed again with positions from a first pass over its names.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Self

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.dataset.refs import ImageRef, kind_of
from pipeline.errors import DataError
from pipeline.store.retry import with_retries

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes", "bytes")
KEY_COLUMN = "key"
PARQUET_BATCH = 64  # rows decoded from Parquet at once
READ_ATTEMPTS = 3
READ_FAILED = "read failed: "  # prefix of errors a rerun should retry (not the file's fault)


@dataclass(frozen=True)
class Member:
    """One image of a container: where it sorts, how to find it again, and its bytes."""

    position: int  # rank of its id within the container; -1 for the container's own error
    ref: ImageRef  # the member's id, URI, size and the container's stamp
    data: bytes | None  # None when `error` says why there are no bytes
    error: str | None = None


class Unsorted(Exception):
    """A tar's members are not stored in name order; index it with `tar_order`."""


def members(
    container: ImageRef, storage_options: dict, order: dict[str, int] | None = None
) -> Iterator[Member]:
    """Every image in `container`, in storage order, with positions in id order.

    A container that cannot be parsed (truncated, not a tar, no image column) or no longer
    exists ends with one Member whose `error` says why, after the images that could be read.
    Other I/O errors propagate: the shard is retried rather than recorded short of images.
    """
    if container.kind == "tar":
        read = _tar_members(container, storage_options, order)
    else:
        read = _parquet_members(container, storage_options)  # ids known up front: no order
    try:
        yield from read
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        yield _broken(container, f"{READ_FAILED}{type(e).__name__}: {e}")


def tar_order(container: ImageRef, storage_options: dict) -> dict[str, int]:
    """Member name -> rank in name order, read from the tar's headers (one streaming pass)."""
    names: set[str] = set()
    try:
        with fsspec.open(container.uri, "rb", **storage_options) as f:
            with tarfile.open(fileobj=f, mode="r|", tarinfo=_StrictTarInfo) as tar:
                names.update(name for info in tar if (name := _image_name(info)))
    except (tarfile.TarError, EOFError):
        pass  # the indexing pass records where the tar breaks
    return {name: rank for rank, name in enumerate(sorted(names))}


def _image_name(info: tarfile.TarInfo) -> str | None:
    """The member's name if it is an image file with a UTF-8 name, else None."""
    name = info.name.removeprefix("./")
    return name if info.isfile() and kind_of(name) == "image" and _utf8(name) else None


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")  # tarfile keeps undecodable bytes as surrogates
    except UnicodeEncodeError:
        return False
    return True


# tarfile's header errors exist at runtime but are private, so typeshed leaves them out.
_HeaderError = type[tarfile.HeaderError]
_EmptyHeaderError: _HeaderError = tarfile.EmptyHeaderError  # type: ignore[attr-defined]
_TruncatedHeaderError: _HeaderError = tarfile.TruncatedHeaderError  # type: ignore[attr-defined]
_InvalidHeaderError: _HeaderError = tarfile.InvalidHeaderError  # type: ignore[attr-defined]
_SubsequentHeaderError: _HeaderError = tarfile.SubsequentHeaderError  # type: ignore[attr-defined]


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile ends an archive quietly at an empty, short or invalid header after the first
    member, as if the file were complete; here those are damage (only zero blocks end it)."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tarfile_)
        except (_EmptyHeaderError, _TruncatedHeaderError) as e:
            why = f"the tar ends early, without its end-of-archive blocks ({e})"
            raise _SubsequentHeaderError(why) from None
        except _InvalidHeaderError as e:
            raise _SubsequentHeaderError(f"damaged header at byte {tarfile_.offset}: {e}") from None


def _tar_members(
    container: ImageRef, storage_options: dict, order: dict[str, int] | None
) -> Iterator[Member]:
    seen: set[str] = set()
    previous = ""
    with fsspec.open(container.uri, "rb", **storage_options) as f:
        try:
            with tarfile.open(fileobj=f, mode="r|", tarinfo=_StrictTarInfo) as tar:
                for info in tar:
                    name = _image_name(info)
                    if name is None and info.isfile() and not _utf8(info.name):
                        yield _bad_name(container, info.name)
                    if name is None or name in seen:  # not an image, or a repeated name
                        continue
                    if order is None and name < previous:
                        raise Unsorted(f"{container.uri}: {name!r} is stored after {previous!r}")
                    stream = tar.extractfile(info)
                    assert stream is not None  # a regular file (`_image_name` checked) has bytes
                    data = stream.read()
                    position = len(seen) if order is None else order[name]
                    seen.add(name)
                    previous = name
                    ref = ImageRef(
                        f"{container.image_id}/{name}",
                        f"tar://{info.name}::{container.uri}",  # as stored: fsspec's index
                        info.size,
                        container.stamp,
                        offset=info.offset_data,
                    )
                    yield Member(position, ref, data)
        except (tarfile.TarError, EOFError) as e:
            yield _broken(container, f"unreadable tar after {len(seen)} images: {e}")


def _parquet_members(container: ImageRef, storage_options: dict) -> Iterator[Member]:
    with fsspec.open(container.uri, "rb", **storage_options) as f:
        seen: set[str] = set()
        try:
            parquet = pq.ParquetFile(f)
            column = image_column(parquet.schema_arrow, container.uri)
            names = _row_names(parquet)
            ranks = {name: rank for rank, name in enumerate(sorted(set(names)))}
            batches = parquet.iter_batches(batch_size=PARQUET_BATCH, columns=[column])
            rows = (value for batch in batches for value in _bytes_of(batch.column(0)))
            for row, value in enumerate(rows):
                if names[row] in seen:  # a repeated key: the first row wins
                    continue
                seen.add(names[row])
                size = None if value is None else len(value)
                ref = ImageRef(
                    f"{container.image_id}/{names[row]}",
                    f"parquet://{row}::{container.uri}",
                    size,
                    container.stamp,
                )
                error = None if value else "no image bytes in this row"
                yield Member(ranks[names[row]], ref, value or None, error)
        except (DataError, pa.ArrowException) as e:
            yield _broken(container, f"unreadable parquet after {len(seen)} images: {e}")
        except OSError as e:  # pyarrow reports damaged pages as OSError, like a failed read:
            # recorded (never crashing the job) and read again by the next reindex
            why = f"unreadable parquet after {len(seen)} images: {e}"
            yield _broken(container, f"{READ_FAILED}{why}")


def _broken(container: ImageRef, why: str) -> Member:
    return Member(-1, container, None, why)


def _bad_name(container: ImageRef, name: str) -> Member:
    """A member whose name is not UTF-8: recorded under an escaped id, never indexed."""
    shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    ref = ImageRef(f"{container.image_id}/{shown}", container.uri, None, container.stamp)
    return Member(-1, ref, None, "member name is not valid UTF-8; rename it in the tar")


def image_column(schema: pa.Schema, where: str) -> str:
    """The column holding encoded images: binary, or a struct with a binary `bytes` field."""
    for name in IMAGE_COLUMNS:
        if name in schema.names and _holds_bytes(schema.field(name).type):
            return name
    binary = [field.name for field in schema if _holds_bytes(field.type)]
    if len(binary) == 1:
        return binary[0]
    raise DataError(
        f"{where} has no single column of image bytes (columns: {', '.join(schema.names)}); "
        f"name it one of {', '.join(IMAGE_COLUMNS)}"
    )


def _holds_bytes(kind: pa.DataType) -> bool:
    if pa.types.is_struct(kind):
        index = kind.get_field_index("bytes")
        return index >= 0 and _holds_bytes(kind.field(index).type)
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _row_names(parquet: pq.ParquetFile) -> list[str]:
    """Each row's name within the file: its `key`, or its row number."""
    schema = parquet.schema_arrow
    if KEY_COLUMN in schema.names and pa.types.is_string(schema.field(KEY_COLUMN).type):
        keys = parquet.read(columns=[KEY_COLUMN]).column(0).to_pylist()
        if None not in keys:
            return keys
    return [f"{row:09d}" for row in range(parquet.metadata.num_rows)]


def _bytes_of(column: pa.Array) -> list[bytes | None]:
    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    return column.to_pylist()


def read_bytes(
    uri: str, storage_options: dict, offset: int | None = None, size: int | None = None
) -> bytes:
    """The bytes of a loose file, a tar member or a Parquet row, retrying transient failures.

    A tar member with its `offset` and `size` (images.parquet has both) is one ranged read of
    the container; without them fsspec's tar filesystem scans the archive's headers first.
    """

    def read() -> bytes:
        if uri.startswith("parquet://"):
            return _parquet_row(uri, storage_options)
        if uri.startswith("tar://") and offset is not None and size is not None:
            fs, path = fsspec.core.url_to_fs(container_of(uri), **storage_options)
            return fs.cat_file(path, start=offset, end=offset + size)
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
        return fs.cat_file(path)  # one GET on object stores (open would HEAD first)

    return with_retries(read, READ_ATTEMPTS)


def container_of(uri: str) -> str:
    """The container URI of a member URI (a loose file's URI is returned as it is)."""
    if uri.startswith(("tar://", "parquet://")) and "::" in uri:
        return uri.split("::", 1)[1]
    return uri


def _parquet_row(uri: str, storage_options: dict) -> bytes:
    """`parquet://<row>::<file>`: read only the row group that holds the row."""
    row_text, _, url = uri.removeprefix("parquet://").partition("::")
    row = int(row_text)
    with fsspec.open(url, "rb", **storage_options) as f:
        parquet = pq.ParquetFile(f)
        column = image_column(parquet.schema_arrow, url)
        for group in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if row < rows:
                table = parquet.read_row_group(group, columns=[column])
                value = _bytes_of(table.column(0).combine_chunks().slice(row, 1))[0]
                if value is None:
                    raise FileNotFoundError(f"{uri}: no image bytes in this row")
                return value
            row -= rows
    raise FileNotFoundError(f"{uri}: the file has fewer rows")
