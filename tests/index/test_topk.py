"""RunningTopK and merge: against a brute-force sort, and invariant under sharding and grouping."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.index.topk import RunningTopK, _total_order, merge, order_bits
from pipeline.store.schemas import conform


def brute_force(values: np.ndarray, ids: list[str], k: int) -> list[list[str]]:
    """Per unit, ids sorted by (value descending, id ascending), first k."""
    out = []
    for u in range(values.shape[1]):
        order = sorted(range(len(ids)), key=lambda i: (-values[i, u], ids[i]))
        out.append([ids[i] for i in order[:k]])
    return out


def shard_partial(values, ys, xs, ids, lo, hi, k, batch, layer="L") -> pa.Table:
    """Run RunningTopK over images [lo, hi) in batches of `batch`, as the worker does."""
    topk = RunningTopK(values.shape[1], k)
    for start in range(lo, hi, batch):
        stop = min(start + batch, hi)
        pos = torch.arange(start - lo, stop - lo)
        topk.add(
            torch.from_numpy(values[start:stop]),
            pos,
            torch.from_numpy(ys[start:stop]),
            torch.from_numpy(xs[start:stop]),
        )
    shard_ids = ids[lo:hi]
    return conform(topk.table(layer, shard_ids, [f"h-{i}" for i in shard_ids]), "partial")


def dataset(seed: int, n: int, units: int, levels: int):
    """Activations drawn from few levels so that ties are common; ids in sorted order."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, levels, size=(n, units)).astype(np.float32) / 2
    ys = rng.integers(0, 7, size=(n, units))
    xs = rng.integers(0, 7, size=(n, units))
    ids = sorted(f"img/{rng.integers(1e9):09d}-{i}" for i in range(n))
    return values, ys, xs, ids


def unit_ids(table: pa.Table, units: int) -> list[list[str]]:
    rows = table.to_pylist()
    return [[r["image_id"] for r in rows if r["unit"] == u] for u in range(units)]


def test_running_topk_matches_brute_force_with_ties():
    values, ys, xs, ids = dataset(0, n=40, units=6, levels=3)
    table = shard_partial(values, ys, xs, ids, 0, 40, k=9, batch=7)
    assert unit_ids(table, 6) == brute_force(values, ids, 9)
    row = table.to_pylist()[0]
    i = ids.index(row["image_id"])
    assert (row["y"], row["x"]) == (ys[i, 0], xs[i, 0])
    assert row["rank"] == 1 and row["activation"] == values[i, 0]


def test_fewer_images_than_k_and_negative_infinity():
    values = np.array([[float("-inf")], [1.0]], dtype=np.float32)
    zeros = np.zeros((2, 1), dtype=np.int64)
    table = shard_partial(values, zeros, zeros, ["a", "b"], 0, 2, k=9, batch=1)
    assert [r["image_id"] for r in table.to_pylist()] == ["b", "a"]  # real -inf beats empty slots


def test_merge_is_idempotent_and_drops_duplicate_images():
    values, ys, xs, ids = dataset(1, n=20, units=3, levels=5)
    part = shard_partial(values, ys, xs, ids, 0, 20, k=4, batch=5)
    assert merge([part, part], 4).equals(merge([part], 4))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 60),
    units=st.integers(1, 5),
    k=st.integers(1, 12),
    levels=st.integers(1, 6),
    data=st.data(),
)
def test_any_sharding_and_grouping_gives_the_same_index(seed, n, units, k, levels, data):
    values, ys, xs, ids = dataset(seed, n, units, levels)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, n - 1)), max_size=6)))
    bounds = [0, *[c for c in cuts if c < n], n]
    batch = data.draw(st.integers(1, 16))
    parts = [
        shard_partial(values, ys, xs, ids, lo, hi, k, batch)
        for lo, hi in zip(bounds, bounds[1:], strict=False)
    ]
    whole = merge([shard_partial(values, ys, xs, ids, 0, n, k, n)], k)
    # merge in a random order and a random tree of groups
    rng = random.Random(seed)
    rng.shuffle(parts)
    while len(parts) > 1:
        size = rng.randint(2, len(parts))
        parts = [merge(parts[:size], k), *parts[size:]]
        rng.shuffle(parts)
    assert merge(parts, k).equals(whole)
    assert unit_ids(whole, units) == brute_force(values, ids, k)
    assert whole["rank"].to_pylist() == [
        r for u in brute_force(values, ids, k) for r in range(1, len(u) + 1)
    ]


def test_merge_keeps_layers_apart():
    values, ys, xs, ids = dataset(2, n=10, units=2, levels=4)
    a = shard_partial(values, ys, xs, ids, 0, 10, k=3, batch=4, layer="a")
    b = shard_partial(values, ys, xs, ids, 0, 10, k=3, batch=4, layer="b")
    merged = merge([b, a], 3)
    assert merged["layer"].to_pylist() == ["a"] * 6 + ["b"] * 6


def test_order_bits_follow_the_merge_order():
    nan, inf = float("nan"), float("inf")
    values = np.array([nan, inf, 1.5, 0.0, -0.0, -2.0, -inf], dtype=np.float32)
    assert (np.diff(order_bits(values).astype(np.int64)) < 0).all()  # strictly descending


def test_total_order_packs_keys_or_falls_back_to_lexsort():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 50, 1000)
    for top in (2**20, 2**60):  # packs into one int64, then too wide to pack
        key = rng.integers(0, 40, 1000) * (top // 40)
        assert (_total_order(key, image) == np.lexsort((image, key))).all()


def test_merge_with_huge_unit_numbers_sorts_the_same():
    values, ys, xs, ids = dataset(4, n=30, units=3, levels=3)
    parts = [shard_partial(values, ys, xs, ids, lo, lo + 10, k=4, batch=3) for lo in (0, 10, 20)]
    shift = 2**30  # the packed sort key would need more than 63 bits
    moved = [p.set_column(1, "unit", pc.add(p["unit"], shift)) for p in parts]
    expected = merge(parts, 4)
    assert merge(moved, 4).equals(expected.set_column(1, "unit", pc.add(expected["unit"], shift)))
