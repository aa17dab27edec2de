"""The reduce beyond the top-k, through committed partials: the bottom against brute force under
two shardings, statistics, perceptual selection with pHashes read from the partials."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import IndexConfig
from pipeline.errors import DataError
from pipeline.index.distinct import Firsts
from pipeline.index.reduce_extra import bottom_index, merge_stats, perceptual_index
from pipeline.index.stats import RunningStats
from pipeline.index.topk import RunningTopK, negated
from pipeline.store import partials
from pipeline.store.storage import Store
from tests.index.test_distinct import contents_oracle, perceptual_oracle, planted


def images_table(ids: list[str], hashes: list[str]) -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            "image_id": ids, "uri": [f"/d/{i}" for i in ids],
            "stamp": pa.array([None] * n, pa.string()), "image_hash": hashes,
            "bytes": pa.array([10] * n, pa.int64()), "height": pa.array([5] * n, pa.int32()),
            "width": pa.array([5] * n, pa.int32()), "error": pa.array([None] * n, pa.string()),
            "shard": ["s"] * n, "offset": pa.array([None] * n, pa.int64()),
        }
    )  # fmt: skip


def commit_shards(store, values, ids, hashes, bounds, depth, bottom, phashes=None, batch=4):
    """Each shard through the worker's running state, committed like the worker commits it."""
    records = []
    units = values.shape[1]
    zeros = torch.zeros((0,), dtype=torch.int64)
    for n, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
        top = RunningTopK(units, depth, distinct=True)
        low = RunningTopK(units, bottom, distinct=True)
        stats = RunningStats(units)
        firsts = Firsts()
        for start in range(lo, hi, batch):
            stop = min(start + batch, hi)
            where = list(range(start - lo, stop - lo))
            idents, repeats = firsts.idents(hashes[start:stop], where)
            v = torch.from_numpy(values[start:stop])
            yx = zeros.new_zeros(v.shape)
            top.add(v, torch.tensor(where), yx, yx, torch.tensor(idents), repeats)
            low.add(-v, torch.tensor(where), yx, yx, torch.tensor(idents), repeats)
            stats.add(v)
        shard_ids, shard_hashes = ids[lo:hi], hashes[lo:hi]
        topk = top.table("L", shard_ids, shard_hashes)
        extra = {
            "bottom": negated(low.table("L", shard_ids, shard_hashes)),
            "stats": stats.table("L"),
        }
        if phashes is not None:
            wanted = sorted(set(topk["image_hash"].to_pylist()))
            extra["phash"] = pa.table({"image_hash": wanted, "phash": [phashes[h] for h in wanted]})
        report = {"images": hi - lo}
        records.append(
            partials.write(
                store,
                f"s{n:03d}",
                partials.new_attempt(),
                "run",
                topk,
                images_table(shard_ids, shard_hashes),
                report,
                extra,
            )  # fmt: skip
        )
    return records


def config(tmp_path, **kw) -> IndexConfig:
    return IndexConfig(model="m", data=str(tmp_path), layers=("L",), out=str(tmp_path), **kw)


def bottom_oracle(values, ids, hashes, units, k):
    """Per unit: each content's lowest row (value asc, id asc), first k in that order."""
    out = []
    for u in range(units):
        rows = sorted(range(len(ids)), key=lambda i: (values[i, u], ids[i]))
        seen, best = set(), []
        for i in rows:
            if hashes[i] not in seen:
                seen.add(hashes[i])
                best.append((ids[i], float(values[i, u])))
        out.append(best[:k])
    return out


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 40),
    bottom=st.integers(1, 6),
    contents=st.integers(1, 20),
    sizes=st.tuples(st.integers(1, 40), st.integers(1, 40)),
)
def test_bottom_is_the_brute_force_lowest_under_two_shardings(
    tmp_path_factory, seed, n, bottom, contents, sizes
):
    values, _, _, ids, hashes = planted(seed, n, 3, 5, contents)
    values -= 1.0  # signed: the bottom of a pre-ReLU layer
    want = bottom_oracle(values, ids, hashes, 3, bottom)
    tables = []
    for size in sizes:
        store = Store(str(tmp_path_factory.mktemp("out")))
        bounds = [*range(0, n, size), n]
        records = commit_shards(store, values, ids, hashes, bounds, 2, bottom)
        got = bottom_index(store, records, config(store.path(""), bottom=bottom))
        rows = got.to_pylist()
        assert [[(r["image_id"], r["activation"]) for r in rows if r["unit"] == u]
                for u in range(3)] == want  # fmt: skip
        assert all(r["rank"] == i + 1 for u in range(3)
                   for i, r in enumerate(x for x in rows if x["unit"] == u))  # fmt: skip
        tables.append(got)
    assert tables[0].equals(tables[1])


def test_stats_and_perceptual_read_back_from_partials(tmp_path):
    values, _, _, ids, hashes = planted(3, 60, 2, 6, 25)
    phashes = {h: (i // 3) * 0x0F0F if i % 3 else i for i, h in enumerate(sorted(set(hashes)))}
    store = Store(str(tmp_path / "out"))
    records = commit_shards(store, values, ids, hashes, [0, 17, 40, 60], 6, 2, phashes)
    merged = merge_stats(store, records).table("L").to_pydict()
    assert merged["count"] == [60, 60]
    np.testing.assert_allclose(merged["mean"], values.astype(np.float64).mean(axis=0))
    cfg = config(tmp_path, k=3, buffer=3, distinct="perceptual", near=2)
    got, short = perceptual_index(store, records, cfg)
    want = perceptual_oracle(values, ids, hashes, phashes, 2, 3, 2, depth=6)
    assert [[(r["image_id"], r["activation"], r["image_hash"]) for r in got.to_pylist()
             if r["unit"] == u] for u in range(2)] == want  # fmt: skip
    cut = sum(len(c) >= 6 and len(w) < 3 for c, w in zip(
        contents_oracle(values, ids, hashes, 2), want, strict=True))  # fmt: skip
    assert short == cut


def test_a_partial_without_the_table_asks_for_a_full_run(tmp_path):
    store = Store(str(tmp_path / "out"))
    record = partials.write(
        store, "s", "a1", "run", RunningTopK(1, 1).table("L", [], []), images_table([], []), {}
    )
    with pytest.raises(DataError, match="no stats table .* --full"):
        merge_stats(store, [record])
