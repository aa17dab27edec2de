"""store.layout: every path under OUT, spelled by hand; safe_name, image_key, checked as guards."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.store.layout import (
    SAFE_NAME,
    SAFE_PATH,
    atlas_page,
    checked,
    grid_path,
    image_key,
    index_file,
    output_paths,
    partial_commit,
    partial_folder,
    partial_table,
    row_files,
    safe_name,
    unit_page,
    version_folder,
)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_paths_under_out():
    assert index_file("features.10") == "index/features.10.parquet"
    assert index_file("layer4.1.conv2") == "index/layer4.1.conv2.parquet"
    assert partial_commit("000001-00fc") == "partials/000001-00fc/_COMMIT.json"
    assert partial_folder("000001-ab", "0bb70d302fca") == "partials/000001-ab/0bb70d302fca"
    assert partial_table("s1", "0bb70d302fca", "topk") == "partials/s1/0bb70d302fca/topk.parquet"
    assert partial_table("s1", "0bb70d", "images") == "partials/s1/0bb70d/images.parquet"
    assert version_folder("20261201T223414Z-8a47bb") == "versions/20261201T223414Z-8a47bb"
    assert atlas_page("fc") == "atlas/layer-fc.html"


def test_safe_names_are_kept_and_others_hashed():
    for name in ("fc", "features.10", "layer4.1.conv2", "_private", "a-b", "x" * 64):
        assert safe_name(name) == name
    assert safe_name("a/b") == f"a_b-{sha('a/b')[:12]}"
    assert safe_name("..") == f"x-{sha('..')[:12]}"  # nothing left after cleaning
    assert safe_name("") == f"x-{sha('')[:12]}"
    assert safe_name("a..b") == f"a_b-{sha('a..b')[:12]}"  # '..' inside a name is not kept
    assert safe_name(".hidden") == f"hidden-{sha('.hidden')[:12]}"
    assert safe_name("blocks[3]") == f"blocks_3-{sha('blocks[3]')[:12]}"
    long = "y" * 65  # one over SAFE_NAME's 64: cleaned to 40 characters plus the hash
    assert safe_name(long) == f"{'y' * 40}-{sha(long)[:12]}"


def test_image_key_is_16_hex_digits_of_the_ids_sha256():
    assert image_key("animals/cat_0.jpg") == sha("animals/cat_0.jpg")[:16]
    assert image_key("") == "e3b0c44298fc1c14"  # sha256 of nothing
    assert image_key("a") != image_key("b")
    assert image_key("\ud800") == hashlib.sha256(b"\xed\xa0\x80").hexdigest()[:16]  # surrogatepass


@pytest.mark.parametrize(
    "rel", ["a", "patches/fc/0/1-0123456789abcdef.png", "grids/layer4.1/7.png", "_x/b..c"]
)
def test_checked_passes_safe_relative_paths(rel):
    assert checked(rel) == rel


@pytest.mark.parametrize(
    "rel",
    [
        "",
        "..",
        "../x",
        "a/../b",
        "a/..",
        "/etc/passwd",
        "a//b",
        "a/",
        "./a",
        ".hidden",
        "a b",
        "a\\b",
        "a/<script>",
        "é",
        "a\nb",
    ],
)
def test_checked_refuses_unsafe_paths(rel):
    with pytest.raises(AssertionError, match="unsafe export path"):
        checked(rel)


def test_output_and_grid_paths():
    key = sha("animals/cat_0.jpg")[:16]
    assert output_paths("layer4.1", 7, 3, "animals/cat_0.jpg") == (
        f"patches/layer4.1/7/3-{key}.png",
        f"projections/layer4.1/7/3-{key}.png",
    )
    hostile = "../../etc/passwd"
    patch, projection = output_paths("../up", 0, 1, hostile)
    assert patch == f"patches/up-{sha('../up')[:12]}/0/1-{sha(hostile)[:16]}.png"
    assert projection == patch.replace("patches/", "projections/", 1)
    assert grid_path("fc", 2) == "grids/fc/2.png"
    assert grid_path("a/b", 0) == f"grids/a_b-{sha('a/b')[:12]}/0.png"


@given(st.text(max_size=80))
def test_safe_name_is_one_safe_component(name):
    result = safe_name(name)
    assert SAFE_NAME.fullmatch(result) and "/" not in result and ".." not in result
    assert safe_name(result) == result  # already safe: kept as it is


ALPHABET = st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Zs"])


@given(st.lists(st.text(ALPHABET, max_size=30), min_size=2, max_size=6, unique=True))
def test_safe_name_keeps_distinct_names_distinct(names):
    assert len({safe_name(n) for n in names}) == len(names)


@given(
    st.text(max_size=40),
    st.integers(min_value=0, max_value=10**6),
    st.integers(min_value=1, max_value=100),
    st.text(max_size=40),
)
def test_output_paths_are_always_safe(layer, unit, rank, image_id):
    patch, projection = output_paths(layer, unit, rank, image_id)
    for rel, top in ((patch, "patches"), (projection, "projections")):
        assert SAFE_PATH.fullmatch(rel)
        file = f"{rank}-{image_key(image_id)}.png"
        assert rel.split("/") == [top, safe_name(layer), str(unit), file]
    assert SAFE_PATH.fullmatch(grid_path(layer, unit))


def test_row_files_by_kind():
    key = sha("a.jpg")[:16]
    top = row_files("conv1", 3, 2, "a.jpg")
    assert top == (
        f"patches/conv1/3/2-{key}.png", f"projections/conv1/3/2-{key}.png",
        f"overlays/conv1/3/2-{key}.png", f"masks/conv1/3/2-{key}.png",
    )  # fmt: skip
    assert (top.patch, top.projection) == output_paths("conv1", 3, 2, "a.jpg")
    sample = row_files("conv1", 3, 2, "a.jpg", "sample", "p99.9")
    assert sample.overlay == f"overlays/conv1/3/sample-p99.9-2-{key}.png"
    hostile = row_files("conv1", 3, 2, "a.jpg", "sample", "../<b>")
    assert hostile.mask == f"masks/conv1/3/sample-b-{sha('../<b>')[:12]}-2-{key}.png"
    assert (
        row_files("conv1", 3, 1, "a.jpg", "bottom").patch == f"patches/conv1/3/bottom-1-{key}.png"
    )
    with pytest.raises(ValueError, match=r"unknown export row kind 'middle'; known: top, sample"):
        row_files("conv1", 3, 1, "a.jpg", "middle")
    assert unit_page("layer4.1", 7) == "atlas/unit-layer4.1-7.html"


@given(st.text(max_size=30), st.integers(0, 10**6), st.integers(1, 99), st.text(max_size=30),
       st.sampled_from(["top", "sample", "bottom"]), st.text(max_size=20))  # fmt: skip
def test_row_files_are_always_safe_and_distinct_by_kind(layer, unit, rank, image_id, kind, band):
    files = row_files(layer, unit, rank, image_id, kind, band)
    assert all(SAFE_PATH.fullmatch(path) for path in files)
    others = {
        k: row_files(layer, unit, rank, image_id, k, band) for k in ("top", "sample", "bottom")
    }
    assert len({f.patch for f in others.values()}) == 3
