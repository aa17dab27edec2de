"""Faults: a worker dying mid-shard, the driver SIGKILLed, storage writes failing or tearing.

After each, the index equals the oracle (here: an undisturbed run) and every shard counts once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pandas as pd
import pyarrow as pa
import pytest
import ray
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.config import IndexConfig
from pipeline.errors import DataError
from pipeline.index.run import index
from pipeline.progress import Progress
from pipeline.store import partials
from pipeline.store.schemas import schema
from pipeline.store.storage import Store

TESTS = Path(__file__).resolve().parents[1] / "helpers"
QUIET = Progress(quiet=True)


@pytest.fixture(scope="module")
def faulty_ray(tmp_path_factory):
    """A loopback Ray instance whose workers kill themselves once, mid-shard."""
    marker = tmp_path_factory.mktemp("fault") / "died"
    env = {
        "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]),
        "NINEBEST_FAULTS": f"exit_once={marker}",
    }
    ray.init(
        num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
        object_store_memory=128 * 1024**2, runtime_env={"env_vars": env}, logging_level="WARNING",
    )  # fmt: skip
    yield marker
    ray.shutdown()


def config(data: Path, out: Path, **kw) -> IndexConfig:
    base = dict(model="tiny_models:tiny", layers=("conv2", "fc"), batch_size=1, shard_size=8)
    return IndexConfig(data=str(data), out=str(out), workers=2, **{**base, **kw})


def test_worker_killed_mid_shard_is_retried_and_counted_once(faulty_ray, photos, tmp_path):
    manifest = index(config(photos, tmp_path / "out"), QUIET)
    assert faulty_ray.exists(), "no worker died: the fault was not injected"
    clean = tmp_path / "clean"
    index(config(photos, clean), QUIET)  # the marker exists now: no worker dies again
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "out" / "index"), pd.read_parquet(clean / "index")
    )
    images = pd.read_parquet(tmp_path / "out" / "images.parquet")
    assert len(images) == images.image_id.nunique() == manifest["counts"]["images"]
    for shard in manifest["shards"]:
        record = partials.read_commit(Store(str(tmp_path / "out")), shard["key"], manifest["run"])
        assert record["attempt"] == shard["attempt"]


def test_driver_killed_midway_resumes(faulty_ray, photos, tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "NINEBEST_FAULTS": "delay=0.15",
        "PYTHONPATH": str(TESTS),
        "RAY_ADDRESS": "",
    }
    argv = [sys.executable, "-m", "pipeline", "index", "--model", "tiny_models:tiny", "--layers",
            "conv2,fc", "--data", str(photos), "--out", str(out), "--batch-size", "1",
            "--shard-size", "8", "--workers", "2"]  # fmt: skip
    proc = subprocess.Popen(
        argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("partials/*/_COMMIT.json")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray instance it started
    proc.wait()
    done = -1  # a worker of the dead instance may finish its commit as it goes down
    while done != (done := len(list(out.glob("partials/*/_COMMIT.json")))):
        time.sleep(1.0)
    assert 1 <= done < 6 and not (out / "manifest.json").exists()
    manifest = index(config(photos, out), QUIET)
    assert manifest["counts"]["computed_shards"] == 6 - done
    clean = tmp_path / "clean"
    index(config(photos, clean), QUIET)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "index"), pd.read_parquet(clean / "index"))


class FlakyFileSystem(MemoryFileSystem):
    """Memory filesystem whose first `failures` writes raise after writing half their data."""

    protocol = "flaky"
    failures = 0

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if "w" in mode and FlakyFileSystem.failures > 0:
            FlakyFileSystem.failures -= 1
            write = f.write

            def torn(data):
                write(data[: len(data) // 2])
                raise ConnectionResetError("connection reset by peer")

            f.write = torn
        return f


def test_failed_writes_are_retried_and_never_torn(monkeypatch):
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    monkeypatch.setattr("pipeline.store.retry.BACKOFF_SECONDS", 0.01)
    store = Store("flaky://bucket")
    table = pa.table({"v": list(range(1000))})
    FlakyFileSystem.failures = 2
    store.write_parquet("t.parquet", table)
    assert store.read_parquet("t.parquet").equals(table)
    assert store.listdir("") == ["t.parquet"], "a torn temporary file was left behind"
    FlakyFileSystem.failures = 10
    with pytest.raises(ConnectionResetError):
        store.write_parquet("u.parquet", table)
    assert not store.exists("u.parquet")
    FlakyFileSystem.failures = 0


def test_reduce_refuses_a_partial_of_another_run(tmp_path):
    store = Store(str(tmp_path / "out"))
    record = partials.write(
        store, "s1", "a1", "run-A",
        pa.table({c: pa.array([], t) for c, t in [("layer", pa.string()), ("unit", pa.int32()),
                  ("rank", pa.int16()), ("activation", pa.float32()), ("image_id", pa.string()),
                  ("image_hash", pa.string()), ("y", pa.int32()), ("x", pa.int32())]}),
        schema("images").empty_table(),
        {"images": 0},
    )  # fmt: skip
    assert partials.read_table(store, record, "topk").num_rows == 0
    with pytest.raises(DataError, match="written by run run-A.*not by this run"):
        partials.read_table(store, {**record, "run": "run-B"}, "topk")
