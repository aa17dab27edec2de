"""A folder's images and containers streamed in `image_id` order, one listing per directory.

`listing.list_images` used to list a whole tree at once (`fs.find`, a dict of every file) and
then sort it; a tree of 10^7 loose images is then 10^7 records on the driver before the first
shard is planned. `walk_folder` walks the tree depth first instead, with one
`fs.ls(path, detail=True)` per directory, and orders each directory's entries by
`name + "/"` for a subdirectory and `name` for a file. That yields exactly the global code-point
order of the relative paths (what `sorted(refs, key=image_id)` gives): every path under a
directory `d` starts with `d/`, and a sibling name (which holds no `/`) compares with all of them
as it compares with `d/` (tests/dataset/test_walk.py checks it on random trees). The driver so
holds one directory's entries per level of the path it is in, never the tree (object-store
filesystems' listing caches are dropped as the walk goes).

Entries are what `list_images` listed from a folder: files whose names have an image or
container extension, ids relative to the root, sizes and stamps as the listing reports them,
img2dataset's `x.parquet` beside `x.tar` dropped (both are in the same directory), a directory
that cannot be listed omitted as `fs.find` omits it, and a name that is not valid UTF-8 refused.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.dataset.refs import ImageRef, kind_of
from pipeline.errors import DataError


def walk_folder(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[ImageRef]:
    """Every image and container under the directory `root`, sorted by `image_id`."""
    root = root.rstrip("/")
    stack = [iter(_children(fs, root, root))]  # one sorted directory listing per level
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
        elif isinstance(entry, str):  # a subdirectory: walk it before its next sibling
            stack.append(iter(_children(fs, entry, root)))
        else:
            yield entry


def _children(fs: fsspec.AbstractFileSystem, path: str, root: str) -> list[str | ImageRef]:
    """`path`'s subdirectories (as paths) and listed files (as refs), in walk order."""
    try:
        listing = fs.ls(path, detail=True)
    except (FileNotFoundError, OSError):  # as fs.find (fs.walk's on_error="omit") skips it
        return []
    fs.invalidate_cache(path)  # object stores (s3fs, gcsfs) would keep every listing otherwise
    keyed: list[tuple[str, str | ImageRef]] = []
    files: list[ImageRef] = []
    for info in listing:
        name = info["name"].rstrip("/")
        if info.get("type") == "directory":
            if name != path:  # some stores list a directory inside itself
                keyed.append((posixpath.relpath(name, root) + "/", name))
        elif info.get("type") == "file" and (kind := kind_of(name)):
            rel = posixpath.relpath(name, root)
            files.append(ImageRef(rel, uri_of(fs, name), info.get("size"), stamp(info), kind))
    for ref in without_sidecars(files):
        check_utf8(ref.image_id)
        keyed.append((ref.image_id, ref))
    keyed.sort(key=lambda pair: pair[0])
    return [entry for _, entry in keyed]


def uri_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A listed path as a URI: plain on local disk, with its protocol elsewhere."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def without_sidecars(refs: list[ImageRef]) -> list[ImageRef]:
    """Drop `x.parquet` beside `x.tar`: img2dataset's per-shard metadata, not image bytes."""
    tars = {ref.uri.removesuffix(".tar") for ref in refs if ref.kind == "tar"}
    return [r for r in refs if not (r.kind == "parquet" and r.uri[: -len(".parquet")] in tars)]


def stamp(info: dict) -> str | None:
    """What changes when a file is rewritten: its ETag on object stores, else its mtime."""
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return None


def check_utf8(image_id: str) -> None:
    """Refuse an id that cannot be stored as a UTF-8 string (a file name of undecodable bytes)."""
    try:
        image_id.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(
            f"file name {image_id!r} under --data is not valid UTF-8; rename it "
            "(image ids are stored as UTF-8 strings)"
        ) from None
