"""Samples across the range: the same under two shard sizes, equal to a brute-force reading of
their definition, and each sample's rank inside its band (up to the sampling error)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import IndexConfig
from pipeline.index.reduce_extra import samples_index
from pipeline.index.samples import BANDS, PRIORITY_BITS, SAMPLE, RunningSamples, priority, threshold
from pipeline.index.topk import RunningTopK
from pipeline.net.hooks import LayerMax
from pipeline.store import partials
from pipeline.store.storage import Store
from tests.index.test_reduce_extra import images_table


def dataset(n: int, units: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((n, units)).astype(np.float32)
    values[:, 0] = np.maximum(values[:, 0], 0)  # a ReLU unit: ties at zero
    ids = sorted(f"img/{i:06d}" for i in range(n))
    hashes = [f"h{i // 2 if i % 7 == 0 else i}" for i in range(n)]  # some exact duplicates
    return values, ids, hashes


def commit(store: Store, values, ids, hashes, size: int, batch: int = 64) -> list[dict]:
    """Shards of `size` images, each keeping its rows of S as the worker does."""
    records = []
    n, units = values.shape
    limit = threshold(n)
    for start in range(0, n, size):
        stop = min(start + size, n)
        samples = RunningSamples(limit)
        prios = {}
        for lo in range(start, stop, batch):
            hi = min(lo + batch, stop)
            ranks = [priority(i) for i in ids[lo:hi]]
            prios.update(zip(ids[lo:hi], ranks, strict=True))
            v = torch.from_numpy(values[lo:hi])
            zeros = torch.zeros_like(v, dtype=torch.int64)
            samples.add(ranks, list(range(lo - start, hi - start)), LayerMax(v, zeros, zeros))
        shard_ids, shard_hashes = ids[start:stop], hashes[start:stop]
        extra = {"samples": samples.table("L", shard_ids, shard_hashes, prios)}
        topk = RunningTopK(units, 1).table("L", [], [])
        report = {"images": stop - start, "sample_threshold": limit}
        records.append(
            partials.write(
                store,
                f"s{start:06d}",
                partials.new_attempt(),
                "run",
                topk,
                images_table(shard_ids, shard_hashes),
                report,
                extra,
            )  # fmt: skip
        )
    return records


def oracle(values, ids, hashes, per_band: int) -> list[tuple]:
    """The definition read literally: S by threshold, mid-ranks, lowest priority per band."""
    n, units = values.shape
    limit = threshold(n)
    prio = [priority(i) for i in ids]
    rows = []
    for u in range(units):
        s = sorted((i for i in range(n) if prio[i] < limit), key=lambda i: (values[i, u], ids[i]))
        for name, lo, hi in BANDS:
            inside = [i for r, i in enumerate(s) if lo <= (r + 0.5) / len(s) <= hi]
            seen, kept = set(), []
            for i in sorted(inside, key=lambda i: (prio[i], ids[i])):
                if hashes[i] not in seen and len(kept) < per_band:
                    seen.add(hashes[i])
                    kept.append(i)
            rows += [(u, name, ids[i], float(values[i, u])) for i in kept]
    return rows


def test_samples_are_the_same_under_two_shard_sizes_and_equal_the_definition(tmp_path):
    n = 20_000  # more than SAMPLE: S is an eighth of the images
    values, ids, hashes = dataset(n, 2)
    assert threshold(n) == 1 << (PRIORITY_BITS - 3) and SAMPLE < n / 8
    cfg = IndexConfig(model="m", data=str(tmp_path), layers=("L",), out=str(tmp_path), samples=4)
    tables = []
    for size in (3000, 7000):
        store = Store(str(tmp_path / f"out-{size}"))
        tables.append(samples_index(store, commit(store, values, ids, hashes, size), cfg))
    assert tables[0].equals(tables[1])
    got = [(r["unit"], r["band"], r["image_id"], r["activation"]) for r in tables[0].to_pylist()]
    assert got == oracle(values, ids, hashes, 4)
    assert len(got) == 2 * len(BANDS) * 4  # every band full
    for unit, band, _, activation in got:
        _, lo, hi = next(b for b in BANDS if b[0] == band)
        column = values[:, unit]
        low, high = np.mean(column < activation), np.mean(column <= activation)
        assert low <= hi + 0.03 and high >= lo - 0.03, (unit, band, low, high)  # sampling error


def test_small_datasets_sample_every_image_and_ranks_are_exact(tmp_path):
    values, ids, hashes = dataset(300, 1, seed=3)
    values[:, 0] = np.arange(300, dtype=np.float32)  # distinct values: exact ranks
    hashes = ids  # no duplicates
    cfg = IndexConfig(model="m", data=str(tmp_path), layers=("L",), out=str(tmp_path), samples=2)
    store = Store(str(tmp_path / "out"))
    table = samples_index(store, commit(store, values, ids, hashes, 64), cfg)
    for row in table.to_pylist():
        _, lo, hi = next(b for b in BANDS if b[0] == row["band"])
        assert lo <= (row["activation"] + 0.5) / 300 <= hi
    counts = pa.TableGroupBy(table, "band").aggregate([("unit", "count")]).to_pydict()
    assert dict(zip(counts["band"], counts["unit_count"], strict=True)) == {
        "p50": 2, "p90": 2, "p99": 2, "p99.9": 1  # the top 0.2% of 300 images is one image
    }  # fmt: skip
