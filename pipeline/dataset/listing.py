"""Datasets: list images from a folder, URL, pattern or manifest, and cut them into shards.

A listing holds loose image files and containers: WebDataset-style `.tar` shards and Parquet files
of image bytes (see `sources`), which is how datasets of 10^8 images and more are stored. Only
files are listed, never the images inside a container, so the driver's listing grows with the
number of files. `image_id` is stable across runs: the path relative to the dataset root (forward
slashes), or the URI exactly as a manifest writes it; an image inside a container is
`<container id>/<member>`. `--data` may be a brace or glob pattern
(`s3://bucket/laion/{00000..41407}.tar`, `/data/*.parquet`); ids are then relative to the
pattern's fixed leading folder.

A folder is walked one directory at a time in `image_id` order (`walk`), so `stream_images` can
hand its refs on without holding the tree (`spill.plan_streamed` plans shards as they come).
Loose images are sorted by `image_id` and cut into consecutive shards of `shard_size`; each
container is one shard. A shard's key hashes its ids, file sizes and stamps (modification time or
ETag, as the listing reports them), so a resumed run reuses a partial only for the same files.
"""

from __future__ import annotations

import dataclasses
import itertools
import posixpath
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pyarrow.parquet as pq

from pipeline.dataset.refs import ImageRef, kind_of
from pipeline.dataset.walk import check_utf8, stamp, uri_of, walk_folder, without_sidecars
from pipeline.errors import DataError, InputNotFoundError

MANIFEST_SUFFIXES = (".txt", ".parquet")
PATTERN = re.compile(r"\{[^{}]*\}|[*?\[]")  # brace ranges/alternatives and glob characters


def list_images(data: str, storage_options: dict | None = None) -> list[ImageRef]:
    """Every image and container under `data` (folder, URL, pattern or manifest), sorted by id."""
    options = storage_options or {}
    fs, path = fsspec.core.url_to_fs(data, **options)
    if not fs.exists(path) and PATTERN.search(path):
        refs = without_sidecars(_list_pattern(fs, path, options))
        if not refs:
            raise InputNotFoundError(f"--data pattern {data!r} matches no images or containers")
    elif not fs.exists(path):
        raise InputNotFoundError(f"--data {data!r} does not exist; pass a folder, URL or manifest")
    elif fs.isdir(path):
        return list(walk_folder(fs, path))  # sorted, sidecars dropped, ids checked
    elif path.endswith(".parquet") and not _is_manifest(fs, path, data):
        refs = [_entry(fs, path, posixpath.basename(path), fs.info(path))]
    elif path.endswith(MANIFEST_SUFFIXES):
        refs = _stat(_read_manifest(fs, path, data), options)
    elif kind_of(path) == "tar":
        refs = [_entry(fs, path, posixpath.basename(path), fs.info(path))]
    else:
        raise DataError(
            f"--data {data!r} is a file but not a manifest or a container; pass a folder, a "
            f"{' or '.join(MANIFEST_SUFFIXES)} file listing image URIs, a .tar of images or a "
            ".parquet of image bytes"
        )
    for ref in refs:
        check_utf8(ref.image_id)
    return sorted(refs, key=lambda r: r.image_id)


def stream_images(data: str, storage_options: dict | None = None) -> Iterator[ImageRef]:
    """`list_images(data)` one ref at a time, in the same order: a folder is walked directory
    by directory and never held (`walk.walk_folder`); manifests, patterns and single files are
    listed in memory as `list_images` lists them (containers are one entry per file)."""
    fs, path = fsspec.core.url_to_fs(data, **(storage_options or {}))
    if fs.exists(path) and fs.isdir(path):
        yield from walk_folder(fs, path)
    else:
        yield from list_images(data, storage_options)


def _entry(fs: fsspec.AbstractFileSystem, path: str, image_id: str, info: dict) -> ImageRef:
    kind = kind_of(path) or "image"
    return ImageRef(image_id, uri_of(fs, path), info.get("size"), stamp(info), kind)


def _list_pattern(fs: fsspec.AbstractFileSystem, pattern: str, options: dict) -> list[ImageRef]:
    """Files matching brace ranges/alternatives and globs; ids relative to the fixed folder.

    Names produced by braces alone are not listed (10^5 tar shards need no LIST request), only
    stat'ed like manifest entries; names with glob characters left are listed with `fs.glob`.
    """
    first = PATTERN.search(pattern)
    assert first is not None  # only called for paths that PATTERN matches
    fixed = pattern[: first.start()]
    base = fixed.rsplit("/", 1)[0] if "/" in fixed else "."
    refs: dict[str, ImageRef] = {}
    for name in expand_braces(pattern):
        if "*" in name or "?" in name or "[" in name:
            for path, info in fs.glob(name, detail=True).items():
                if info.get("type") == "file" and kind_of(path):
                    refs[path] = _entry(fs, path, posixpath.relpath(path, base), info)
        elif kind := kind_of(name):
            refs[name] = ImageRef(posixpath.relpath(name, base), uri_of(fs, name), kind=kind)
    listed = [ref for ref in refs.values() if ref.size is not None]
    return listed + _stat([ref for ref in refs.values() if ref.size is None], options)


MAX_EXPANSION = 10_000_000  # names one brace pattern may produce


def expand_braces(text: str) -> list[str]:
    """`{000..099}` (zero-padded to the first number's width) and `{a,b}` expanded, in order."""
    match = re.search(r"\{([^{}]*)\}", text)
    if match is None:
        return [text]
    body = match.group(1)
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        options = [str(i).zfill(len(first)) for i in range(int(first), int(last) + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise DataError(
            f"cannot expand {{{body}}} in --data {text!r}; write a range such as {{00000..00999}} "
            "or alternatives such as {train,val}"
        )
    rest = expand_braces(text[match.end() :])
    if len(options) * len(rest) > MAX_EXPANSION:
        raise DataError(f"--data {text!r} expands to more than {MAX_EXPANSION:,} names")
    head = text[: match.start()]
    return [head + option + tail for option, tail in itertools.product(options, rest)]


def _is_manifest(fs: fsspec.AbstractFileSystem, path: str, data: str) -> bool:
    """A .parquet with a 'uri' column lists images; one with a column of image bytes holds them."""
    from pipeline.dataset.containers import image_column  # sources reads what this module lists

    with fs.open(path, "rb") as f:
        schema = pq.read_schema(f)
    if "uri" in schema.names:
        return True
    try:
        image_column(schema, data)
    except DataError:
        raise DataError(
            f"manifest {data!r} has columns {schema.names}; it needs a 'uri' column (a list of "
            "images) or one column of image bytes (a dataset file)"
        ) from None
    return False


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
    twice: list[str] = []  # each repeat, in manifest order
    for u in uris:
        if u in seen:
            twice.append(u)
        seen.add(u)
    if twice:
        raise DataError(
            f"manifest {data!r} lists {len(twice)} URIs more than once (e.g. {twice[0]!r}); "
            "each image must appear once or it would be counted twice"
        )
    base = posixpath.dirname(path)
    return [ImageRef(u, _resolve(fs, base, u), kind=kind_of(u) or "image") for u in uris]


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
        return dataclasses.replace(ref, size=info.get("size"), stamp=stamp(info))

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(stat, refs))


def _resolve(fs: fsspec.AbstractFileSystem, base: str, uri: str) -> str:
    """Manifest entries may be absolute, URLs, or relative to the manifest's folder."""
    if "://" in uri or uri.startswith("/"):
        return uri
    return uri_of(fs, posixpath.join(base, uri))
