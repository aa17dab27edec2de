"""The streamed folder walk lists exactly what a whole-tree `fs.find` listing sorted by id did."""

from __future__ import annotations

import os
import posixpath
import tempfile
import uuid
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.dataset.listing import list_images, stream_images
from pipeline.dataset.refs import ImageRef, kind_of
from pipeline.dataset.walk import stamp, walk_folder
from pipeline.errors import DataError
from s3server import MotoS3, ProxyTrap, offline_aws_env

# names that order differently as path components than as plain strings ('-' < '.' < '/' < '0'),
# upper and lower case, and non-ASCII (code points above any ASCII, and beyond the BMP)
NAMES = ["a", "a.b", "a-", "a0", "a_", "A", "b", "é", "日本", "x\U0001f600", "a b"]
SUFFIXES = ["", ".jpg", ".PNG", ".tar", ".parquet", ".txt", ".b"]


def listed_before(data: str, options: dict | None = None) -> list[ImageRef]:
    """Oracle: `list_images` of a folder before the walk (commit d5b108a): one `fs.find` of the
    whole tree, img2dataset sidecars dropped, sorted by image_id."""
    fs, path = fsspec.core.url_to_fs(data, **(options or {}))
    root = path.rstrip("/")
    local = isinstance(fs, LocalFileSystem)
    refs = [
        ImageRef(
            posixpath.relpath(p, root), p if local else fs.unstrip_protocol(p), info.get("size"),
            stamp(info), kind_of(p) or "image",
        )
        for p, info in fs.find(root, detail=True).items()
        if info.get("type") == "file" and kind_of(p)
    ]  # fmt: skip
    tars = {ref.uri.removesuffix(".tar") for ref in refs if ref.kind == "tar"}
    refs = [r for r in refs if not (r.kind == "parquet" and r.uri[: -len(".parquet")] in tars)]
    return sorted(refs, key=lambda r: r.image_id)


@st.composite
def trees(draw) -> dict[str, bytes]:
    """Relative file paths (1-4 components) and their bytes; no path is also a folder."""
    files: dict[str, bytes] = {}
    for _ in range(draw(st.integers(1, 25))):
        depth = draw(st.integers(1, 4))
        parts = [draw(st.sampled_from(NAMES)) for _ in range(depth)]
        parts[-1] += draw(st.sampled_from(SUFFIXES))
        rel = "/".join(parts)
        prefixes = {"/".join(parts[:i]) for i in range(1, depth)}
        if rel in files or prefixes & set(files) or any(f.startswith(rel + "/") for f in files):
            continue
        files[rel] = b"x" * draw(st.integers(0, 3))
    return files


@given(trees())
@settings(max_examples=150, deadline=None)
def test_walk_order_and_entries_equal_the_sorted_find_listing_in_memory(files):
    fs = fsspec.filesystem("memory")
    root = f"/walk-{uuid.uuid4().hex}"
    fs.pipe({f"{root}/{rel}": data for rel, data in files.items()})
    try:
        walked = list(walk_folder(fs, root))
        assert walked == listed_before(f"memory://{root}")
        assert [r.image_id for r in walked] == sorted(r.image_id for r in walked)
    finally:
        fs.rm(root, recursive=True)


@given(trees())
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_walk_equals_the_sorted_find_listing_on_a_local_folder(files):
    with tempfile.TemporaryDirectory() as tmp:
        for rel, data in files.items():
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / rel).write_bytes(data)
        walked = list(walk_folder(LocalFileSystem(), tmp))
        assert walked == listed_before(tmp)  # ids, URIs, sizes, mtimes, kinds
        assert list(stream_images(tmp)) == list_images(tmp) == walked


def test_a_sidecar_parquet_is_dropped_only_beside_its_tar(tmp_path):
    for name in ["s/x.tar", "s/x.parquet", "s/y.parquet", "t/x.parquet"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    ids = [r.image_id for r in walk_folder(LocalFileSystem(), str(tmp_path))]
    assert ids == ["s/x.tar", "s/y.parquet", "t/x.parquet"]


def test_each_directory_is_listed_once(tmp_path):
    for name in ["a/1.jpg", "a/b/2.jpg", "a/b/c/3.jpg", "d/4.jpg", "5.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    fs = LocalFileSystem()
    listed: list[str] = []
    ls = fs.ls
    fs.ls = lambda path, detail=True, **kw: listed.append(path) or ls(path, detail=detail, **kw)
    assert len(list(walk_folder(fs, str(tmp_path)))) == 5
    rel = sorted(posixpath.relpath(p, str(tmp_path)) for p in listed)
    assert rel == [".", "a", "a/b", "a/b/c", "d"]


class CachingFileSystem(MemoryFileSystem):
    """Keeps every listing in `dircache`, as object-store filesystems (s3fs, gcsfs) do."""

    protocol = "caching-memory"

    def ls(self, path, detail=True, **kwargs):
        self.dircache[path] = listing = super().ls(path, detail=True, **kwargs)
        return listing if detail else [info["name"] for info in listing]

    def invalidate_cache(self, path=None):
        if path is None:
            self.dircache.clear()
        else:
            self.dircache.pop(path, None)


def test_walk_equals_the_sorted_find_listing_on_s3(monkeypatch):
    trap = ProxyTrap()
    for name, value in offline_aws_env(trap.port, "walk-key", "walk-secret").items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    server = MotoS3()
    try:
        server.client("walk-key", "walk-secret").create_bucket(Bucket="walk")
        options = server.storage_options("walk-key", "walk-secret")
        fs = fsspec.filesystem("s3", **options)
        names = ["a.b/1.jpg", "a/2.jpg", "a-/3.png", "a/b/4.jpg", "日本/5.jpg", "a.jpg", "s/x.tar",
                 "s/x.parquet", "s/y.parquet", "notes.txt"]  # fmt: skip
        fs.pipe({f"walk/data/{name}": b"xy" for name in names})
        walked = list(stream_images("s3://walk/data", options))
        assert walked == listed_before("s3://walk/data", options)
        assert [r.image_id for r in walked][:3] == ["a-/3.png", "a.b/1.jpg", "a.jpg"]
        assert all(r.stamp and r.size == 2 and r.uri.startswith("s3://walk/data/") for r in walked)
    finally:
        server.stop()
        trap.close()
    assert not trap.strays()


def test_the_walk_keeps_no_listing_cached():
    fs = CachingFileSystem()
    fs.pipe({f"/cached/{d}/{i}.jpg": b"x" for d in "abc" for i in range(3)})
    try:
        assert len(list(walk_folder(fs, "/cached"))) == 9
        assert not fs.dircache
    finally:
        fs.rm("/cached", recursive=True)


@pytest.mark.skipif(os.uname().sysname == "Darwin", reason="macOS refuses non-UTF-8 file names")
def test_a_name_that_is_not_utf8_is_refused(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(b"x")
    with open(os.path.join(os.fsencode(tmp_path), b"bad\xff.jpg"), "wb") as f:
        f.write(b"x")
    with pytest.raises(DataError, match="not valid UTF-8"):
        list(stream_images(str(tmp_path)))
