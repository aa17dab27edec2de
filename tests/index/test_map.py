"""The map worker without Ray: precision, decode, what a committed shard records, two shards in
flight."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracle
from pipeline.config import IndexConfig
from pipeline.dataset.listing import list_images
from pipeline.dataset.refs import plan_shards
from pipeline.index.map import ShardIndexer
from pipeline.net.device import resolve_decode, resolve_precision
from pipeline.net.models import load_model
from pipeline.store.partials import read_table
from pipeline.store.storage import Store

LAYERS = ("features.3", "classifier.4")


def test_auto_precision_is_float32_on_cpu_and_explicit_values_stay():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "float32"
    assert resolve_precision("bfloat16", cpu) == "bfloat16"
    assert resolve_precision("float32", torch.device("cuda")) == "float32"


def test_auto_decode_is_the_device_on_cuda_and_pil_elsewhere():
    assert resolve_decode("auto", torch.device("cpu")) == "pil"
    assert resolve_decode("auto", torch.device("cuda")) == "device"
    assert resolve_decode("pil", torch.device("cuda")) == "pil"
    assert resolve_decode("device", torch.device("cpu")) == "device"


def test_device_decode_shard_matches_pillow_sizes_and_hashes(photos, alexnet_weights, tmp_path):
    """A shard decoded on the device records the same images (ids, hashes, sizes) as Pillow's,
    says how it was decoded, and its activations stay close to Pillow's."""
    tables = {}
    for decode in ("pil", "device"):
        cfg = IndexConfig(
            model="torchvision:alexnet", weights=str(alexnet_weights), data=str(photos / "animals"),
            layers=LAYERS, out=str(tmp_path / decode), k=3, batch_size=4, decode=decode,
        )  # fmt: skip
        shard = plan_shards(list_images(cfg.data), 256)[0]
        worker = ShardIndexer(cfg, "run", load_model(cfg.model, cfg.weights).fingerprint, 2)
        record = worker.index_shard(shard, {"features.3": 192, "classifier.4": 4096})
        assert record["decode"] == decode
        store = Store(str(tmp_path / decode))
        tables[decode] = [read_table(store, record, t).to_pandas() for t in ("images", "topk")]
    (pil_images, pil_top), (dev_images, dev_top) = tables["pil"], tables["device"]
    columns = ["image_id", "image_hash", "height", "width", "error"]
    assert pil_images[columns].equals(dev_images[columns])
    pil_values = pil_top.groupby(["layer", "unit"]).activation.max()
    dev_values = dev_top.groupby(["layer", "unit"]).activation.max()
    assert ((pil_values - dev_values).abs() <= 2e-2 * pil_values.abs() + 1e-3).all()
    assert not pil_values.equals(dev_values)  # the device path really decoded: pixels moved


def test_bfloat16_index_runs_under_autocast_and_says_so(photos, alexnet_weights, tmp_path):
    """The worker's bfloat16 activations are what torch autocast computes for the same batches
    (up to preprocessing rounding), and differ from float32 within bfloat16's precision."""
    cfg = IndexConfig(
        model="torchvision:alexnet", weights=str(alexnet_weights), data=str(photos / "animals"),
        layers=LAYERS, out=str(tmp_path), k=3, batch_size=4, precision="bfloat16",
    )  # fmt: skip
    shard = plan_shards(list_images(cfg.data), 256)[0]
    loaded = load_model(cfg.model, cfg.weights)
    worker = ShardIndexer(cfg, "run", loaded.fingerprint, threads=2)
    record = worker.index_shard(shard, {"features.3": 192, "classifier.4": 4096})
    assert record["precision"] == "bfloat16"
    table = read_table(Store(str(tmp_path)), record, "topk").to_pandas()

    model = torchvision.models.alexnet()
    model.load_state_dict(torch.load(alexnet_weights, weights_only=True))
    model.eval()
    images = torch.stack([oracle.load(photos / "animals" / r.image_id) for r in shard.refs])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = oracle.activations(model, LAYERS, images, batch=4)  # the worker's batches
    full = oracle.activations(model, LAYERS, images)
    ids = [r.image_id for r in shard.refs]
    moved = 0
    for row in table.itertuples():
        i = ids.index(row.image_id)
        autocast, exact = (float(out[row.layer][i, row.unit].max()) for out in (low, full))
        assert abs(row.activation - autocast) <= 2e-2 * abs(autocast) + 1e-3
        assert abs(row.activation - exact) <= 5e-2 * abs(exact) + 1e-2
        moved += abs(row.activation - exact) > 1e-4 * abs(exact)
    assert moved > len(table) // 4  # bfloat16 really ran: most values moved off float32


TINY = {"conv2": 6, "fc": 5}


@pytest.fixture(scope="module")
def tiny_worker(photos, tmp_path_factory):
    """A tiny-model worker and its shards; `solo` holds each shard's partial computed alone."""
    out = tmp_path_factory.mktemp("inflight")
    cfg = IndexConfig(
        model="tiny_models:tiny", data=str(photos), layers=tuple(TINY), out=str(out),
        batch_size=2, decode_threads=2,
    )  # fmt: skip
    shards = plan_shards(list_images(cfg.data), 6)
    worker = ShardIndexer(cfg, "run", load_model(cfg.model).fingerprint, threads=1)
    solo = {s.key: partial(worker, worker.index_shard(s, TINY)) for s in shards}
    return worker, shards, solo


def partial(worker: ShardIndexer, record: dict) -> pd.DataFrame:
    return read_table(worker.store, record, "topk").to_pandas()


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_two_shards_in_flight_compute_what_each_computes_alone(tiny_worker, data):
    """Shards run two at a time on one worker (as a Ray actor with max_concurrency 2 runs them),
    in any order and any pairing, give the partials each gives alone, and report their time
    on the device."""
    worker, shards, solo = tiny_worker
    order = data.draw(st.permutations(shards))
    with ThreadPoolExecutor(max_workers=2) as threads:
        records = list(threads.map(lambda s: worker.index_shard(s, TINY), order))
    for shard, record in zip(order, records, strict=True):
        pd.testing.assert_frame_equal(partial(worker, record), solo[shard.key])
        assert 0 < record["device_seconds"] <= record["seconds"]


def test_perceptual_shard_keeps_the_phash_of_each_content_and_the_statistics(photos, tmp_path):
    """--distinct perceptual: the partial's phash table holds imagehash's pHash of every content
    in its top-k; the stats and samples tables are written beside it."""
    from PIL import Image, ImageOps

    from pipeline.index.distinct import phash

    cfg = IndexConfig(
        model="tiny_models:tiny", data=str(photos), layers=("conv2", "fc"), out=str(tmp_path),
        k=3, batch_size=5, distinct="perceptual", near=4, bottom=2,
    )  # fmt: skip
    shard = plan_shards(list_images(cfg.data), 256)[0]
    worker = ShardIndexer(cfg, "run", load_model(cfg.model).fingerprint, threads=1)
    record = worker.index_shard(shard, {"conv2": 6, "fc": 5})
    assert record["tables"] == ["bottom", "phash", "samples", "stats"]
    store = Store(str(tmp_path))
    topk = read_table(store, record, "topk")
    phashes = read_table(store, record, "phash").to_pydict()
    assert set(phashes["image_hash"]) == set(topk["image_hash"].to_pylist())
    by_hash = dict(zip(phashes["image_hash"], phashes["phash"], strict=True))
    for row in topk.to_pylist()[:5]:
        with Image.open(photos / row["image_id"]) as image:
            assert by_hash[row["image_hash"]] == phash(
                ImageOps.exif_transpose(image).convert("RGB")
            )
    assert len(set(topk["image_hash"].to_pylist())) < len(shard.refs)
    stats = read_table(store, record, "stats")
    assert stats["count"].to_pylist() == [record["indexed"]] * 11
    bottom = read_table(store, record, "bottom").to_pylist()
    assert all(row["rank"] <= 2 for row in bottom)
    first = [r for r in bottom if (r["layer"], r["unit"]) == ("fc", 0)]
    assert first[0]["activation"] <= first[1]["activation"]  # rank 1 the lowest
