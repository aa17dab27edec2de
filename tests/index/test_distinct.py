"""--distinct content and perceptual: planted exact and near duplicates across shards, against a
brute-force oracle, under any sharding, batching and merge order."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.index.distinct import Firsts, hamming, select_perceptual
from pipeline.index.topk import RunningTopK, merge
from pipeline.store.schemas import conform


def planted(seed: int, n: int, units: int, levels: int, contents: int):
    """n images (ids sorted) over `contents` distinct contents: exact duplicates everywhere.

    Copies of one content share its activations (the usual case), except that some copies get
    values of their own (batch noise), so "the best row of each content" is really tested.
    """
    rng = np.random.default_rng(seed)
    ids = sorted(f"img/{rng.integers(1e9):09d}-{i}" for i in range(n))
    content = rng.integers(0, contents, size=n)  # (n,) which content each image holds
    base = rng.integers(0, levels, size=(contents, units)).astype(np.float32) / 2
    values = base[content]  # (n, U)
    noisy = rng.random(n) < 0.2
    values[noisy] = rng.integers(0, levels, size=(noisy.sum(), units)).astype(np.float32) / 2
    ys = rng.integers(0, 7, size=(n, units))
    xs = rng.integers(0, 7, size=(n, units))
    hashes = [f"sha-{c:04d}" for c in content]
    return values, ys, xs, ids, hashes


def partial(values, ys, xs, ids, hashes, lo, hi, depth, batch, distinct=True) -> pa.Table:
    """A shard [lo, hi) through RunningTopK as the worker runs it (Firsts idents per batch)."""
    topk = RunningTopK(values.shape[1], depth, distinct=distinct)
    firsts = Firsts()
    for start in range(lo, hi, batch):
        stop = min(start + batch, hi)
        where = list(range(start - lo, stop - lo))
        idents, repeats = firsts.idents(hashes[start:stop], where)
        topk.add(
            torch.from_numpy(values[start:stop]),
            torch.tensor(where),
            torch.from_numpy(ys[start:stop]),
            torch.from_numpy(xs[start:stop]),
            torch.tensor(idents) if distinct else None,
            repeats,
        )
    return conform(topk.table("L", ids[lo:hi], hashes[lo:hi]), "partial")


def contents_oracle(values, ids, hashes, units: int) -> list[list[tuple]]:
    """Per unit: each content's best row (value desc, id asc), all contents in that order."""
    out = []
    for u in range(units):
        rows = sorted(range(len(ids)), key=lambda i: (-values[i, u], ids[i]))
        seen, best = set(), []
        for i in rows:
            if hashes[i] not in seen:
                seen.add(hashes[i])
                best.append((ids[i], float(values[i, u]), hashes[i]))
        out.append(best)
    return out


def shardings(data, n: int) -> list[int]:
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, n - 1)), max_size=6)))
    return [0, *[c for c in cuts if c < n], n]


def merged_in_random_tree(parts: list[pa.Table], k: int, by: str, seed: int) -> pa.Table:
    rng = random.Random(seed)
    parts = list(parts)
    rng.shuffle(parts)
    while len(parts) > 1:
        size = rng.randint(2, len(parts))
        parts = [merge(parts[:size], k, by), *parts[size:]]
        rng.shuffle(parts)
    return merge(parts, k, by)


def per_unit(table: pa.Table, units: int) -> list[list[tuple]]:
    rows = table.to_pylist()
    return [
        [(r["image_id"], r["activation"], r["image_hash"]) for r in rows if r["unit"] == u]
        for u in range(units)
    ]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 60),
    units=st.integers(1, 4),
    k=st.integers(1, 8),
    buffer=st.integers(0, 4),
    levels=st.integers(1, 6),
    contents=st.integers(1, 25),
    data=st.data(),
)
def test_content_index_is_the_oracle_under_any_sharding(
    seed, n, units, k, buffer, levels, contents, data
):
    values, ys, xs, ids, hashes = planted(seed, n, units, levels, contents)
    bounds = shardings(data, n)
    batch = data.draw(st.integers(1, 16))
    depth = k + buffer
    parts = [
        partial(values, ys, xs, ids, hashes, lo, hi, depth, batch)
        for lo, hi in zip(bounds, bounds[1:], strict=False)
    ]
    got = merged_in_random_tree(parts, k, "image_hash", seed)
    want = [rows[:k] for rows in contents_oracle(values, ids, hashes, units)]
    assert per_unit(got, units) == want
    one_shard = merge([partial(values, ys, xs, ids, hashes, 0, n, depth, n)], k, "image_hash")
    assert got.equals(one_shard)
    # each row's position is its own image's
    for row in got.to_pylist():
        i = ids.index(row["image_id"])
        assert (row["y"], row["x"]) == (ys[i, row["unit"]], xs[i, row["unit"]])


def test_identical_files_are_represented_by_the_smallest_id():
    values = np.array([[2.0], [2.0], [1.0], [2.0]], dtype=np.float32)
    zeros = np.zeros((4, 1), dtype=np.int64)
    ids, hashes = ["a", "b", "c", "d"], ["x", "y", "z", "x"]
    parts = [
        partial(values, zeros, zeros, ids, hashes, lo, hi, 3, 1) for lo, hi in ((0, 2), (2, 4))
    ]
    table = merge(parts[::-1], 3, "image_hash")
    assert table["image_id"].to_pylist() == ["a", "b", "c"]  # d repeats a; a is the smaller id
    by_id = merge([partial(values, zeros, zeros, ids, hashes, 0, 4, 3, 2, distinct=False)], 3)
    assert by_id["image_id"].to_pylist() == ["a", "b", "d"]  # --distinct id: today's behaviour


def test_distinct_off_state_matches_the_legacy_running_topk():
    values, ys, xs, ids, _ = planted(5, 40, 3, 4, 40)
    hashes = [f"unique-{i}" for i in range(40)]  # no duplicates: the same as --distinct id
    a = partial(values, ys, xs, ids, hashes, 0, 40, 6, 7, distinct=True)
    b = partial(values, ys, xs, ids, hashes, 0, 40, 6, 7, distinct=False)
    assert a.equals(b)


# --- perceptual -------------------------------------------------------------------------------

MASK = 2**64 - 1  # a signed hash's 64 bits


def perceptual_oracle(values, ids, hashes, phashes, units, k, near, depth=None):
    """The greedy walk over each unit's contents (cut at `depth` when given)."""
    out = []
    for rows in contents_oracle(values, ids, hashes, units):
        rows = rows if depth is None else rows[:depth]
        kept: list[tuple] = []
        for row in rows:
            if len(kept) == k:
                break
            if all(((phashes[row[2]] ^ phashes[r[2]]) & MASK).bit_count() > near for r in kept):
                kept.append(row)
        out.append(kept)
    return out


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 50),
    units=st.integers(1, 3),
    k=st.integers(1, 6),
    buffer=st.integers(0, 8),
    contents=st.integers(1, 30),
    near=st.integers(0, 6),
    data=st.data(),
)
def test_perceptual_index_is_the_oracle_under_any_sharding(
    seed, n, units, k, buffer, contents, near, data
):
    values, ys, xs, ids, hashes = planted(seed, n, units, 5, contents)
    rng = np.random.default_rng(seed + 1)
    # near duplicates: a few base pictures, each content a base with 0-4 bits flipped
    bases = rng.integers(-(2**62), 2**62, size=max(1, contents // 3))
    phashes = {}
    for h in sorted(set(hashes)):
        flips = rng.choice(64, size=rng.integers(0, 5), replace=False)
        mask = np.uint64(sum(1 << int(b) for b in flips)).view(np.int64)  # the sign bit too
        phashes[h] = int(np.int64(bases[rng.integers(len(bases))]) ^ mask)
    depth = k + buffer
    bounds = shardings(data, n)
    parts = [
        partial(values, ys, xs, ids, hashes, lo, hi, depth, data.draw(st.integers(1, 9)))
        for lo, hi in zip(bounds, bounds[1:], strict=False)
    ]
    contents_table = merged_in_random_tree(parts, depth, "image_hash", seed)
    got, short = select_perceptual(contents_table, phashes, k, near, depth)
    want = perceptual_oracle(values, ids, hashes, phashes, units, k, near, depth)
    assert per_unit(got, units) == want
    unbounded = perceptual_oracle(values, ids, hashes, phashes, units, k, near)
    cut = [
        len(rows) >= depth and len(w) < k
        for rows, w in zip(contents_oracle(values, ids, hashes, units), want, strict=True)
    ]
    assert short == sum(cut)
    for unit, (w, u) in enumerate(zip(want, unbounded, strict=True)):
        if not cut[unit]:  # not short: the same as the walk over every content
            assert w == u
    for u in range(units):
        ranks = [r["rank"] for r in got.to_pylist() if r["unit"] == u]
        assert ranks == list(range(1, len(ranks) + 1))


def test_hamming_counts_bits_of_signed_hashes():
    a = np.array([0, -1, 5], dtype=np.int64)
    b = np.array([1, 0, 5], dtype=np.int64)
    assert hamming(a, b).tolist() == [1, 64, 0]
