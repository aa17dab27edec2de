"""Per-unit statistics: against numpy over the whole dataset, under any sharding and merge order;
quantiles within the sketch's stated rank error; histograms exact."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.index.stats import (
    BINS,
    EDGES,
    PROBABILITIES,
    RANK_ERROR,
    RunningStats,
    StatsMerge,
    bins_of,
)
from pipeline.store.schemas import conform


def shard_state(values: np.ndarray, lo: int, hi: int, batch: int, layer: str = "L") -> pa.Table:
    stats = RunningStats(values.shape[1])
    for start in range(lo, hi, batch):
        stats.add(torch.from_numpy(values[start : min(start + batch, hi)]))
    return conform(stats.table(layer), "stats_state")


def merged(parts: list[pa.Table], seed: int, layer: str = "L") -> dict:
    random.Random(seed).shuffle(parts)
    merge = StatsMerge()
    for part in parts:
        merge.add(part)
    return conform(merge.table(layer), "stats").to_pydict()


def signed_values(seed: int, n: int, units: int) -> np.ndarray:
    """ReLU-like units (many exact zeros) and signed ones, over several magnitudes."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-2, 3, size=units)
    values = rng.standard_normal((n, units)) * scale + rng.uniform(-1, 1, units) * scale
    relu = rng.random(units) < 0.5
    values[:, relu] = np.maximum(values[:, relu], 0)
    return values.astype(np.float32)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 400),
    units=st.integers(1, 4),
    data=st.data(),
)
def test_statistics_equal_numpy_under_any_sharding(seed, n, units, data):
    values = signed_values(seed, n, units)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, n - 1)), max_size=5)))
    bounds = [0, *[c for c in cuts if c < n], n]
    batch = data.draw(st.integers(1, 64))
    parts = [shard_state(values, lo, hi, batch) for lo, hi in zip(bounds, bounds[1:], strict=False)]
    got = merged(parts, seed)
    v = values.astype(np.float64)
    assert got["unit"] == list(range(units))
    assert got["count"] == [n] * units
    np.testing.assert_allclose(got["mean"], v.mean(axis=0), rtol=1e-9, atol=1e-9 * np.abs(v).max())
    np.testing.assert_allclose(got["std"], v.std(axis=0), rtol=1e-7, atol=1e-7 * np.abs(v).max())
    assert got["min"] == values.min(axis=0).tolist()
    assert got["max"] == values.max(axis=0).tolist()
    assert got["fire_rate"] == ((values > 0).sum(axis=0) / n).tolist()
    for u in range(units):
        want = np.bincount(bins_of(values[:, u]), minlength=BINS)
        assert got["histogram"][u] == want.tolist()
        assert sum(got["histogram"][u]) == n


def test_quantiles_lie_within_the_stated_rank_error():
    """Enough values for the sketches to compact (k = 200), over 16 shards merged in any order."""
    values = signed_values(7, 20_000, 3)
    parts = [shard_state(values, lo, lo + 1250, 50) for lo in range(0, 20_000, 1250)]
    got = merged(parts, 3)
    for u in range(3):
        column = np.sort(values[:, u])
        for p, q in zip(PROBABILITIES, got["quantiles"][u], strict=True):
            lo = np.searchsorted(column, q, side="left") / len(column)  # ranks q may stand for
            hi = np.searchsorted(column, q, side="right") / len(column)
            assert lo - RANK_ERROR <= p <= hi + RANK_ERROR, (u, p, q, lo, hi)


def test_small_streams_give_exact_quantiles():
    values = np.arange(100, dtype=np.float32)[:, None]  # (100, 1)
    got = merged([shard_state(values, 0, 50, 7), shard_state(values, 50, 100, 9)], 0)
    assert got["quantiles"][0][PROBABILITIES.index(0.5)] in (49.0, 50.0)


def test_edges_are_fixed_sorted_and_bin_zero_with_tiny_positives():
    assert (np.diff(EDGES) > 0).all() and EDGES[0] == -1e4 and EDGES[-1] == 1e4
    assert bins_of(np.array([0.0], np.float32)) == bins_of(np.array([5e-4], np.float32))
    assert bins_of(np.array([-5e-4], np.float32)) != bins_of(np.array([0.0], np.float32))
    got = RunningStats(1)
    sample = np.array([[-1e9], [-2.0], [0.0], [0.5], [1e9]], dtype=np.float32)
    got.add(torch.from_numpy(sample))
    counts = np.asarray(got.table("L")["histogram"][0].as_py())
    assert counts.tolist() == np.bincount(bins_of(sample[:, 0]), minlength=BINS).tolist()


def test_layers_are_kept_apart_and_a_shard_without_images_changes_nothing():
    values = signed_values(1, 30, 2)
    a = shard_state(values, 0, 30, 8, layer="a")
    b = shard_state(values * 2, 0, 30, 8, layer="b")
    empty = conform(RunningStats(2).table("a"), "stats_state")
    merge = StatsMerge()
    for part in (b, empty, a):
        merge.add(part)
    assert merge.table("a")["max"].to_pylist() == values.max(axis=0).tolist()
    assert merge.table("b")["max"].to_pylist() == (values * 2).max(axis=0).tolist()
    assert merge.table("a")["count"].to_pylist() == [30, 30]
