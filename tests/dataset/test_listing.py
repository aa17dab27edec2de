"""Listing folders, URLs and manifests; deterministic shards keyed by content."""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.dataset.listing import list_images
from pipeline.dataset.refs import ImageRef, plan_shards
from pipeline.errors import DataError, InputNotFoundError


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_folder_is_listed_recursively_sorted_with_relative_ids(tmp_path):
    for name in ["b/2.JPG", "a/1.png", "a/deep/3.webp", "notes.txt", "a/.hidden/4.jpg"]:
        touch(tmp_path / name)
    ids = [r.image_id for r in list_images(str(tmp_path))]
    assert ids == ["a/.hidden/4.jpg", "a/1.png", "a/deep/3.webp", "b/2.JPG"]
    assert list_images(str(tmp_path))[1].uri == str(tmp_path / "a" / "1.png")


def test_fsspec_url_listing():
    fs = fsspec.filesystem("memory")
    fs.pipe({"/ds/x/1.jpg": b"abc", "/ds/2.png": b"de", "/ds/readme.md": b"!"})
    refs = list_images("memory://ds")
    assert [(r.image_id, r.uri, r.size) for r in refs] == [
        ("2.png", "memory:///ds/2.png", 2),
        ("x/1.jpg", "memory:///ds/x/1.jpg", 3),
    ]


def test_text_manifest_keeps_uris_as_ids_and_resolves_relative_entries(tmp_path):
    touch(tmp_path / "imgs" / "a.jpg")
    (tmp_path / "list.txt").write_text(
        "# comment\nimgs/a.jpg\n\n/abs/b.jpg\nmemory://bucket/c.jpg\n"
    )
    refs = list_images(str(tmp_path / "list.txt"))
    assert [r.image_id for r in refs] == ["/abs/b.jpg", "imgs/a.jpg", "memory://bucket/c.jpg"]
    assert refs[1].uri == str(tmp_path / "imgs" / "a.jpg")
    assert refs[1].size == 1 and refs[1].stamp is not None  # stat'ed: rewrites are noticed


def test_parquet_manifest_and_its_errors(tmp_path):
    pq.write_table(pa.table({"uri": ["x.jpg", "y.jpg"]}), tmp_path / "m.parquet")
    assert [r.image_id for r in list_images(str(tmp_path / "m.parquet"))] == ["x.jpg", "y.jpg"]
    pq.write_table(pa.table({"path": ["x.jpg"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="needs a 'uri' column"):
        list_images(str(tmp_path / "bad.parquet"))


def test_duplicate_manifest_entries_are_refused(tmp_path):
    (tmp_path / "m.txt").write_text("a.jpg\nb.jpg\na.jpg\n")
    with pytest.raises(DataError, match="more than once.*'a.jpg'"):
        list_images(str(tmp_path / "m.txt"))


def test_file_names_that_are_not_utf8_are_refused(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(b"x")
    (tmp_path / b"caf\xe9.jpg".decode("utf-8", "surrogateescape")).write_bytes(b"x")
    with pytest.raises(DataError, match="not valid UTF-8; rename it"):
        list_images(str(tmp_path))


def test_missing_path_and_non_manifest_file(tmp_path):
    with pytest.raises(InputNotFoundError, match="does not exist"):
        list_images(str(tmp_path / "nope"))
    touch(tmp_path / "one.jpg")
    with pytest.raises(DataError, match="not a manifest"):
        list_images(str(tmp_path / "one.jpg"))


def test_shards_are_consecutive_and_keyed_by_content():
    refs = [ImageRef(f"{i:03d}.jpg", f"/d/{i:03d}.jpg", 100) for i in range(10)]
    shards = plan_shards(refs, 4)
    assert [len(s.refs) for s in shards] == [4, 4, 2]
    assert [r for s in shards for r in s.refs] == refs
    assert [s.key for s in plan_shards(refs, 4)] == [s.key for s in shards]
    changed = refs[:5] + [ImageRef("005.jpg", "/d/005.jpg", 101)] + refs[6:]
    keys = [s.key for s in plan_shards(changed, 4)]
    assert keys[0] == shards[0].key and keys[1] != shards[1].key and keys[2] == shards[2].key
