"""Incremental reindexing equals a from-scratch index of today's data, recomputing little."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import pipeline.index.run
from pipeline.config import IndexConfig
from pipeline.errors import ConfigError, DataError
from pipeline.index.reindex import reindex
from pipeline.index.run import index
from pipeline.progress import Progress
from pipeline.store.storage import Store
from pipeline.store.versions import LOCK, history, latest

pytestmark = pytest.mark.usefixtures("ray_local")
QUIET = Progress(quiet=True)


def config(data: Path, out: Path, **kw) -> IndexConfig:
    # batch size 1: every activation is bit-identical however images are grouped
    base = dict(model="tiny_models:tiny", layers=("conv2", "fc"), k=3, batch_size=1, shard_size=6)
    return IndexConfig(data=str(data), out=str(out), workers=2, **{**base, **kw})


def scratch(data: Path, tmp: Path, **kw) -> pd.DataFrame:
    out = tmp / f"scratch-{time.monotonic_ns()}"
    index(config(data, out, **kw), QUIET)
    return pd.read_parquet(out / "index")


def latest_index(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "versions" / latest(Store(str(out))) / "index")


@pytest.fixture
def data(photos, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(photos, root)
    return root


def edit(data: Path, top: pd.DataFrame) -> dict:
    """Remove two images that sit in some unit's top-k, rewrite one, add three."""
    strongest = list(dict.fromkeys(top.sort_values(["rank", "layer", "unit"]).image_id))
    removed, rewritten = strongest[:2], strongest[2]
    for image_id in removed:
        (data / image_id).unlink()
    path = data / rewritten
    with Image.open(path) as image:
        Image.fromarray(255 - np.asarray(image.convert("RGB"))).save(path, quality=95)
    (data / "new").mkdir()
    for i, name in enumerate(["people/astronaut_0", "objects/coffee_1", "animals/cat_2"]):
        source = next(data.glob(f"{name}.*"), None) or next(data.rglob("*.jpg"))
        with Image.open(source) as image:
            image.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(data / "new" / f"{i}.png")
    return {"removed": removed, "rewritten": rewritten}


def latest_output(out: Path, folder: str) -> pd.DataFrame:
    return pd.read_parquet(out / "versions" / latest(Store(str(out))) / folder)


# statistics off: shards that lost images are derived; on (with a bottom): they are recomputed,
# reused shards keep their statistics, and every output still equals a from-scratch index
SETTINGS = [{"stats": False}, {"bottom": 2}]


@pytest.mark.parametrize("settings", SETTINGS, ids=["derived", "stats-and-bottom"])
def test_incremental_reindex_equals_scratch_and_recomputes_little(data, tmp_path, settings):
    out = tmp_path / "out"
    first = reindex(config(data, out, **settings), progress=QUIET)
    assert first["mode"] == "full" and first["previous"] is None
    pd.testing.assert_frame_equal(latest_index(out), scratch(data, tmp_path, **settings))
    changes = edit(data, latest_index(out))
    second = reindex(config(data, out, **settings), progress=QUIET)
    assert second["mode"] == "incremental"
    assert (second["images_new"], second["images_changed"], second["images_removed"]) == (3, 1, 2)
    assert second["shards_reused"] >= 4
    assert second["shards_computed"] <= (3 if "stats" in settings else 6)  # derived or recomputed
    assert (second["shards_derived"] >= 1) == ("stats" in settings)
    fresh = tmp_path / "fresh"
    index(config(data, fresh, **settings), QUIET)
    pd.testing.assert_frame_equal(latest_index(out), pd.read_parquet(fresh / "index"))
    for folder in ("stats", "bottom", "samples") if "bottom" in settings else ():
        got, want = latest_output(out, folder), pd.read_parquet(fresh / folder)
        if folder == "stats":  # sums merged in another order: equal up to rounding
            np.testing.assert_allclose(got[["mean", "std"]], want[["mean", "std"]], rtol=1e-12)
            got, want = got.drop(columns=["mean", "std"]), want.drop(columns=["mean", "std"])
        pd.testing.assert_frame_equal(got, want)  # quantiles: 48 images, the sketches are exact
    drift = pd.read_parquet(out / "versions" / second["run_id"] / "drift.parquet")
    assert len(drift) == second["units_drifted"] > 0
    left = {i for ids in drift["left"] for i in ids}
    assert set(changes["removed"]) <= left
    report = pd.read_parquet(out / "versions" / second["run_id"] / "report.parquet")
    assert report.loc[0, "images_removed"] == 2
    table = history(Store(str(out)), "fc", 0).to_pandas()
    assert list(table.version.unique()) == [first["run_id"], second["run_id"]]


def test_killed_reindex_keeps_latest_and_resumes(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = reindex(config(data, out), progress=QUIET)
    edit(data, latest_index(out))
    real = pipeline.index.run.map_shards

    def dies_after_one(p, todo, *rest):
        yield next(real(p, todo, *rest))
        raise KeyboardInterrupt  # the driver is killed

    monkeypatch.setattr(pipeline.index.run, "map_shards", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        reindex(config(data, out), progress=QUIET)
    assert latest(Store(str(out))) == first["run_id"]
    assert not (out / LOCK).exists()
    monkeypatch.setattr(pipeline.index.run, "map_shards", real)
    again = reindex(config(data, out), progress=QUIET)
    pd.testing.assert_frame_equal(latest_index(out), scratch(data, tmp_path))
    assert (
        again["shards_computed"]
        < again["shards"] - again["shards_reused"] - again["shards_derived"] + 1
    )


def test_lock_refuses_a_second_run_until_it_expires(data, tmp_path):
    out = tmp_path / "out"
    reindex(config(data, out), progress=QUIET)
    lock = {"owner": "host:1:abc", "since": "earlier", "expires": time.time() + 600}
    (out / LOCK).write_text(json.dumps(lock))
    with pytest.raises(DataError, match="another reindex holds .*host:1:abc"):
        reindex(config(data, out), progress=QUIET)
    (out / LOCK).write_text(json.dumps({**lock, "expires": time.time() - 1}))
    report = reindex(config(data, out), progress=QUIET)
    assert report["mode"] == "incremental" and not (out / LOCK).exists()
    from pipeline.export.run import export

    summary = export(str(out), layers=("fc",), units=(0,), progress=QUIET)  # follows LATEST
    export_dir = out / "versions" / report["run_id"] / "export"
    assert (export_dir / "export.json").exists() and summary["kinds"]["top"] == 3  # k = 3
    page = (export_dir / "atlas" / "layer-fc.html").read_text()
    assert "History across versions" in page  # the Fig. 4 view: one row per version
    assert all(f"<code>{v.name}</code>" in page for v in (out / "versions").iterdir())


def test_changed_settings_need_full_and_new_weights_force_it(data, tmp_path):
    out = tmp_path / "out"
    reindex(config(data, out), progress=QUIET)
    with pytest.raises(ConfigError, match="changes k against the previous version.*--full"):
        reindex(config(data, out, k=4), progress=QUIET)
    assert reindex(config(data, out, k=4), full=True, progress=QUIET)["mode"] == "full"
    import torch

    from tiny_models import Tiny

    torch.manual_seed(7)
    torch.save(Tiny().state_dict(), tmp_path / "retrained.pt")
    report = reindex(config(data, out, k=4, weights=str(tmp_path / "retrained.pt")), progress=QUIET)
    assert report["mode"] == "full" and report["shards_computed"] == report["shards"]
    # a version written by an older ninebest (another partial format): same settings, full run
    manifest = out / "versions" / latest(Store(str(out))) / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "run": "older"}))
    report = reindex(config(data, out, k=4, weights=str(tmp_path / "retrained.pt")), progress=QUIET)
    assert report["mode"] == "full"  # nothing derived from partials it cannot read


def test_keep_prunes_old_versions_and_their_partials(data, tmp_path):
    out = tmp_path / "out"
    first = reindex(config(data, out), progress=QUIET)
    edit(data, latest_index(out))
    second = reindex(config(data, out), keep=1, progress=QUIET)
    assert second["pruned"] == [first["run_id"]]
    assert sorted(p.name for p in (out / "versions").iterdir()) == [second["run_id"]]
    manifest = json.loads((out / "versions" / second["run_id"] / "manifest.json").read_text())
    used = {(s["key"], s["attempt"]) for s in manifest["shards"]}
    on_disk = {
        (key.name, attempt.name)
        for key in (out / "partials").iterdir()
        for attempt in key.iterdir()
        if attempt.is_dir()
    }
    assert on_disk == used
    pd.testing.assert_frame_equal(latest_index(out), scratch(data, tmp_path))


def test_only_a_plain_top_k_is_derived():
    from pipeline.index.reindex import derivable

    base = dict(model="m", data="/d", layers=("fc",), out="/o")
    assert derivable(IndexConfig(**base, distinct="id", stats=False))
    assert derivable(IndexConfig(**base, distinct="content", stats=False))
    for kept in ({"stats": True}, {"stats": False, "samples": 2}, {"stats": False, "bottom": 1},
                 {"stats": False, "distinct": "perceptual"}):  # fmt: skip
        assert not derivable(IndexConfig(**base, **kept)), kept
