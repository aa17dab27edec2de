"""Container sources: tar shards and Parquet files of image bytes, read member by member."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import IndexConfig
from pipeline.dataset.containers import (
    READ_FAILED,
    Unsorted,
    image_column,
    members,
    read_bytes,
    tar_order,
)
from pipeline.dataset.listing import expand_braces, list_images
from pipeline.dataset.refs import ImageRef, plan_shards
from pipeline.errors import DataError, InputNotFoundError
from pipeline.export.run import export
from pipeline.index.reindex import reindex
from pipeline.index.run import index
from pipeline.progress import Progress
from pipeline.store.storage import Store
from pipeline.store.versions import latest

NO_OPTIONS: dict = {}
QUIET = Progress(quiet=True)


def write_tar(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    """A tar holding `entries` in the order given (name, bytes)."""
    with tarfile.open(path, "w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_parquet(path: Path, images: list[bytes | None], keys=None, struct=False) -> Path:
    column = pa.array(images, pa.binary())
    if struct:  # as Hugging Face datasets store an Image feature
        paths = pa.array([f"p{i}.jpg" for i in range(len(images))])
        column = pa.StructArray.from_arrays([column, paths], names=["bytes", "path"])
    table = {"image": column, "caption": [f"c{i}" for i in range(len(images))]}
    if keys is not None:
        table["key"] = keys
    pq.write_table(pa.table(table), path, row_group_size=3)
    return path


def container(path: Path, kind: str) -> ImageRef:
    return ImageRef(path.name, str(path), path.stat().st_size, "1", kind)


def test_tar_members_stream_in_order_with_openable_uris(tmp_path):
    entries = [("./a.jpg", b"A"), ("a.json", b"{}"), ("b.png", b"BB"), ("sub/c.jpg", b"CCC")]
    ref = container(write_tar(tmp_path / "s.tar", entries), "tar")
    got = list(members(ref, NO_OPTIONS))
    assert [m.ref.image_id for m in got] == ["s.tar/a.jpg", "s.tar/b.png", "s.tar/sub/c.jpg"]
    assert [m.position for m in got] == [0, 1, 2]
    assert [m.data for m in got] == [b"A", b"BB", b"CCC"]
    assert {m.ref.stamp for m in got} == {"1"}
    for m in got:  # the URI users get in images.parquet opens with plain fsspec
        with fsspec.open(m.ref.uri, "rb") as f:
            assert f.read() == m.data
        assert read_bytes(m.ref.uri, NO_OPTIONS) == m.data
        ranged = read_bytes(m.ref.uri, NO_OPTIONS, m.ref.offset, m.ref.size)  # one ranged read
        assert ranged == m.data and m.ref.offset % 512 == 0


def test_unsorted_tar_is_detected_and_ranked_by_name(tmp_path):
    entries = [("b.jpg", b"B"), ("a.jpg", b"A"), ("c.jpg", b"C"), ("a.jpg", b"again")]
    ref = container(write_tar(tmp_path / "u.tar", entries), "tar")
    with pytest.raises(Unsorted, match="'a.jpg' is stored after 'b.jpg'"):
        list(members(ref, NO_OPTIONS))
    order = tar_order(ref, NO_OPTIONS)
    assert order == {"a.jpg": 0, "b.jpg": 1, "c.jpg": 2}
    got = [(m.ref.image_id, m.position, m.data) for m in members(ref, NO_OPTIONS, order)]
    assert got == [("u.tar/b.jpg", 1, b"B"), ("u.tar/a.jpg", 0, b"A"), ("u.tar/c.jpg", 2, b"C")]


def test_truncated_tar_keeps_what_was_read_and_records_why(tmp_path):
    path = write_tar(tmp_path / "t.tar", [(f"{i}.jpg", bytes(1000)) for i in range(4)])
    data = path.read_bytes()
    path.write_bytes(data[: 512 + 1000 + 512 + 300])  # two headers, one and a bit members
    got = list(members(container(path, "tar"), NO_OPTIONS))
    assert [m.ref.image_id for m in got[:-1]] == ["t.tar/0.jpg"]
    assert got[-1].position == -1 and got[-1].ref.image_id == "t.tar"
    assert got[-1].error.startswith("unreadable tar after 1 images")


@pytest.mark.parametrize(
    "damage",
    ["cut at a member boundary", "cut inside a header", "garbage header"],
)
def test_a_tar_damaged_between_members_is_recorded_not_taken_as_complete(tmp_path, damage):
    path = write_tar(tmp_path / "d.tar", [(f"{i}.jpg", bytes(1000)) for i in range(4)])
    data = bytearray(path.read_bytes())
    member = 512 + 1024  # a header and 1000 bytes padded to whole blocks
    if damage == "cut at a member boundary":
        data = data[: 2 * member]
    elif damage == "cut inside a header":
        data = data[: 2 * member + 100]
    else:
        data[2 * member : 2 * member + 512] = b"\x07" * 512
    path.write_bytes(bytes(data))
    got = list(members(container(path, "tar"), NO_OPTIONS))
    assert [m.ref.image_id for m in got[:-1]] == ["d.tar/0.jpg", "d.tar/1.jpg"]
    assert got[-1].error.startswith("unreadable tar after 2 images")
    assert tar_order(container(path, "tar"), NO_OPTIONS) == {"0.jpg": 0, "1.jpg": 1}


def test_a_member_name_that_is_not_utf8_is_recorded_under_an_escaped_id(tmp_path):
    path = tmp_path / "n.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for name in ("a.jpg", "caf\xe9.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    got = list(members(container(path, "tar"), NO_OPTIONS))
    assert [m.ref.image_id for m in got] == ["n.tar/a.jpg", "n.tar/caf\\xe9.jpg"]
    assert got[1].error == "member name is not valid UTF-8; rename it in the tar"
    assert got[1].ref.image_id.encode("utf-8") and got[1].position == -1


def test_a_damaged_parquet_page_is_recorded_to_be_read_again(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", [b"r0", b"r1", b"r2", b"r3"])
    data = bytearray(path.read_bytes())
    data[4:44] = bytes(40)  # the first page header, right after the magic bytes
    path.write_bytes(bytes(data))
    got = list(members(container(path, "parquet"), NO_OPTIONS))
    assert got[-1].position == -1 and got[-1].error.startswith(READ_FAILED + "unreadable parquet")


def test_not_a_tar_and_missing_container_are_recorded(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"this is no tar archive at all" * 40)
    [bad] = members(container(tmp_path / "x.tar", "tar"), NO_OPTIONS)
    assert bad.error.startswith("unreadable tar after 0 images")
    gone = ImageRef("gone.tar", str(tmp_path / "gone.tar"), 10, "1", "tar")
    [missing] = members(gone, NO_OPTIONS)
    assert missing.error.startswith(READ_FAILED) and missing.position == -1


@pytest.mark.parametrize("struct", [False, True])
def test_parquet_members_rank_by_key_and_rows_read_back(tmp_path, struct):
    images = [b"r0", b"r1", None, b"r3", b"r4"]
    keys = ["k3", "k1", "k2", "k0", "k1"]  # k1 twice: the first row wins
    path = write_parquet(tmp_path / "p.parquet", images, keys, struct)
    got = list(members(container(path, "parquet"), NO_OPTIONS))
    assert [m.ref.image_id for m in got] == ["p.parquet/k3", "p.parquet/k1", "p.parquet/k2",
                                            "p.parquet/k0"]  # fmt: skip
    assert [m.position for m in got] == [3, 1, 2, 0]
    assert [m.data for m in got] == [b"r0", b"r1", None, b"r3"]
    assert got[2].error == "no image bytes in this row"
    assert read_bytes(got[3].ref.uri, NO_OPTIONS) == b"r3"  # row 3, in the second row group
    with pytest.raises(FileNotFoundError, match="no image bytes"):
        read_bytes(got[2].ref.uri, NO_OPTIONS)


def test_parquet_without_key_uses_row_numbers(tmp_path):
    path = write_parquet(tmp_path / "n.parquet", [b"a", b"b"])
    got = list(members(container(path, "parquet"), NO_OPTIONS))
    assert [m.ref.image_id for m in got] == ["n.parquet/000000000", "n.parquet/000000001"]
    assert [m.ref.uri for m in got] == [f"parquet://{i}::{path}" for i in (0, 1)]


def test_parquet_without_image_column_names_the_columns(tmp_path):
    pq.write_table(pa.table({"a": [1], "b": ["x"]}), tmp_path / "meta.parquet")
    with pytest.raises(DataError, match=r"columns: a, b\); name it one of jpg"):
        image_column(pq.read_schema(tmp_path / "meta.parquet"), "meta.parquet")
    [bad] = members(container(tmp_path / "meta.parquet", "parquet"), NO_OPTIONS)
    assert bad.error.startswith("unreadable parquet after 0 images")


def test_folder_lists_containers_beside_loose_images(tmp_path):
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "x.jpg").write_bytes(b"x")
    write_tar(tmp_path / "s-0.tar", [("a.jpg", b"A")])
    write_parquet(tmp_path / "p.parquet", [b"a"])
    (tmp_path / "notes.txt").write_text("not data")
    pq.write_table(pa.table({"key": ["a"]}), tmp_path / "s-0.parquet")  # img2dataset metadata
    refs = list_images(str(tmp_path))
    assert [(r.image_id, r.kind) for r in refs] == [
        ("loose/x.jpg", "image"), ("p.parquet", "parquet"), ("s-0.tar", "tar"),
    ]  # fmt: skip
    shards = plan_shards(refs, shard_size=10)
    assert [len(s.refs) for s in shards] == [1, 1, 1]
    assert [s.container is not None for s in shards] == [False, True, True]
    assert shards[1].key.startswith("c-") and shards[2].key.startswith("c-")


def test_single_files_patterns_and_manifests(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"shard-{i:03d}.tar", [("a.jpg", b"A")])
    [one] = list_images(str(tmp_path / "shard-001.tar"))
    assert (one.image_id, one.kind, one.size) == ("shard-001.tar", "tar", 10240)
    braces = list_images(str(tmp_path / "shard-{000..001}.tar"))
    assert [r.image_id for r in braces] == ["shard-000.tar", "shard-001.tar"]
    assert all(r.size == 10240 and r.stamp for r in braces)  # stat'ed, not listed
    globbed = list_images(str(tmp_path / "shard-*.tar"))
    assert [r.image_id for r in globbed] == [f"shard-{i:03d}.tar" for i in range(3)]
    (tmp_path / "m.txt").write_text("shard-002.tar\n")
    [listed] = list_images(str(tmp_path / "m.txt"))
    assert listed.kind == "tar" and listed.size == 10240
    pq.write_table(pa.table({"uri": ["shard-000.tar"]}), tmp_path / "manifest.parquet")
    [from_manifest] = list_images(str(tmp_path / "manifest.parquet"))
    assert from_manifest.kind == "tar"
    with pytest.raises(InputNotFoundError, match="matches no images or containers"):
        list_images(str(tmp_path / "nothing-*.tar"))


def test_expand_braces():
    assert expand_braces("s-{08..11}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar", "s-11.tar"]
    assert expand_braces("{a,b}/{0..1}") == ["a/0", "a/1", "b/0", "b/1"]
    with pytest.raises(DataError, match="write a range such as"):
        expand_braces("s-{x}.tar")


# ------------------------------------------------------- end to end, on a loopback Ray instance


def config(data: Path, out: Path) -> IndexConfig:
    # batch size 1: every activation is bit-identical however images are grouped into shards;
    # --distinct id: the copies below must tie with their originals and be ordered by image_id
    return IndexConfig(
        model="tiny_models:tiny", layers=("conv2", "fc"), data=str(data), out=str(out), k=4,
        batch_size=1, shard_size=7, workers=2, max_bad_fraction=0.2, distinct="id",
    )  # fmt: skip


def pack(photos: Path, data: Path, mirror: Path) -> None:
    """The photographs as two tars, a Parquet file and loose files under `data`; `mirror` holds
    the same bytes as loose files at their image ids (`train-000.tar/people/astronaut_0.jpg`)."""
    files = {p.relative_to(photos).as_posix(): p.read_bytes() for p in photos.rglob("*.*")}

    def folder(*names: str) -> list[tuple[str, bytes]]:
        return sorted((k, v) for k, v in files.items() if k.split("/")[0] in names)

    sorted_tar = [*folder("people", "animals"), ("zz-corrupt.jpg", b"not a jpeg" * 50)]
    twins = [(f"copy/{name}", bytes_) for name, bytes_ in folder("objects")]  # exact ties
    unsorted_tar = [*reversed(folder("objects")), *twins]  # stored out of name order
    rows = list(reversed(folder("science")))  # rows out of key order: ranked by key
    data.mkdir()
    write_tar(data / "train-000.tar", sorted_tar)
    write_tar(data / "train-001.tar", unsorted_tar)
    write_parquet(data / "train-002.parquet", [v for _, v in rows], keys=[k for k, _ in rows])
    members = {"train-000.tar": sorted_tar, "train-001.tar": unsorted_tar,
               "train-002.parquet": rows}  # fmt: skip
    for name, bytes_ in folder("textures"):
        (data / "loose" / name).parent.mkdir(parents=True, exist_ok=True)
        (data / "loose" / name).write_bytes(bytes_)
        members.setdefault("loose", []).append((name, bytes_))
    for container_id, entries in members.items():
        for name, bytes_ in entries:
            (mirror / container_id / name).parent.mkdir(parents=True, exist_ok=True)
            (mirror / container_id / name).write_bytes(bytes_)


def frame(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "index").sort_values(["layer", "unit", "rank"], ignore_index=True)


@pytest.fixture(scope="module")
def packed(photos, tmp_path_factory, ray_local) -> tuple[Path, Path, Path, Path]:
    root = tmp_path_factory.mktemp("packed")
    pack(photos, root / "data", root / "mirror")
    index(config(root / "data", root / "out"), QUIET)
    index(config(root / "mirror", root / "mirror-out"), QUIET)
    return root / "data", root / "out", root / "mirror", root / "mirror-out"


def test_containers_index_exactly_like_the_same_images_as_files(packed):
    _, out, _, mirror_out = packed
    got, want = frame(out), frame(mirror_out)
    pd.testing.assert_frame_equal(got, want)
    twins = got[got.image_id.str.startswith("train-001.tar/copy/")]
    assert len(twins) > 0  # each copy ties with its original and, stored last, still wins
    for row in twins.itertuples():
        original = row.image_id.replace("/copy/", "/")
        unit = got[(got.layer == row.layer) & (got.unit == row.unit)]
        after = unit[unit["rank"] == row.rank + 1]  # none when the copy is the k-th
        assert list(after.image_id) in ([original], [])
        assert (after.activation == row.activation).all()
    images = pd.read_parquet(out / "images.parquet").set_index("image_id").sort_index()
    files = pd.read_parquet(mirror_out / "images.parquet").set_index("image_id").sort_index()
    assert list(images.index) == list(files.index)
    assert images.image_hash.equals(files.image_hash)
    assert images.loc["train-000.tar/zz-corrupt.jpg", "error"].startswith("not an image format")


def test_member_uris_read_back_the_indexed_bytes(packed):
    _, out, _, _ = packed
    images = pd.read_parquet(out / "images.parquet")
    good = images[images.error.isna()]
    kinds = good.uri.str.extract(r"^(tar|parquet)://")[0].fillna("file")
    assert set(kinds) == {"tar", "parquet", "file"}
    for row in good.itertuples():
        assert hashlib.sha256(read_bytes(row.uri, NO_OPTIONS)).hexdigest() == row.image_hash
        if row.uri.startswith("tar://"):  # offset and size: one ranged read of the tar
            data = read_bytes(row.uri, NO_OPTIONS, int(row.offset), int(row.bytes))
            assert hashlib.sha256(data).hexdigest() == row.image_hash
        else:
            assert pd.isna(row.offset)


def test_export_cuts_patches_from_container_members(packed):
    _, out, _, _ = packed
    summary = export(str(out), layers=("conv2",), units=(0, 1), progress=QUIET)
    assert summary["counts"]["errors"] == 0
    assert summary["counts"]["activation_mismatches"] == 0
    table = pd.read_parquet(out / "export" / "export.parquet")
    assert table.image_id.str.contains(r"\.(?:tar|parquet)/").any()
    assert table.patch_path.notna().all()


def test_reindex_reads_only_new_and_rewritten_containers(packed, tmp_path):
    data, _, _, _ = packed
    work = tmp_path / "data"
    shutil.copytree(data, work)
    out = tmp_path / "out"
    reindex(config(work, out), progress=QUIET)
    (work / "train-000.tar").unlink()
    with tarfile.open(work / "train-001.tar") as tar:
        kept = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()][3:]
    write_tar(work / "train-001.tar", kept)  # rewritten: three members fewer
    texture = next((data / "loose" / "textures").iterdir()).read_bytes()
    write_tar(work / "train-003.tar", [("new.png", texture)])
    report = reindex(config(work, out), progress=QUIET)
    counts = {k: report[f"containers_{k}"] for k in ("new", "changed", "removed", "unchanged")}
    assert counts == {"new": 1, "changed": 1, "removed": 1, "unchanged": 1}
    assert report["shards_computed"] == 2  # the rewritten tar and the new one
    scratch = tmp_path / "scratch"
    index(config(work, scratch), QUIET)
    latest_out = out / "versions" / latest(Store(str(out)))
    pd.testing.assert_frame_equal(frame(latest_out), frame(scratch))
