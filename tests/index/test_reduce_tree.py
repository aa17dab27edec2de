"""index.reduce_tree: the tree of merges equals the single-process merge bit for bit, under any
grouping and completion order (hypothesis, in process), and on a real Ray instance as tasks
(the written OUT/index/<layer>.parquet files are byte-identical); bottom, samples and stats go
through the same tree; an index run starts its reduce only once the map's actors are gone."""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.cluster import tasks
from pipeline.config import IndexConfig
from pipeline.index import reduce_extra, reduce_tree
from pipeline.index.reduce import merge_partials, write_index
from pipeline.index.reduce_tree import (
    MAX_GROUPS,
    MIN_GROUP,
    TASKS_PER_CPU,
    TREE_PARTIALS,
    TreeReport,
    fold_topk,
    group_size,
)
from pipeline.index.run import index
from pipeline.index.stats import StatsMerge
from pipeline.progress import Progress
from pipeline.store import partials
from pipeline.store.schemas import conform, schema
from pipeline.store.storage import Store
from random_partials import LAYERS, random_partials

pytestmark = pytest.mark.usefixtures("ray_local")


def oracle(parts: list[pa.Table], k: int, by: str) -> pd.DataFrame:
    """Plain pandas: rows within each partial's top k, best first, one per `by`, k per unit."""
    df = pa.concat_tables(parts).to_pandas()
    df = df[df["rank"] <= k].sort_values(
        ["layer", "unit", "activation", "image_id"], ascending=[True, True, False, True]
    )
    df = df.drop_duplicates(["layer", "unit", by]).groupby(["layer", "unit"]).head(k)
    df["rank"] = (df.groupby(["layer", "unit"]).cumcount() + 1).astype("int16")
    return df.reset_index(drop=True)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    shards=st.integers(1, 12),
    k=st.integers(1, 5),
    extra=st.integers(0, 3),
    levels=st.integers(1, 4),
    contents=st.integers(2, 12),
    by=st.sampled_from(["image_id", "image_hash"]),
    data=st.data(),
)
def test_any_grouping_and_completion_order_equals_the_single_merge(
    seed, shards, k, extra, levels, contents, by, data
):
    parts = random_partials(seed, shards, k + extra, levels, contents)
    single = fold_topk(parts, k, by)  # the single-process reduce
    pd.testing.assert_frame_equal(single.to_pandas(), oracle(parts, k, by))
    size = data.draw(st.integers(1, shards))
    groups = [fold_topk(parts[i : i + size], k, by) for i in range(0, shards, size)]
    for group in groups:  # a task returns at most k rows per (layer, unit)
        counts = group.group_by(["layer", "unit"]).aggregate([("rank", "count")])
        assert counts.num_rows == 0 or pc.max(counts["rank_count"]).as_py() <= k
    order = data.draw(st.permutations(range(len(groups))))
    assert fold_topk([groups[i] for i in order], k, by).equals(single)


@pytest.mark.parametrize(
    "partials, cpus, size",
    [
        (10_000, 1, 10_000),  # one CPU: one group, in process
        (TREE_PARTIALS - 1, 8, TREE_PARTIALS - 1),  # few partials: in process
        (10_000, 4, 625),  # 16 groups: TASKS_PER_CPU per CPU
        (10_000, 64, 40),  # 250 groups
        (10_000, 2048, 33),  # groups of MIN_GROUP at least: 312 groups
        (600, 2048, 34),  # 18 groups
        (10**6, 2048, 977),  # MAX_GROUPS groups at most
        (0, 4, 1),
    ],
)
def test_group_size_follows_the_documented_rule(partials, cpus, size):
    assert group_size(partials, cpus) == size
    groups = -(-partials // size)
    assert groups <= max(1, min(TASKS_PER_CPU * cpus, MAX_GROUPS))
    assert groups <= 1 or size >= MIN_GROUP


# On the real Ray instance: partials in a Store, the tree as tasks.


def images_table(n: int = 0) -> pa.Table:
    return conform(pa.table({name: pa.nulls(n) for name in schema("images").names}), "images")


def stats_table(rng: np.random.Generator) -> pa.Table:
    import torch

    from pipeline.index.stats import RunningStats

    tables = []
    for layer, units in LAYERS.items():
        running = RunningStats(units)
        running.add(torch.from_numpy(rng.gamma(2.0, size=(int(rng.integers(1, 9)), units))))
        tables.append(running.table(layer))
    return pa.concat_tables(tables)


def samples_table(part: pa.Table) -> pa.Table:
    rows = part.select(["layer", "unit", "activation", "image_id", "image_hash", "y", "x"])
    priority = [zlib.crc32(i.encode()) << 20 for i in rows["image_id"].to_pylist()]
    return conform(rows.append_column("priority", pa.array(priority, pa.int64())), "samples_state")


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    """40 committed partials with topk, bottom, stats and samples tables."""
    store = Store(str(tmp_path_factory.mktemp("tree") / "out"))
    rng = np.random.default_rng(5)
    parts = random_partials(11, shards=40, depth=6, levels=3, contents=9)
    bottoms = random_partials(12, shards=40, depth=4, levels=5, contents=9)
    records = []
    for s, (part, bottom) in enumerate(zip(parts, bottoms, strict=True)):
        extra = {"bottom": bottom, "stats": stats_table(rng), "samples": samples_table(part)}
        record = partials.write(
            store, f"s{s:02d}", partials.new_attempt(), "run", part, images_table(), {}, extra
        )
        records.append({**record, "sample_threshold": 1 << 51})
    return store, records


def config(store: Store, **kw) -> IndexConfig:
    return IndexConfig(data="/unused", out=store.path(""), model="m", layers=tuple(LAYERS), **kw)


def tree_everywhere(monkeypatch, min_group: int) -> None:
    """Let the tree run as tasks over the few partials of a test."""
    monkeypatch.setattr(reduce_tree, "TREE_PARTIALS", 2)
    monkeypatch.setattr(reduce_tree, "MIN_GROUP", min_group)


@pytest.mark.parametrize("distinct", ["id", "content"])
def test_the_index_from_ray_tasks_is_byte_identical(committed, tmp_path, monkeypatch, distinct):
    store, records = committed
    cfg = config(store, k=4, distinct=distinct)
    by = "image_id" if distinct == "id" else "image_hash"
    single = merge_partials(store, records, cfg.k, by)  # the single-process reduce
    tree_everywhere(monkeypatch, 3)
    tree = TreeReport()
    got, short = reduce_extra.merge_index(store, records, cfg, tree)
    assert short is None and tree.on_cluster and tree.cpus == 2
    assert (tree.groups, tree.group_size) == (8, 5)  # 4 tasks per CPU
    a, b = Store(str(tmp_path / "single")), Store(str(tmp_path / "tree"))
    files = write_index(a, single, tuple(LAYERS))
    assert write_index(b, got, tuple(LAYERS)) == files
    for rel in files:
        assert a.read_bytes(rel) == b.read_bytes(rel), rel
    assert got.equals(single) and got.num_rows > 0


def test_bottom_samples_and_stats_through_the_tree(committed, monkeypatch):
    store, records = committed
    cfg = config(store, k=4, bottom=3, samples=2)
    in_process = (
        reduce_extra.bottom_index(store, records, cfg),
        reduce_extra.samples_index(store, records, cfg),
        reduce_extra.merge_stats(store, records),
    )
    assert tasks.cpus() == 2 and group_size(len(records), 2) == len(records)  # in process
    tree_everywhere(monkeypatch, 3)
    bottom = reduce_extra.bottom_index(store, records, cfg)
    assert bottom.equals(in_process[0]) and bottom.num_rows > 0
    samples = reduce_extra.samples_index(store, records, cfg)
    assert samples.equals(in_process[1]) and samples.num_rows > 0
    stats, serial = reduce_extra.merge_stats(store, records), in_process[2]
    for layer in LAYERS:
        got, want = stats.table(layer).to_pandas(), serial.table(layer).to_pandas()
        for exact in ["unit", "count", "min", "max", "fire_rate"]:
            assert got[exact].tolist() == want[exact].tolist(), exact
        assert got["histogram"].map(list).tolist() == want["histogram"].map(list).tolist()
        np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-12)
        np.testing.assert_allclose(got["std"], want["std"], rtol=1e-9)


def test_stats_state_merges_back_to_the_same_statistics():
    rng = np.random.default_rng(1)
    shards = [stats_table(rng) for _ in range(6)]
    serial, halves = StatsMerge(), StatsMerge()
    for table in shards:
        serial.add(table)
    for part in (shards[:4], shards[4:]):
        merged = StatsMerge()
        for table in part:
            merged.add(table)
        halves.add(merged.state())
    for layer in LAYERS:
        got, want = halves.table(layer).to_pandas(), serial.table(layer).to_pandas()
        assert got["count"].tolist() == want["count"].tolist()
        np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-12)
    assert StatsMerge().state().num_rows == 0


def test_an_index_run_reduces_on_tasks_once_the_map_actors_are_gone(photos, tmp_path, monkeypatch):
    """The map's actors hold both CPUs; at the reduce's start the cluster holds nothing."""
    seen: list[dict] = []
    merge_topk = reduce_tree.merge_topk

    def watched(*args, **kwargs):
        seen.append(tasks.held())
        return merge_topk(*args, **kwargs)

    monkeypatch.setattr(reduce_tree, "merge_topk", watched)
    tree_everywhere(monkeypatch, 1)
    cfg = IndexConfig(
        data=str(photos), out=str(tmp_path / "out"), model="tiny_models:tiny",
        layers=("conv2", "fc"), batch_size=8, shard_size=24, decode_threads=1, workers=2,
        stats=False,
    )  # fmt: skip
    # the module's earlier tests ran tasks on this instance: start from a cluster holding nothing
    # (the run compares with what is held when it starts, as other jobs may hold resources)
    assert tasks.wait_released({"CPU": 0.0, "GPU": 0.0}, timeout=60) is not None
    manifest = index(cfg, Progress(quiet=True))
    assert seen and seen[0] == {"CPU": 0.0, "GPU": 0.0}
    reduce = manifest["reduce"]
    assert reduce["on_cluster"] and reduce["groups"] > 1 and reduce["released_seconds"] is not None
    assert max(p["actors"] for p in manifest["pool"]) == 2  # both CPUs were held by the map
    store = Store(cfg.out)
    records = [partials.read_commit(store, s["key"], manifest["run"]) for s in manifest["shards"]]
    single = merge_partials(store, records, 9, "image_hash")  # the single-process reduce
    for layer in cfg.layers:
        rows = single.filter(pc.equal(single["layer"], layer))
        got = store.read_parquet(f"index/{layer}.parquet")
        assert got.equals(rows.sort_by([("unit", "ascending"), ("rank", "ascending")]))
