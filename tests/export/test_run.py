"""`export` end to end on a loopback Ray instance: exact patches, projections, safe paths, checks.

Each fixture indexes originals of many sizes, aspect ratios and hostile names (tests/originals.py)
with the real pipeline, then exports. Oracles are independent of the export code: PIL with EXIF
transpose for the originals, a hand-written resize/crop geometry and receptive-field formulas for
the boxes, torchvision transforms for the model input.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import oracle
import tiny_models
from originals import ONERROR_ID, SCRIPT_ID, make_originals, oriented
from pipeline.config import IndexConfig
from pipeline.errors import ConfigError, DataError
from pipeline.export.deconv import project
from pipeline.export.run import export
from pipeline.index.run import index
from pipeline.progress import Progress
from pipeline.store.layout import checked, safe_name
from pipeline.store.schemas import schema

pytestmark = pytest.mark.usefixtures("ray_local")

TINY_LAYERS = ("conv1", "conv2", "fc")
STD = np.array([0.229, 0.224, 0.225])
NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
STEM = rf"(\d+|sample-{NAME}-\d+|bottom-\d+)-[0-9a-f]{{16}}"
ROW_FILE = re.compile(rf"(patches|projections|overlays|masks)/{NAME}/\d+/{STEM}\.png")
PATHS = ("patch_path", "projection_path", "overlay_path", "mask_path")
BOTTOM = 3


def run_index(data: Path, out: Path, model: str, layers, weights=None, **kw) -> None:
    cfg = IndexConfig(
        model=model, weights=weights, data=str(data), layers=layers, out=str(out),
        workers=2, batch_size=4, shard_size=5, **kw,
    )  # fmt: skip
    index(cfg, Progress(quiet=True))


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Path:
    return make_originals(tmp_path_factory.mktemp("originals"))


@pytest.fixture(scope="module")
def tiny(originals, tmp_path_factory):
    """The tiny model indexed (with statistics, samples and the bottom) and exported in full:
    every layer, every unit."""
    out = tmp_path_factory.mktemp("tiny") / "out"
    run_index(originals, out, "tiny_models:tiny", TINY_LAYERS, bottom=BOTTOM)
    before = files_under(out)
    summary = export(str(out), progress=Progress(quiet=True))
    return out, summary, before, pd.read_parquet(out / "export" / "export.parquet")


def uris(out: Path) -> dict[str, Path]:
    images = pd.read_parquet(out / "images.parquet")
    return dict(zip(images["image_id"], map(Path, images["uri"]), strict=True))


def expected_box(layer: str, y: int, x: int, height: int, width: int) -> tuple[int, ...]:
    """Oracle: the tiny model's receptive field, then resize 256 / centre crop 224 undone."""
    size, stride, pad = {"conv1": (3, 2, 1), "conv2": (7, 4, 3), "fc": (224, 224, 0)}[layer]
    t, le = max(y * stride - pad, 0), max(x * stride - pad, 0)
    b, r = min(y * stride - pad + size, 224), min(x * stride - pad + size, 224)
    short = min(height, width)
    rh, rw = (
        (256, int(256 * width / short)) if height <= width else (int(256 * height / short), 256)
    )
    dy, dx = round((rh - 224) / 2), round((rw - 224) / 2)
    sy, sx = height / rh, width / rw
    return (
        max(math.floor((t + dy) * sy), 0),
        max(math.floor((le + dx) * sx), 0),
        min(math.ceil((b + dy) * sy), height),
        min(math.ceil((r + dx) * sx), width),
    )


def test_patches_are_exact_crops_of_the_oriented_originals(tiny):
    out, _, _, rows = tiny
    files = uris(out)
    assert rows["patch_path"].notna().all() and (rows["kind"] == "top").sum() == (4 + 6 + 5) * 9
    assert set(rows["kind"]) == {"top", "sample", "bottom"}  # every kind is cut the same way
    sizes = set()
    for row in rows.itertuples():
        image = oriented(files[row.image_id])  # (H, W, 3)
        height, width = image.shape[:2]
        sizes.add((height, width))
        box = expected_box(row.layer, row.y, row.x, height, width)
        assert (row.top, row.left, row.bottom, row.right) == box
        patch = np.asarray(Image.open(out / "export" / row.patch_path))
        np.testing.assert_array_equal(patch, image[row.top : row.bottom, row.left : row.right])
    # tall, wide, small (upscaled), small tall, square, EXIF-rotated and larger originals
    assert {(520, 190), (200, 600), (100, 150), (150, 100), (512, 512), (451, 300)} <= sizes


def test_exif_rotated_original_is_cut_as_shown(tiny, originals):
    out, _, _, rows = tiny
    rotated = rows[rows["image_id"] == "files/rotated.jpg"]
    assert len(rotated) > 0
    images = pd.read_parquet(out / "images.parquet").set_index("image_id")
    assert tuple(images.loc["files/rotated.jpg", ["height", "width"]]) == (451, 300)
    with Image.open(originals.parent / "files" / "rotated.jpg") as raw:
        assert raw.size == (451, 300)  # stored landscape (width, height); shown portrait
    shown = oriented(originals.parent / "files" / "rotated.jpg")  # (451, 300, 3)
    for row in rotated.itertuples():
        patch = np.asarray(Image.open(out / "export" / row.patch_path))
        np.testing.assert_array_equal(patch, shown[row.top : row.bottom, row.left : row.right])
    fc = rotated[rotated["layer"] == "fc"]
    for box in fc[["top", "left", "bottom", "right"]].itertuples(index=False):
        assert tuple(box) == (
            93,
            18,
            358,
            282,
        )  # the crop of a portrait image (unrotated: transposed)


def test_recomputed_activations_match_the_index(tiny):
    out, summary, _, rows = tiny
    assert rows["activation_ok"].all() and rows["error"].isna().all()
    np.testing.assert_allclose(rows["recomputed_activation"], rows["activation"], rtol=1e-3)
    assert summary["counts"]["activation_mismatches"] == 0
    index = pd.read_parquet(out / "index").sort_values(["layer", "unit", "rank"])
    mine = rows[rows["kind"] == "top"].sort_values(["layer", "unit", "rank"])
    for column in ("image_id", "y", "x", "activation"):
        assert list(mine[column]) == list(index[column])


def test_projections_are_the_deconvnet_in_the_box_scaled_about_grey(tiny):
    out, _, _, rows = tiny
    files = uris(out)
    torch.manual_seed(0)  # pipeline.net.models.INIT_SEED: the indexed model
    model = tiny_models.tiny().eval()
    for layer in TINY_LAYERS:
        row = rows[(rows["layer"] == layer) & (rows["rank"] == 1)].iloc[0]
        x = oracle.load(files[row.image_id])[None]  # (1, 3, 224, 224)
        proj = project(model, layer, x, *(torch.tensor([int(row[k])]) for k in ("unit", "y", "x")))
        box = proj[0, :, row.input_top : row.input_bottom, row.input_left : row.input_right]
        signal = box.permute(1, 2, 0).double().numpy() * STD  # (h, w, 3) in [0, 1]-pixel units
        expected = np.rint(255 * (0.5 + 0.5 * signal / np.abs(signal).max()))
        png = np.asarray(Image.open(out / "export" / row.projection_path)).astype(float)
        assert png.shape == expected.shape
        assert np.abs(png - expected).max() <= 1  # rounding of float32 vs float64
        assert np.all(png[np.abs(signal).max(axis=2) == 0] == 128)  # 0 is mid-grey


def test_every_write_stays_in_export_with_safe_names(tiny):
    out, _, before, rows = tiny
    after = files_under(out)
    assert {p for p in after if not p.startswith("export/")} == before
    exported = {p.removeprefix("export/") for p in after if p.startswith("export/")}
    for path in exported:
        assert re.fullmatch(rf"({NAME}/)*{NAME}", path) and ".." not in path.split("/"), path
        assert not re.search(r"script|pwned|img|slash|名前|files", path), path
    row_files = {p for column in PATHS for p in rows[column].dropna()}
    assert all(ROW_FILE.fullmatch(p) for p in row_files) and row_files <= exported
    assert len(row_files) == sum(rows[column].notna().sum() for column in PATHS)  # none shared
    ids = set(rows["image_id"])
    hostile = {SCRIPT_ID, ONERROR_ID, "files/../files/wide.jpg", "files/..dots..png"}
    assert hostile <= ids
    assert any(i.startswith("/") for i in ids) and any("\\" in i for i in ids)
    assert any("名前" in i for i in ids)


@given(st.text(max_size=80))
def test_safe_name_is_one_safe_component(name):
    safe = safe_name(name)
    assert re.fullmatch(NAME, safe) and safe not in (".", "..") and ".." not in safe
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
    assert safe == name or safe.endswith("-" + digest[:12])


@given(st.text(max_size=20), st.text(max_size=20))
def test_safe_names_of_different_layers_differ(a, b):
    if a != b:
        assert safe_name(a) != safe_name(b)


@pytest.mark.parametrize("path", ["../x.png", "/abs.png", "a//b.png", "a\\b.png", "a/../b", ""])
def test_checked_refuses_unsafe_paths(path):
    with pytest.raises(AssertionError):
        checked(path)


def test_unit_grids_filters_table_and_summary(tiny):
    out, summary, _, rows = tiny
    export_dir = out / "export"
    for (layer, unit), group in rows.groupby(["layer", "unit"]):
        assert set(group["grid_path"]) == {f"grids/{layer}/{unit}.png"}
        group = group[group["kind"] == "top"]  # the grid shows the top rows
        grid = Image.open(export_dir / f"grids/{layer}/{unit}.png")
        cell = max(r - le for r, le in zip(group["input_right"], group["input_left"], strict=True))
        cell *= max(1, math.ceil(64 / cell))
        assert grid.size == (2 * (3 * cell + 2 * 2) + 12, 3 * cell + 2 * 2)
    filters = np.asarray(Image.open(export_dir / "filters.png"))  # 4 filters of 3x3, zoom 11
    assert filters.shape == (2 * 33 + 3 * 2, 2 * 33 + 3 * 2, 3)
    torch.manual_seed(0)
    weight = tiny_models.tiny().conv1.weight[0].detach().permute(1, 2, 0).double().numpy()
    expected = np.rint(255 * (0.5 + 0.5 * weight / np.abs(weight).max()))  # (3, 3, 3)
    np.testing.assert_array_equal(filters[2:35:11, 2:35:11], expected)
    table = pq.read_table(export_dir / "export.parquet")
    assert table.schema.equals(schema("export"), check_metadata=False)
    assert table.schema.metadata[b"ninebest.schema"] == b"export"
    assert json.loads((export_dir / "export.json").read_text())["counts"] == summary["counts"]
    assert table.schema.metadata[b"ninebest.schema_version"] == b"2"
    kinds = rows["kind"].value_counts().to_dict()
    assert summary["kinds"] == {"top": 135, "sample": kinds["sample"], "bottom": 15 * BOTTOM}
    assert summary["counts"] == {
        "rows": 135 + kinds["sample"] + 15 * BOTTOM, "images": 12,
        "activation_mismatches": 0, "errors": 0,
    }  # fmt: skip
    assert summary["schemas"] == {"export": 2} and summary["masks"]["note"] is None
    order = rows.assign(
        k=rows["kind"].map({"top": 0, "sample": 1, "bottom": 2}),
        layer_order=rows["layer"].map({name: i for i, name in enumerate(TINY_LAYERS)}),
    )
    keys = list(zip(order.layer_order, order.unit, order.k, order.band.fillna(""), strict=True))
    assert keys == sorted(keys, key=lambda k: (k[0], k[1], k[2]))  # layer, unit, kind order


def test_user_errors_name_the_valid_choices(tiny, tmp_path):
    out, _, _, _ = tiny
    with pytest.raises(DataError, match=r"holds no manifest.json"):
        export(str(tmp_path), progress=Progress(quiet=True))
    with pytest.raises(
        ConfigError, match=r"'conv3' is not in the index; indexed: conv1, conv2, fc"
    ):
        export(str(out), layers=("conv3",), progress=Progress(quiet=True))
    with pytest.raises(
        ConfigError, match=r"unit 4 is out of range .*'conv1'.* valid units: 0\.\.3"
    ):
        export(str(out), layers=("conv1", "conv2"), units=(1, 4), progress=Progress(quiet=True))
    with pytest.raises(ConfigError, match=r"units must be whole numbers"):
        export(str(out), units=("3",), progress=Progress(quiet=True))
    with pytest.raises(ConfigError, match=r"--workers must be .* at least 1"):
        export(str(out), workers=0, progress=Progress(quiet=True))
    assert (out / "export" / "export.json").exists()  # refused before anything was touched
    assert not (tmp_path / "export").exists()


def test_changed_and_missing_files_are_reported_not_exported_to_a_url(tiny, originals, tmp_path):
    out, _, _, _ = tiny
    copy = tmp_path / "out"
    copy.mkdir()
    for name in ("manifest.json", "images.parquet", "index", "stats", "samples", "bottom"):
        src = out / name
        shutil.copytree(src, copy / name) if src.is_dir() else shutil.copy(src, copy / name)
    images = pd.read_parquet(copy / "images.parquet")
    files = originals.parent / "files"
    moved = {"files/tall.png": files / "gray.png", "files/small.jpg": tmp_path / "gone.jpg"}
    images["uri"] = [str(moved.get(i, u)) for i, u in images[["image_id", "uri"]].values]
    images.to_parquet(copy / "images.parquet")
    probabilities = json.loads((copy / "manifest.json").read_text())["stats"]["probabilities"]
    at99, at50 = (probabilities.index(p) for p in (0.99, 0.5))
    for layer in ("conv2", "fc"):  # plant thresholds that some maps rise above: the p50
        stats = pq.read_table(copy / "stats" / f"{layer}.parquet")
        quantiles = [q[:at99] + [q[at50]] + q[at99 + 1 :] for q in stats["quantiles"].to_pylist()]
        column = pa.array(quantiles, stats.schema.field("quantiles").type)
        stats = stats.set_column(stats.schema.get_field_index("quantiles"), "quantiles", column)
        pq.write_table(stats, copy / "stats" / f"{layer}.parquet")
    summary = export(
        copy.as_uri(), layers=("conv2", "fc"), units=(0, 1), progress=Progress(quiet=True)
    )  # a URL
    assert summary["export"] == str(copy / "export")  # Store.uri: a plain path locally
    rows = pd.read_parquet(copy / "export" / "export.parquet")
    bad = rows[rows["image_id"].isin(moved)]
    assert len(bad) and summary["counts"]["errors"] == len(bad)
    assert bad["patch_path"].isna().all() and bad["recomputed_activation"].isna().all()
    assert set(bad["error"].str.extract(r"^(file changed|unreadable)")[0]) <= {
        "file changed", "unreadable",
    }  # fmt: skip
    good = rows[~rows["image_id"].isin(moved)]
    assert good["activation_ok"].all() and good["patch_path"].notna().all()
    assert (copy / "export" / "grids" / "fc" / "0.png").exists()
    assert bad["overlay_path"].isna().all() and bad["mask_path"].isna().all()
    masked = check_masks(copy, copy, good, oracle_maps(out, good))
    assert masked >= 5  # masks with pixels in them, drawn as the oracle draws them


@pytest.fixture(scope="module")
def alexnet(originals, alexnet_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("alexnet") / "out"
    layers = ("features.3", "features.10", "classifier.4")
    run_index(originals, out, "torchvision:alexnet", layers, weights=str(alexnet_weights))
    summary = export(
        str(out), layers=("features.3", "features.10", "classifier.4"), units=(0, 7),
        progress=Progress(quiet=True),
    )  # fmt: skip
    return out, summary, pd.read_parquet(out / "export" / "export.parquet")


def test_alexnet_patches_activations_and_filters(alexnet, alexnet_weights):
    out, summary, rows = alexnet
    assert (rows["kind"] == "top").sum() == 3 * 2 * 9 and set(rows["unit"]) == {0, 7}
    assert (rows["kind"] == "sample").any() and rows["overlay_path"].notna().all()
    assert rows["activation_ok"].all() and summary["counts"]["activation_mismatches"] == 0
    files = uris(out)
    for row in rows.itertuples():
        image = oriented(files[row.image_id])
        patch = np.asarray(Image.open(out / "export" / row.patch_path))
        np.testing.assert_array_equal(patch, image[row.top : row.bottom, row.left : row.right])
        if row.layer == "classifier.4":
            assert (row.input_top, row.input_left, row.input_bottom, row.input_right) == (
                0, 0, 224, 224,
            )  # fmt: skip
    model = torchvision.models.alexnet()
    model.load_state_dict(torch.load(alexnet_weights, weights_only=True))
    filters = Image.open(out / "export" / "filters.png")  # 64 filters of 11x11, zoom 3, 8x8
    assert filters.size == (8 * 33 + 9 * 2, 8 * 33 + 9 * 2)
    assert summary["outputs"]["filters"] == "filters.png"


@pytest.mark.parametrize("layer", ["features.0", "features.3", "features.10"])
def test_cropping_to_the_box_loses_no_projection(layer):
    """Why a projection may be cropped to its box: outside it, the deconvnet gives exact zeros."""
    from pipeline.net.receptive_field import receptive_field

    torch.manual_seed(0)
    model = torchvision.models.alexnet().eval()
    field = receptive_field(model, layer, (224, 224))
    h, w = field.output_size
    ys, xs = torch.tensor([0, h // 2, h - 1, 2]), torch.tensor([0, w // 2, w - 1, w - 2])
    proj = project(model, layer, torch.randn(4, 3, 224, 224), torch.arange(4), ys, xs)
    for b in range(4):
        top, left, bottom, right = field.box(int(ys[b]), int(xs[b]))
        outside = proj[b].abs().sum(0)  # (224, 224)
        outside[top:bottom, left:right] = 0
        assert outside.max() == 0


@pytest.mark.parametrize("decode", [{"decode": "device"}, {"decode": "pil", "draft": True}])
def test_export_recomputes_from_the_pixels_the_index_decoded(decode, tmp_path):
    """After a device-decoded or reduced-size index, export's recomputed activations still match
    (it decodes as the manifest says), and patches are exact crops of the full-size originals."""
    data = tmp_path / "data"
    data.mkdir()
    photo = Image.fromarray(oracle_photo("coffee"))
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.resize((1300, 1100)).save(data / "big_rotated.jpg", quality=92, exif=exif.tobytes())
    photo.resize((1500, 1040)).save(data / "big.jpg", quality=92)
    photo.save(data / "plain.jpg", quality=92)
    photo.save(data / "plain.png")
    out = tmp_path / "out"
    cfg = IndexConfig(
        model="tiny_models:tiny", data=str(data), layers=TINY_LAYERS, out=str(out), workers=1,
        batch_size=4, shard_size=4, samples=0, **decode,
    )  # fmt: skip
    manifest = index(cfg, Progress(quiet=True))
    assert manifest["environment"]["decodes"] == [decode["decode"]]
    summary = export(str(out), progress=Progress(quiet=True))
    rows = pd.read_parquet(out / "export" / "export.parquet")
    assert rows["activation_ok"].all() and summary["counts"]["activation_mismatches"] == 0
    np.testing.assert_allclose(rows["recomputed_activation"], rows["activation"], rtol=1e-3)
    for row in rows.drop_duplicates("image_id").itertuples():
        image = oriented(data / row.image_id)
        patch = np.asarray(Image.open(out / "export" / row.patch_path))
        np.testing.assert_array_equal(patch, image[row.top : row.bottom, row.left : row.right])


def oracle_photo(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


# ---------------------------------------------------------------- where the unit fires


def oracle_maps(out: Path, rows: pd.DataFrame) -> dict[tuple, torch.Tensor]:
    """Brute force: each row's (H', W') map from a hooked forward of the torchvision-transformed
    original through the seeded tiny model."""
    files = uris(out)
    torch.manual_seed(0)  # pipeline.net.models.INIT_SEED: the indexed model
    model = tiny_models.tiny().eval()
    ids = sorted(set(rows["image_id"]))
    images = torch.stack([oracle.load(files[i]) for i in ids])  # (N, 3, 224, 224)
    outputs = oracle.activations(model, TINY_LAYERS, images)
    found = {}
    for row in rows.itertuples():
        output = outputs[row.layer][ids.index(row.image_id), row.unit]  # (H', W') or ()
        found[row.Index] = output.reshape(output.shape if output.dim() == 2 else (1, 1))
    return found


def oracle_heat(activation_map: torch.Tensor, row, shape: tuple[int, int]) -> np.ndarray:
    """The documented upsampling with torch's interpolate: map -> input, cut, -> patch pixels."""
    grid = activation_map[None, None].float()  # (1, 1, H', W')
    full = torch.nn.functional.interpolate(grid, size=(224, 224), mode="bilinear")
    cut = full[:, :, row.input_top : row.input_bottom, row.input_left : row.input_right]
    heat = torch.nn.functional.interpolate(cut, size=shape, mode="bilinear")[0, 0]
    return heat.clamp(grid.min(), grid.max()).numpy()  # as documented: rounding stays in range


def mask_threshold(out: Path, layer: str, unit: int) -> float:
    """The unit's 0.99 quantile, found by value in the manifest's probabilities."""
    probabilities = json.loads((out / "manifest.json").read_text())["stats"]["probabilities"]
    at = [i for i, p in enumerate(probabilities) if math.isclose(p, 0.99)]
    assert len(at) == 1
    stats = pd.read_parquet(out / "stats" / f"{layer}.parquet").set_index("unit")
    return float(stats.loc[unit, "quantiles"][at[0]])


def test_overlays_and_masks_are_the_upsampled_map_of_every_row(tiny):
    """Overlays and masks of every kind of row against the brute-force map, torch's interpolate
    and the stats' 0.99 quantile; the heat is highest where the row's (y, x) is."""
    from pipeline.export.heat import overlay

    out, summary, _, rows = tiny
    maps = oracle_maps(out, rows)
    top1 = rows[(rows["kind"] == "top") & (rows["rank"] == 1)].set_index(["layer", "unit"])
    for row in rows.itertuples():
        patch = Image.open(out / "export" / row.patch_path)
        patch.load()
        heat = oracle_heat(maps[row.Index], row, (patch.height, patch.width))  # (h, w)
        got = np.asarray(Image.open(out / "export" / row.overlay_path)).astype(int)
        scale = float(top1.loc[(row.layer, row.unit), "activation"])
        expected = np.asarray(overlay(patch, heat, scale if scale > 0 else None)).astype(int)
        assert got.shape == expected.shape and np.abs(got - expected).max() <= 1, row
        # the hottest heat lies within one map cell of (y, x)
        height, width = maps[row.Index].shape
        u = (np.arange(patch.height) + 0.5) * (row.input_bottom - row.input_top) / patch.height
        v = (np.arange(patch.width) + 0.5) * (row.input_right - row.input_left) / patch.width
        s = (row.input_top + u) * height / 224 - 0.5  # map row of each patch row
        t = (row.input_left + v) * width / 224 - 0.5
        near = (np.abs(s - row.y) < 1 + height / 224)[:, None] & (
            np.abs(t - row.x) < 1 + width / 224
        )[None, :]
        if row.kind == "top":
            assert near.any() and heat[near].max() >= heat.max() - 1e-5, row
            assert heat.max() <= row.activation + 1e-4 * abs(row.activation) + 1e-5
    assert summary["masks"]["written"] == len(rows) and summary["masks"]["probability"] == 0.99
    # with 12 images the 0.99 quantile is each unit's maximum: every mask here is empty; the
    # changed-files test below plants lower thresholds to check masks with pixels in them
    assert check_masks(out, out, rows, maps) == 0


def check_masks(index: Path, out: Path, rows: pd.DataFrame, maps: dict) -> int:
    """Each row's mask against the oracle's map and `index`'s 0.99 quantile (export under
    `out`); return how many masks hold pixels."""
    from pipeline.export.heat import mask_image

    masked = 0
    for row in rows.itertuples():
        patch = Image.open(out / "export" / row.patch_path)
        patch.load()
        heat = oracle_heat(maps[row.Index], row, (patch.height, patch.width))  # (h, w)
        threshold = mask_threshold(index, row.layer, row.unit)
        assert row.mask_threshold == pytest.approx(threshold, rel=1e-6)
        tol = 1e-4 * max(1.0, abs(threshold))  # the oracle's preprocessing rounds differently
        low, high = heat > threshold + tol, heat > threshold - tol  # (h, w) sure, possible
        assert low.mean() - 1e-6 <= row.mask_fraction <= high.mean() + 1e-6, row  # float32
        if (low != high).any():
            continue  # pixels at the threshold itself (e.g. a top-1 at the 0.99 quantile)
        mask = np.asarray(Image.open(out / "export" / row.mask_path)).astype(int)
        expected = np.asarray(mask_image(patch, low)).astype(int)
        assert (np.abs(mask - expected).max(axis=2) <= 1).all(), row
        masked += bool(low.any())
    return masked


def test_samples_and_bottom_rows_are_the_index_files_recomputed(tiny):
    out, _, _, rows = tiny
    manifest = json.loads((out / "manifest.json").read_text())
    keys = ["layer", "unit", "image_id", "y", "x"]
    for kind, folder in (("sample", "samples"), ("bottom", "bottom")):
        mine = rows[rows["kind"] == kind]
        stored = pd.read_parquet(out / folder)
        assert len(mine) == len(stored) > 0
        merged = mine.merge(stored, on=keys + (["band"] if kind == "sample" else []))
        assert len(merged) == len(mine)
        np.testing.assert_allclose(merged["activation_x"], merged["activation_y"])
        assert mine["activation_ok"].all() and mine["error"].isna().all()
        np.testing.assert_allclose(mine["recomputed_activation"], mine["activation"], rtol=1e-3)
        assert mine["projection_path"].isna().all()  # no deconvnet for samples and bottom
        assert mine["overlay_path"].notna().all() and mine["mask_path"].notna().all()
    bottom = rows[rows["kind"] == "bottom"].merge(
        pd.read_parquet(out / "bottom"), on=["layer", "unit", "rank"]
    )
    assert (bottom["image_id_x"] == bottom["image_id_y"]).all()  # rank 1 the lowest, as stored
    samples = rows[rows["kind"] == "sample"]
    assert set(samples["band"]) <= set(manifest["samples"]["bands"])
    for _, group in samples.groupby(["layer", "unit", "band"]):
        assert list(group["rank"]) == list(range(1, len(group) + 1))
    assert rows.loc[rows["kind"] != "sample", "band"].isna().all()
    assert rows.loc[rows["kind"] == "top", "projection_path"].notna().all()


def test_an_index_without_statistics_exports_without_masks(tmp_path):
    """tests/fixtures/premove: an index from before statistics, samples and the bottom (as
    `--stats off` writes one): top rows with overlays, masks skipped, export.json says why."""
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "premove"
    out = tmp_path / "out"
    shutil.copytree(fixture / "out", out, ignore=shutil.ignore_patterns("partials"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert "stats" not in manifest  # made before statistics existed
    manifest["model"]["weights"] = str(fixture / "weights.pt")  # the same bytes, laid elsewhere
    (out / "manifest.json").write_text(json.dumps(manifest))
    images = pd.read_parquet(out / "images.parquet")
    images["uri"] = [str(fixture / "data" / Path(u).name) for u in images["uri"]]
    images.to_parquet(out / "images.parquet")
    summary = export(str(out), progress=Progress(quiet=True))
    rows = pd.read_parquet(out / "export" / "export.parquet")
    assert len(rows) == summary["counts"]["rows"] > 0 and set(rows["kind"]) == {"top"}
    assert rows["error"].isna().all() and rows["activation_ok"].all()
    assert rows["mask_path"].isna().all() and rows["mask_threshold"].isna().all()
    assert rows["overlay_path"].notna().all()
    assert all((out / "export" / p).is_file() for p in rows["overlay_path"])
    assert summary["masks"]["written"] == 0
    assert "--stats off" in summary["masks"]["note"]
    saved = json.loads((out / "export" / "export.json").read_text())
    assert saved["masks"]["note"] == summary["masks"]["note"]
    page = (out / "export" / "atlas" / "unit-fc-0.html").read_text()
    assert "masks skipped" in page and 'class="overlay"' in page and 'class="mask"' not in page
