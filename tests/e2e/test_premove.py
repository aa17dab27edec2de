"""An OUT written by the code before the restructure (flat `pipeline/`, commit 7ba7b62) resumes,
reindexes and exports with today's code without recomputing a shard.

tests/fixtures/premove/ was made by its make.py: `out/` by `ninebest index`, `versioned/` by
`ninebest reindex`, over the images in `data/`. The run fingerprint holds the data's absolute
path, so the data is laid back exactly where it was indexed (/tmp/ninebest-premove-fixture/data)
with its modification times (stamps.json: shard keys hash them; a git checkout does not keep them).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import IndexConfig, Preprocess
from pipeline.export.run import export
from pipeline.index.reindex import reindex
from pipeline.index.run import index
from pipeline.progress import Progress
from pipeline.store.storage import Store
from pipeline.store.versions import latest

pytestmark = pytest.mark.usefixtures("ray_local")
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "premove"
PLACE = Path("/tmp/ninebest-premove-fixture")  # where make.py indexed the data
QUIET = Progress(quiet=True)


@pytest.fixture(scope="module")
def placed() -> Path:
    """The fixture's data and weights at the path the old run recorded, stamps restored."""
    shutil.rmtree(PLACE, ignore_errors=True)
    PLACE.mkdir(parents=True)
    shutil.copytree(FIXTURE / "data", PLACE / "data")
    shutil.copy(FIXTURE / "weights.pt", PLACE / "weights.pt")
    for name, mtime_ns in json.loads((FIXTURE / "stamps.json").read_text()).items():
        os.utime(PLACE / "data" / name, ns=(mtime_ns, mtime_ns))
    yield PLACE
    shutil.rmtree(PLACE, ignore_errors=True)


def config(out: Path, **kw) -> IndexConfig:
    """The flags make.py ran with; `--distinct id --stats off` are what ninebest did then."""
    return IndexConfig(
        model="tiny_models:tiny", weights=str(PLACE / "weights.pt"), data=str(PLACE / "data"),
        out=str(out), layers=("conv2", "fc"), k=3, shard_size=3, batch_size=2, workers=1,
        max_bad_fraction=0.5, preprocess=Preprocess(resize=32, crop=32),
        **{"distinct": "id", "stats": False, **kw},
    )  # fmt: skip


def old_out(tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(FIXTURE / name, out)
    return out


def test_resume_recomputes_no_shard_and_keeps_the_index(placed, tmp_path):
    out = old_out(tmp_path, "out")
    before = pd.read_parquet(out / "index")
    manifest = index(config(out), QUIET)
    assert manifest["counts"]["computed_shards"] == 0
    assert manifest["counts"]["shards"] == 3
    pd.testing.assert_frame_equal(pd.read_parquet(out / "index"), before)
    images = pd.read_parquet(out / "images.parquet")
    assert len(images) == 8 and images.error.notna().sum() == 1


def test_reindex_of_an_old_version_reuses_every_shard(placed, tmp_path):
    out = old_out(tmp_path, "versioned")
    store = Store(str(out))
    first = latest(store)
    before = pd.read_parquet(out / "versions" / first / "index")
    report = reindex(config(out), progress=QUIET)
    assert report["mode"] == "incremental", report
    assert report["shards_computed"] == 0 and report["shards_reused"] == 3, report
    second = latest(store)
    assert second != first
    pd.testing.assert_frame_equal(pd.read_parquet(out / "versions" / second / "index"), before)


def test_export_reads_an_old_index(placed, tmp_path):
    out = old_out(tmp_path, "out")
    summary = export(str(out), layers=("fc",), progress=QUIET)
    rows = pd.read_parquet(out / "export" / "export.parquet")
    assert len(rows) == summary["counts"]["rows"] > 0
    assert rows.error.isna().all(), rows[rows.error.notna()]
    assert summary["counts"]["activation_mismatches"] == 0
    assert (out / "export" / "atlas" / "index.html").exists()


def test_todays_defaults_on_an_old_out_say_how_to_resume(placed, tmp_path):
    """Distinct content and statistics change the run: refused, naming the old settings."""
    from pipeline.errors import ConfigError, DataError

    out = old_out(tmp_path, "out")
    hint = r"distinct.*differ.*--distinct id --stats off"
    with pytest.raises(DataError, match=hint):
        index(config(out, distinct="content", stats=True), QUIET)
    with pytest.raises(ConfigError, match=r"changes distinct, stats, samples .*--full"):
        reindex(
            config(old_out(tmp_path, "versioned"), distinct="content", stats=True), progress=QUIET
        )
