"""Datasets: list images from a folder, an fsspec URL or a manifest, and cut them into shards.

`image_id` is stable across runs: the path relative to the dataset root (forward slashes), or the
URI exactly as a manifest writes it. Images are sorted by `image_id` and cut into consecutive
shards of `shard_size`; a shard's key hashes its ids, file sizes and stamps (modification time or
ETag, as the listing reports them), so a resumed run reuses a partial only for the same files.
"""

from __future__ import annotations

import hashlib
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from .errors import DataError, InputNotFoundError

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
)  # fmt: skip
MANIFEST_SUFFIXES = (".txt", ".parquet")


@dataclass(frozen=True)
class ImageRef:
    image_id: str  # stable id, the tie-breaker of every ordering
    uri: str  # local path or fsspec URL to read the bytes from
    size: int | None = None  # bytes, when the listing knows it
    stamp: str | None = None  # modification time or ETag, when the listing knows it


@dataclass(frozen=True)
class Shard:
    key: str  # "<ordinal>-<digest>": unique for these images at these sizes
    refs: tuple[ImageRef, ...]  # sorted by image_id


def list_images(data: str, storage_options: dict | None = None) -> list[ImageRef]:
    """Every image under `data` (folder, URL or manifest), sorted by image_id."""
    fs, path = fsspec.core.url_to_fs(data, **(storage_options or {}))
    if not fs.exists(path):
        raise InputNotFoundError(f"--data {data!r} does not exist; pass a folder, URL or manifest")
    if fs.isdir(path):
        refs = _list_folder(fs, path)
    elif path.endswith(MANIFEST_SUFFIXES):
        refs = _stat(_read_manifest(fs, path, data), storage_options or {})
    else:
        raise DataError(
            f"--data {data!r} is a file but not a manifest; pass a folder, or a "
            f"{' or '.join(MANIFEST_SUFFIXES)} file listing image URIs"
        )
    for ref in refs:
        try:
            ref.image_id.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(
                f"file name {ref.image_id!r} under --data is not valid UTF-8; rename it "
                "(image ids are stored as UTF-8 strings)"
            ) from None
    return sorted(refs, key=lambda r: r.image_id)


def _list_folder(fs: fsspec.AbstractFileSystem, root: str) -> list[ImageRef]:
    root = root.rstrip("/")
    found = fs.find(root, detail=True)
    refs = []
    for path, info in found.items():
        if info.get("type") != "file" or not path.lower().endswith(IMAGE_EXTENSIONS):
            continue
        image_id = posixpath.relpath(path, root)
        refs.append(ImageRef(image_id, _uri(fs, path), info.get("size"), _stamp(info)))
    return refs


def _stamp(info: dict) -> str | None:
    """What changes when a file is rewritten: its ETag on object stores, else its mtime."""
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return None


def _uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _read_manifest(fs: fsspec.AbstractFileSystem, path: str, data: str) -> list[ImageRef]:
    if path.endswith(".parquet"):
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        if "uri" not in table.column_names:
            raise DataError(
                f"manifest {data!r} has columns {table.column_names}; it needs a 'uri' column"
            )
        uris = [u for u in table["uri"].to_pylist() if u]
    else:
        with fs.open(path, "rt") as f:
            uris = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    seen: set[str] = set()
    twice = [u for u in uris if u in seen or seen.add(u)]
    if twice:
        raise DataError(
            f"manifest {data!r} lists {len(twice)} URIs more than once (e.g. {twice[0]!r}); "
            "each image must appear once or it would be counted twice"
        )
    base = posixpath.dirname(path)
    return [ImageRef(u, _resolve(fs, base, u)) for u in uris]


def _stat(refs: list[ImageRef], storage_options: dict) -> list[ImageRef]:
    """Size and stamp of every manifest entry, so rewritten files are noticed (resume, reindex).

    One metadata request per entry, 16 at a time; an entry that does not exist keeps None and
    is reported as unreadable when the map stage reads it.
    """

    def stat(ref: ImageRef) -> ImageRef:
        try:
            fs, path = fsspec.core.url_to_fs(ref.uri, **storage_options)
            info = fs.info(path)
        except Exception:  # missing or unreachable: the map stage records why it cannot read it
            return ref
        return ImageRef(ref.image_id, ref.uri, info.get("size"), _stamp(info))

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(stat, refs))


def _resolve(fs: fsspec.AbstractFileSystem, base: str, uri: str) -> str:
    """Manifest entries may be absolute, URLs, or relative to the manifest's folder."""
    if "://" in uri or uri.startswith("/"):
        return uri
    return _uri(fs, posixpath.join(base, uri))


def plan_shards(refs: list[ImageRef], shard_size: int) -> list[Shard]:
    """Cut sorted refs into consecutive shards of `shard_size`, each with a content-derived key."""
    shards = []
    for ordinal, start in enumerate(range(0, len(refs), shard_size)):
        chunk = tuple(refs[start : start + shard_size])
        shards.append(Shard(f"{ordinal:06d}-{data_fingerprint(chunk)[:16]}", chunk))
    return shards


def shard_of(refs: list[ImageRef] | tuple[ImageRef, ...], prefix: str) -> Shard:
    """A shard of exactly these refs (sorted by image_id), keyed `<prefix>-<digest>`."""
    chunk = tuple(sorted(refs, key=lambda r: r.image_id))
    return Shard(f"{prefix}-{data_fingerprint(chunk)[:16]}", chunk)


def data_fingerprint(refs: list[ImageRef] | tuple[ImageRef, ...]) -> str:
    """sha256 over every (image_id, size, stamp): changes when an image is added, removed or
    rewritten."""
    digest = hashlib.sha256()
    for ref in refs:
        digest.update(f"{ref.image_id}\0{ref.size}\0{ref.stamp}\n".encode())
    return digest.hexdigest()
