"""`ninebest index` end to end on a loopback Ray instance, against the brute-force oracle."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import torchvision

import oracle
from pipeline.config import IndexConfig
from pipeline.errors import DataError
from pipeline.index.run import check_decodes, check_precisions, index
from pipeline.progress import Progress

pytestmark = pytest.mark.usefixtures("ray_local")

ALEXNET_LAYERS = ("features.3", "features.10", "features.12", "classifier.4")
RESNET_LAYERS = ("layer2", "layer4.1.conv2", "avgpool", "fc")


def run(data: Path, out: Path, model: str, weights: Path, layers, **kw) -> dict:
    cfg = IndexConfig(
        model=model, weights=str(weights), data=str(data), layers=layers, out=str(out),
        workers=2, batch_size=4, shard_size=10, **kw,
    )  # fmt: skip
    return index(cfg, Progress(quiet=True))


def oracle_outputs(name: str, weights: Path, layers, data: Path, load=oracle.load):
    model = torchvision.models.get_model(name, weights=None)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    paths = sorted(
        (p for p in data.rglob("*") if p.suffix in (".jpg", ".png") and p.stat().st_size > 200),
        key=lambda p: p.relative_to(data).as_posix(),
    )
    paths = [p for p in paths if _decodes(p)]
    ids = [p.relative_to(data).as_posix() for p in paths]
    images = torch.stack([load(p) for p in paths])  # (N, 3, 224, 224)
    return oracle.activations(model, layers, images), ids


def _decodes(path: Path) -> bool:
    try:
        oracle.load(path)
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def dirty_photos(photos, tmp_path_factory) -> Path:
    """The photographs plus an empty file, text named .png, and a truncated PNG."""
    root = tmp_path_factory.mktemp("dirty")
    shutil.copytree(photos, root, dirs_exist_ok=True)
    (root / "bad").mkdir()
    (root / "bad" / "empty.jpg").write_bytes(b"")
    (root / "bad" / "text.png").write_text("this is not an image\n" * 20)
    good = next(photos.rglob("*.png")).read_bytes()
    (root / "bad" / "truncated.png").write_bytes(good[: len(good) // 3])
    return root


@pytest.fixture(scope="module")
def alexnet_run(dirty_photos, alexnet_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("alexnet") / "out"
    manifest = run(
        dirty_photos, out, "torchvision:alexnet", alexnet_weights, ALEXNET_LAYERS,
        max_bad_fraction=0.1,
    )  # fmt: skip
    return out, manifest


def test_alexnet_index_equals_brute_force(alexnet_run, dirty_photos, alexnet_weights):
    out, manifest = alexnet_run
    outputs, ids = oracle_outputs("alexnet", alexnet_weights, ALEXNET_LAYERS, dirty_photos)
    rows = pd.read_parquet(out / "index").to_dict("records")
    oracle.compare(rows, outputs, ids, k=9, hashes=oracle.content_hashes(dirty_photos, ids))
    assert manifest["distinct"] == {"mode": "content", "by": "image_hash"}
    assert manifest["counts"]["shards"] == 6 and manifest["counts"]["indexed"] == len(ids)
    assert manifest["layers"]["classifier.4"] == [4096]
    assert manifest["layers"]["features.10"] == [256, 13, 13]


def test_statistics_samples_and_outputs_equal_the_oracle(
    alexnet_run, dirty_photos, alexnet_weights
):
    """OUT/stats against numpy over the oracle's spatial maxima (duplicates included), and the
    samples within their bands (48 images: every image sampled, ranks exact)."""
    import numpy as np

    from pipeline.index.samples import BANDS

    out, manifest = alexnet_run
    outputs, ids = oracle_outputs("alexnet", alexnet_weights, ALEXNET_LAYERS, dirty_photos)
    assert manifest["stats"]["probabilities"][:2] == [0.001, 0.01]
    for layer in ALEXNET_LAYERS:
        out_map = outputs[layer]
        maxima = (out_map.flatten(2).amax(2) if out_map.dim() == 4 else out_map).double().numpy()
        stats = pd.read_parquet(out / "stats" / f"{layer}.parquet")
        assert list(stats.unit) == list(range(maxima.shape[1]))
        assert (stats["count"] == len(ids)).all()
        scale = np.abs(maxima).max()
        np.testing.assert_allclose(stats["mean"], maxima.mean(0), atol=1e-5 * scale)
        np.testing.assert_allclose(stats["std"], maxima.std(0), atol=1e-4 * scale)
        np.testing.assert_allclose(stats["max"], maxima.max(0), atol=1e-5 * scale)
        np.testing.assert_allclose(stats["min"], maxima.min(0), atol=1e-5 * scale)
        fire = (maxima > 1e-6 * scale).mean(0), (maxima > -1e-6 * scale).mean(0)
        assert ((stats["fire_rate"] >= fire[0] - 1e-9) & (stats["fire_rate"] <= fire[1])).all()
        samples = pd.read_parquet(out / "samples" / f"{layer}.parquet")
        bands = dict((name, (lo, hi)) for name, lo, hi in BANDS)
        for row in samples.itertuples():
            column = maxima[:, row.unit]
            tol = 1e-4 * scale
            low = np.mean(column < row.activation - tol)
            high = np.mean(column <= row.activation + tol)
            lo, hi = bands[row.band]
            assert low <= hi + 1e-9 and high >= lo - 1e-9, (layer, row)


def test_corrupt_images_are_skipped_and_recorded(alexnet_run):
    out, manifest = alexnet_run
    errors = pd.read_parquet(out / "errors.parquet")
    assert sorted(errors["image_id"]) == ["bad/empty.jpg", "bad/text.png", "bad/truncated.png"]
    assert errors["error"].str.len().min() > 0
    images = pd.read_parquet(out / "images.parquet")
    assert len(images) == manifest["counts"]["images"] == 51
    assert images["image_hash"].notna().sum() == 48


def test_index_rows_trace_to_image_bytes(alexnet_run, dirty_photos):
    out, _ = alexnet_run
    import hashlib

    rows = pd.read_parquet(out / "index").drop_duplicates("image_id")
    for row in rows.itertuples():
        data = (dirty_photos / row.image_id).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.image_hash


def test_index_files_follow_the_schema(alexnet_run):
    from pipeline.store.schemas import schema

    out, _ = alexnet_run
    for path in (out / "index").glob("*.parquet"):
        assert pq.read_schema(path).equals(schema("index"), check_metadata=False)
        meta = pq.read_schema(path).metadata
        assert meta[b"ninebest.schema"] == b"index" and meta[b"ninebest.schema_version"] == b"1"


def test_resume_recomputes_only_missing_shards(alexnet_run, dirty_photos, alexnet_weights):
    out, manifest = alexnet_run
    before = pd.read_parquet(out / "index")
    keys = [s["key"] for s in manifest["shards"]]
    for key in keys[1:3]:
        shutil.rmtree(out / "partials" / key)
    again = run(
        dirty_photos, out, "torchvision:alexnet", alexnet_weights, ALEXNET_LAYERS,
        max_bad_fraction=0.1,
    )  # fmt: skip
    pd.testing.assert_frame_equal(pd.read_parquet(out / "index"), before)
    old = {s["key"]: s["attempt"] for s in manifest["shards"]}
    new = {s["key"]: s["attempt"] for s in again["shards"]}
    assert [k for k in keys if old[k] != new[k]] == keys[1:3]


def test_resnet18_index_equals_brute_force(photos, resnet18_weights, tmp_path):
    run(
        photos, tmp_path / "out", "torchvision:resnet18", resnet18_weights, RESNET_LAYERS,
        distinct="id", stats=False,
    )  # fmt: skip
    outputs, ids = oracle_outputs("resnet18", resnet18_weights, RESNET_LAYERS, photos)
    rows = pd.read_parquet(tmp_path / "out" / "index").to_dict("records")
    oracle.compare(rows, outputs, ids, k=9)  # --distinct id: the one duplicate pair takes two


def test_device_decoded_index_equals_brute_force(photos, alexnet_weights, tmp_path):
    """--decode device (torchvision's CPU decoder here) against an oracle decoding the same way."""
    weights, layers = alexnet_weights, ALEXNET_LAYERS
    out = tmp_path / "out"
    manifest = run(photos, out, "torchvision:alexnet", weights, layers, decode="device")
    assert manifest["environment"]["decodes"] == ["device"]
    outputs, ids = oracle_outputs("alexnet", weights, layers, photos, oracle.load_device)
    rows = pd.read_parquet(out / "index").to_dict("records")
    oracle.compare(rows, outputs, ids, k=9, hashes=oracle.content_hashes(photos, ids))


def test_shards_decoded_in_different_ways_are_not_merged():
    check_decodes([{"decode": "pil"}, {}])  # records before --decode: Pillow
    mixed = r"\(1 shards decoded by device, 1 shards decoded by pil\).*--decode pil"
    with pytest.raises(DataError, match=mixed):
        check_decodes([{"decode": "device"}, {"decode": "pil"}])


def test_too_many_bad_images_fail_after_recording_them(dirty_photos, tmp_path):
    from pipeline.errors import DataError

    with pytest.raises(DataError, match=r"3 of 51 images .* --max-bad-fraction"):
        index(
            IndexConfig(
                model="tiny_models:tiny", data=str(dirty_photos), layers=("conv2", "fc"),
                out=str(tmp_path / "out"), workers=2, shard_size=20,
            ),
            Progress(quiet=True),
        )  # fmt: skip
    assert len(pd.read_parquet(tmp_path / "out" / "errors.parquet")) == 3
    assert not (tmp_path / "out" / "index").exists()
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_shards_of_different_precisions_are_not_merged():
    check_precisions([{"precision": "float32"}, {}])  # records before --precision: float32
    mixed = r"\(1 shards in bfloat16, 1 shards in float32\).*--precision"
    with pytest.raises(DataError, match=mixed):
        check_precisions([{"precision": "bfloat16"}, {"precision": "float32"}])


def legacy_fingerprint(cfg: IndexConfig, model_fingerprint: str) -> str:
    """run_fingerprint as ninebest computed it before --distinct, --stats and --bottom."""
    import hashlib
    import json

    key = {
        "model": cfg.model, "weights": model_fingerprint, "layers": list(cfg.layers), "k": cfg.k,
        "depth": cfg.depth, "preprocess": cfg.to_json()["preprocess"],
        "precision": cfg.precision, "data": cfg.data,
        "schemas": {"partial": 1, "images": 2},
    }  # fmt: skip
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def test_legacy_settings_keep_the_fingerprint_of_an_older_index(tmp_path):
    from pipeline.index.plan import run_fingerprint

    base = dict(model="tiny_models:tiny", data=str(tmp_path), layers=("fc",), out=str(tmp_path))
    legacy = IndexConfig(**base, distinct="id", stats=False, bottom=0)
    assert run_fingerprint(legacy, "w") == legacy_fingerprint(legacy, "w")
    seen = {run_fingerprint(legacy, "w")}
    legacy_off = {"distinct": "id", "stats": False}
    for change in (
        {"distinct": "content", "stats": False}, {"distinct": "id", "stats": True, "samples": 0},
        {**legacy_off, "bottom": 3}, {**legacy_off, "samples": 2},
        {"distinct": "perceptual", "stats": False},
        {"distinct": "perceptual", "stats": False, "near": 3},
        {},  # the defaults: content, statistics and samples
    ):  # fmt: skip
        fingerprint = run_fingerprint(IndexConfig(**{**base, **change}), "w")
        assert fingerprint not in seen, change
        seen.add(fingerprint)
