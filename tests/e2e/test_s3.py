"""`ninebest index` against a real S3-protocol server (moto, on loopback): the same index as on
local disk, resume, all-or-nothing uploads, and credentials that never leave the storage options.

Every request either goes to moto at 127.0.0.1 through the storage options, or into a loopback
trap (see `s3server`); the module fails if anything but Ray's own cloud probes reached it.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import traceback
import uuid
from pathlib import Path
from types import SimpleNamespace

import fsspec
import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.config import IndexConfig
from pipeline.index.reindex import reindex
from pipeline.index.run import index
from pipeline.progress import Progress
from pipeline.store.storage import Store
from s3server import MotoS3, ProxyTrap, offline_aws_env

BUCKET = "ninebest-test"
KEY = "NINEBESTTESTKEYID42"
SECRET = f"ninebest-secret-{uuid.uuid4().hex}"  # distinctive: grep finds any leak
LAYERS = ("conv2", "fc")
MiB = 2**20


@pytest.fixture(scope="module")
def s3():
    """moto on 127.0.0.1 with one bucket; AWS env vars are dummies, proxies point at the trap."""
    trap = ProxyTrap()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in offline_aws_env(trap.port, "env-dummy-key", "env-dummy-secret").items():
            if value is None:
                mp.delenv(name, raising=False)
            else:
                mp.setenv(name, value)
        server = MotoS3()
        server.client(KEY, SECRET).create_bucket(Bucket=BUCKET)
        yield SimpleNamespace(
            options=server.storage_options(KEY, SECRET),
            client=server.client(KEY, SECRET),
            trap=trap,
        )
        server.stop()
    trap.close()
    assert trap.strays() == [], f"requests tried to leave loopback: {trap.strays()}"


@pytest.fixture(scope="module")
def cluster(s3, ray_local):
    """The loopback Ray instance, started after `s3` so its workers inherit the offline env."""
    return ray_local


@pytest.fixture(scope="module")
def dataset(photos, tmp_path_factory) -> Path:
    """The 48 photographs plus one unreadable file, so errors.parquet has a row."""
    root = tmp_path_factory.mktemp("s3data")
    shutil.copytree(photos, root, dirs_exist_ok=True)
    (root / "bad").mkdir()
    (root / "bad" / "text.png").write_text("this is not an image\n" * 20)
    return root


@pytest.fixture(scope="module")
def s3_data(s3, dataset) -> str:
    fs = fsspec.filesystem("s3", **s3.options)
    for path in sorted(p for p in dataset.rglob("*") if p.is_file()):
        fs.put_file(str(path), f"{BUCKET}/data/{path.relative_to(dataset).as_posix()}")
    return f"s3://{BUCKET}/data"


def config(data: str, out: str, storage_options: dict) -> IndexConfig:
    return IndexConfig(
        model="tiny_models:tiny", layers=LAYERS, data=data, out=out, workers=2, shard_size=16,
        max_bad_fraction=0.1, storage_options=storage_options,
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(cluster, s3, dataset, s3_data, tmp_path_factory):
    """The same job twice: data and output on local disk, and on S3."""
    local_out = tmp_path_factory.mktemp("local") / "out"
    local = index(config(str(dataset), str(local_out), {}), Progress(quiet=True))
    remote = index(config(s3_data, f"s3://{BUCKET}/out", s3.options), Progress(quiet=True))
    return SimpleNamespace(local_out=local_out, local=local, remote=remote)


def read_index(where: str | Path, storage_options: dict | None = None) -> pd.DataFrame:
    frame = pd.read_parquet(where, storage_options=storage_options)
    return frame.sort_values(["layer", "unit", "rank"]).reset_index(drop=True)


def as_json(obj):
    return json.loads(json.dumps(obj))


def objects(s3, prefix: str = "") -> dict[str, bytes]:
    """Every object under `prefix`, read with boto3 behind the pipeline's back."""
    found = {}
    for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for entry in page.get("Contents", []):
            body = s3.client.get_object(Bucket=BUCKET, Key=entry["Key"])["Body"].read()
            found[entry["Key"]] = body
    return found


def test_index_on_s3_equals_index_on_local_disk(runs, s3):
    remote = read_index(f"s3://{BUCKET}/out/index", s3.options)
    local = read_index(runs.local_out / "index")
    assert len(remote) == 11 * 9  # (6 + 5 units) x k
    pd.testing.assert_frame_equal(remote, local)
    assert s3.trap.strays() == []


def test_images_and_errors_on_s3(runs, s3):
    opts = s3.options
    images = pd.read_parquet(f"s3://{BUCKET}/out/images.parquet", storage_options=opts)
    local = pd.read_parquet(runs.local_out / "images.parquet")
    assert list(images["uri"]) == [f"s3://{BUCKET}/data/{i}" for i in images["image_id"]]
    same = ["image_id", "image_hash", "bytes", "height", "width"]  # not uri, stamp, error text
    pd.testing.assert_frame_equal(images[same], local[same])
    assert list(images["error"].notna()) == list(local["error"].notna())
    errors = pd.read_parquet(f"s3://{BUCKET}/out/errors.parquet", storage_options=opts)
    assert list(errors["image_id"]) == ["bad/text.png"]
    assert list(errors["uri"]) == [f"s3://{BUCKET}/data/bad/text.png"]
    assert errors["error"].str.len().min() > 0


def test_manifest_and_outputs_on_s3(runs, s3):
    store = Store(f"s3://{BUCKET}/out", s3.options)
    manifest = store.read_json("manifest.json")
    assert manifest == as_json(runs.remote)
    assert manifest["counts"] == runs.local["counts"]
    assert manifest["counts"]["images"] == 49 and manifest["counts"]["bad"] == 1
    assert manifest["counts"]["shards"] == 4  # 49 images in shards of 16
    assert manifest["data"]["source"] == f"s3://{BUCKET}/data"
    assert manifest["config"]["out"] == f"s3://{BUCKET}/out"
    assert "storage_options" not in manifest["config"]
    assert manifest["model"]["fingerprint"] == runs.local["model"]["fingerprint"]
    assert manifest["layers"] == runs.local["layers"]
    assert store.read_json("run.json")["run"] == manifest["run"]
    keys = set(objects(s3, "out/"))
    top = {k for k in keys if not k.startswith("out/partials/")}
    tables = ("index", "stats", "samples", "bottom")  # the per-layer outputs this run wrote
    files = {f"out/{rel}" for name in tables for rel in manifest["outputs"].get(name, [])}
    assert {name for name in tables if name in manifest["outputs"]} == {"index", "stats", "samples"}
    assert top == files | {f"out/{n}" for n in ("images.parquet", "errors.parquet")} | {
        "out/manifest.json",
        "out/run.json",
    }
    commits = {k for k in keys if k.endswith("/_COMMIT.json")}
    assert len(commits) == 4 and not any(".tmp-" in k for k in keys)


def test_resume_on_s3_recomputes_only_the_missing_shard(runs, s3, s3_data):
    store = Store(f"s3://{BUCKET}/out", s3.options)
    before = read_index(f"s3://{BUCKET}/out/index", s3.options)
    keys = [s["key"] for s in runs.remote["shards"]]
    store.remove(f"partials/{keys[1]}/_COMMIT.json")
    again = index(config(s3_data, f"s3://{BUCKET}/out", s3.options), Progress(quiet=True))
    pd.testing.assert_frame_equal(read_index(f"s3://{BUCKET}/out/index", s3.options), before)
    old = {s["key"]: s["attempt"] for s in runs.remote["shards"]}
    new = {s["key"]: s["attempt"] for s in again["shards"]}
    assert [k for k in keys if old[k] != new[k]] == [keys[1]]
    assert store.read_json("manifest.json") == as_json(again)


def cli_args(data: str, out: str, opts: dict, **flags) -> list[str]:
    argv = ["index", "--model", "tiny_models:tiny", "--layers", ",".join(LAYERS), "--data", data]
    argv += ["--out", out, "--shard-size", "16", "--storage-options", json.dumps(opts)]
    return argv + [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def run_cli(argv: list[str]) -> tuple[int | None, str]:
    """Exit status and any exception text that would reach the user's terminal."""
    try:
        return main(argv), ""
    except Exception as e:  # not a NinebestError: the user would see this traceback
        return None, "".join(traceback.format_exception(e))


def test_credentials_are_never_written_or_printed(cluster, runs, s3, s3_data, capfd):
    """The secret travels to the workers inside the config, yet reaches no object and no output."""
    out = f"s3://{BUCKET}/out"
    shard = runs.remote["shards"][2]["key"]
    Store(out, s3.options).remove(f"partials/{shard}/_COMMIT.json")  # so workers run and log
    status, shown = run_cli(cli_args(s3_data, out, s3.options, max_bad_fraction=0))
    assert status == 2 and not shown
    assert f"{out}/errors.parquet" in capfd.readouterr().err  # a user error, after the map
    status, shown = run_cli(cli_args(s3_data, out, s3.options, max_bad_fraction=0.1))
    assert status == 0 and not shown  # every shard resumed
    assert f"index: {out}/index" in capfd.readouterr().out
    errors = [
        run_cli(cli_args(f"s3://{BUCKET}/missing", out, s3.options)),  # data not found
        run_cli(cli_args(s3_data, out, s3.options, k=3)),  # out holds another run
        run_cli(cli_args(s3_data, "s3://no-such-bucket/out", s3.options)),  # no bucket
    ]
    assert [status for status, _ in errors[:2]] == [2, 2]
    captured = capfd.readouterr()
    printed = captured.out + captured.err + "".join(text for _, text in errors)
    assert "does not exist" in printed and "already holds a different run" in printed
    logs = ray_logs(cluster)
    for secret in (SECRET, KEY):
        assert secret not in printed
        leaks = [key for key, body in objects(s3).items() if secret.encode() in body]
        leaks += [str(path) for path in logs if secret.encode() in path.read_bytes()]
        assert leaks == [], f"credentials written to {leaks}"


def ray_logs(ray) -> list[Path]:
    """The local Ray session's log files (workers' stdout and stderr among them)."""
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    files = [p for p in (session / "logs").rglob("*") if p.is_file()]
    assert any(p.name.startswith("worker-") for p in files), files
    return files


def test_failed_upload_leaves_no_object_and_keeps_the_previous_version(s3):
    # 5 MiB blocks: a 6 MiB write goes through a multipart upload, smaller ones through one PUT
    store = Store(f"s3://{BUCKET}/atomic", {**s3.options, "default_block_size": 5 * MiB})
    store.write_bytes("small.bin", b"old")
    store.write_bytes("big.bin", b"a" * 6 * MiB)
    for rel, data in [("small.bin", b"new"), ("new.bin", b"new"), ("big.bin", b"b" * 6 * MiB)]:
        with pytest.raises(RuntimeError, match="torn"), store.open_atomic(rel) as f:
            f.write(data)
            if len(data) > 5 * MiB:  # a part is already uploaded: the upload must be aborted
                uploads = s3.client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
                assert [u["Key"] for u in uploads] == [f"atomic/{rel}"]
            raise RuntimeError("torn")
    gc.collect()  # a discarded file object must not publish itself when collected
    found = objects(s3, "atomic/")
    assert found == {"atomic/small.bin": b"old", "atomic/big.bin": b"a" * 6 * MiB}
    assert not store.exists("new.bin")
    assert s3.client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []


def test_reindex_on_s3_moves_latest_and_equals_a_fresh_index(cluster, s3, s3_data):
    """Versions, LATEST and an incremental reindex on object storage, read back with pandas."""
    quiet = Progress(quiet=True)
    fs = fsspec.filesystem("s3", **s3.options)
    fs.cp(f"{BUCKET}/data", f"{BUCKET}/nightly-data", recursive=True)
    data, out = f"s3://{BUCKET}/nightly-data", f"s3://{BUCKET}/nightly"
    one = {"batch_size": 1}  # bit-identical activations however shards are cut

    def cfg(where: str) -> IndexConfig:
        return dataclasses.replace(config(data, where, s3.options), **one)

    first = reindex(cfg(out), progress=quiet)
    fs.rm(f"{BUCKET}/nightly-data/animals", recursive=True)
    fs.cp(f"{BUCKET}/data/people", f"{BUCKET}/nightly-data/more-people", recursive=True)
    second = reindex(cfg(out), progress=quiet)
    assert second["mode"] == "incremental" and second["previous"] == first["run_id"]
    assert (second["images_new"], second["images_removed"]) == (3, 6)
    latest = fs.cat_file(f"{BUCKET}/nightly/LATEST").decode().strip()
    assert latest == second["run_id"]
    got = read_index(f"{out}/versions/{latest}/index", s3.options)
    index(cfg(f"s3://{BUCKET}/nightly-fresh"), quiet)
    pd.testing.assert_frame_equal(got, read_index(f"s3://{BUCKET}/nightly-fresh/index", s3.options))
    assert s3.trap.strays() == []
