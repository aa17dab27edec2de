"""partials + reduce: only committed attempts of this run are read; the pruned streaming reduce
equals a plain merge of everything and a pandas sort, for any order, grouping and encoding."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import DataError
from pipeline.index.reduce import (
    STRINGS,
    UNITS_PER_ROW_GROUP,
    GlobalTopK,
    merge_partials,
    write_images,
    write_index,
)
from pipeline.index.topk import RunningTopK, merge
from pipeline.store import partials
from pipeline.store.schemas import conform
from pipeline.store.storage import Store
from random_partials import random_partials


def topk_table(ids: list[str], values: list[float]) -> pa.Table:
    t = RunningTopK(units=1, k=2)
    v = torch.tensor(values)[:, None]  # (B, 1)
    zeros = torch.zeros_like(v, dtype=torch.int64)
    t.add(v, torch.arange(len(ids)), zeros, zeros)
    return t.table("l", ids, [f"h{i}" for i in ids])


def images_table(ids: list[str], error: str | None = None) -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            "image_id": ids, "uri": [f"/d/{i}" for i in ids],
            "stamp": pa.array([None] * n, pa.string()),
            "image_hash": [None if error else f"h{i}" for i in ids],
            "bytes": pa.array([None if error else 10] * n, pa.int64()),
            "height": pa.array([None if error else 5] * n, pa.int32()),
            "width": pa.array([None if error else 5] * n, pa.int32()),
            "error": pa.array([error] * n, pa.string()),
            "shard": ["s"] * n,
            "offset": pa.array([None] * n, pa.int64()),
        }
    )  # fmt: skip


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(str(tmp_path / "out"))


def commit(store, key, ids, values, run="r1", error=None):
    table = topk_table(ids, values) if error is None else topk_table([], [])
    report = {"images": len(ids), "bad": 0 if error is None else len(ids)}
    return partials.write(
        store, key, partials.new_attempt(), run, table, images_table(ids, error), report
    )


def test_only_this_runs_commit_is_read(store):
    commit(store, "s1", ["a", "b"], [1.0, 2.0])
    assert partials.read_commit(store, "s1", "r1")["images"] == 2
    assert partials.read_commit(store, "s1", "other-run") is None
    assert partials.read_commit(store, "s2", "r1") is None


def test_stray_attempt_is_never_read(store):
    record = commit(store, "s1", ["a", "b"], [1.0, 2.0])
    stray = topk_table(["zzz"], [100.0])
    store.write_parquet("partials/s1/deadbeef0000/topk.parquet", stray)  # a dead attempt's file
    index = merge_partials(store, [record], k=2)
    assert index["image_id"].to_pylist() == ["b", "a"]


def test_reduce_equals_merge_and_counts_errors(store):
    r1 = commit(store, "s1", ["a", "b"], [1.0, 5.0])
    r2 = commit(store, "s2", ["c", "d"], [3.0, 5.0])
    r3 = commit(store, "s3", ["e"], [0.0], error="truncated")
    index = merge_partials(store, [r1, r2, r3], k=2)
    expected = merge([topk_table(["a", "b"], [1.0, 5.0]), topk_table(["c", "d"], [3.0, 5.0])], 2)
    assert index["image_id"].to_pylist() == expected["image_id"].to_pylist() == ["b", "d"]
    assert write_images(store, [r1, r2, r3], store) == (5, 1)
    assert store.read_parquet("errors.parquet")["image_id"].to_pylist() == ["e"]
    assert write_index(store, index, ("l", "empty")) == ["index/l.parquet", "index/empty.parquet"]
    assert store.read_parquet("index/empty.parquet").num_rows == 0


# The streaming reducer against oracles: a plain merge of everything at once, and pandas.


def as_read(table: pa.Table, row_group: int) -> pa.Table:
    """`table` through Parquet with small row groups, strings dictionary-encoded per row group."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group)
    return pq.read_table(io.BytesIO(buffer.getvalue()), read_dictionary=STRINGS)


def pandas_oracle(parts: list[pa.Table], k: int) -> pd.DataFrame:
    """Plain full sort: best row per (layer, unit, image), then the first k per (layer, unit)."""
    df = pa.concat_tables(parts).to_pandas()
    df = df[df["rank"] <= k].sort_values(
        ["layer", "unit", "activation", "image_id"], ascending=[True, True, False, True]
    )
    df = df.drop_duplicates(["layer", "unit", "image_id"]).groupby(["layer", "unit"]).head(k)
    df["rank"] = (df.groupby(["layer", "unit"]).cumcount() + 1).astype("int16")
    return df.reset_index(drop=True)


def cut(part: pa.Table, k: int) -> pa.Table:
    return part.filter(pc.less_equal(part["rank"], k))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    shards=st.integers(1, 8),
    k=st.integers(1, 6),
    extra=st.integers(0, 4),
    levels=st.integers(1, 4),
    min_pending=st.integers(1, 60),
    max_pending=st.integers(1, 4),
    data=st.data(),
)
def test_pruned_stream_equals_a_full_merge(
    seed, shards, k, extra, levels, min_pending, max_pending, data
):
    parts = random_partials(seed, shards, depth=k + extra, levels=levels)
    parts.append(parts[0])  # a duplicated partial changes nothing
    whole = merge([cut(p, k) for p in parts], k)
    pd.testing.assert_frame_equal(whole.to_pandas(), pandas_oracle(parts, k))
    order = data.draw(st.permutations(range(len(parts))))
    reducer = GlobalTopK(k, min_pending=min_pending, max_pending=max_pending)
    for i in order:
        read = data.draw(st.booleans())  # dictionary-encoded as read from Parquet, or plain
        reducer.add(as_read(parts[i], data.draw(st.integers(1, 20))) if read else parts[i])
        assert reducer.state.equals(merge([reducer.state], k))  # the state is always a top-k
    assert reducer.table().equals(whole)


def test_floors_prune_almost_everything_on_iid_partials():
    rng = np.random.default_rng(0)
    parts = [
        pa.table(
            {
                "layer": ["l"] * 40,
                "unit": pa.array(np.repeat(np.arange(10), 4), pa.int32()),
                "rank": pa.array(np.tile(np.arange(1, 5), 10), pa.int16()),
                "activation": pa.array(
                    -np.sort(-rng.random((10, 4)), axis=1).ravel(), pa.float32()
                ),
                "image_id": [f"s{s:03d}/{i}" for i in range(40)],
                "image_hash": ["h"] * 40,
                "y": pa.array([0] * 40, pa.int32()),
                "x": pa.array([0] * 40, pa.int32()),
            }
        )  # fmt: skip
        for s in range(200)
    ]
    reducer = GlobalTopK(3, min_pending=1)
    for part in parts:
        reducer.add(part)
    assert reducer.table().equals(conform(merge([cut(p, 3) for p in parts], 3), "partial"))
    assert reducer.survivors < 0.2 * 200 * 10 * 3  # k ln N ~ 16 of 600 rows per unit, plus lag


def test_special_floats_prune_like_the_merge_orders():
    def part(ids: list[str], values: list[float]) -> pa.Table:
        t = RunningTopK(units=1, k=len(ids))
        zeros = torch.zeros((len(ids), 1), dtype=torch.int64)
        t.add(torch.tensor(values)[:, None], torch.arange(len(ids)), zeros, zeros)
        return t.table("l", ids, [f"h{i}" for i in ids])

    nan, inf = float("nan"), float("inf")
    parts = [
        part(["a", "b", "c"], [1.0, -0.0, -inf]),
        part(["d", "e"], [0.0, -1.0]),
        part(["f", "g"], [-0.0, 0.0]),
        part(["h", "i"], [nan, -inf]),
        part(["j"], [inf]),
    ]
    for k, best in [(2, ["h", "j"]), (5, ["h", "j", "a", "d", "g"]), (9, None)]:
        expected = merge(parts, k).to_pandas()  # NaN, inf, 1, +0 (d, g) before -0 (b, f)
        if best:
            assert expected["image_id"].tolist() == best
        for order in (parts, parts[::-1]):
            reducer = GlobalTopK(k, min_pending=1)
            for table in order:
                reducer.add(table)
            pd.testing.assert_frame_equal(reducer.table().to_pandas(), expected)


def test_bad_partials_are_refused():
    reducer = GlobalTopK(2)
    good = topk_table(["a", "b"], [1.0, 2.0])
    with pytest.raises(ValueError, match="columns"):
        reducer.add(good.drop_columns(["x"]))
    with pytest.raises(ValueError, match="negative unit"):
        reducer.add(good.set_column(1, "unit", pa.array([-1, -1], pa.int32())))
    with pytest.raises(ValueError, match="k must be at least 1"):
        GlobalTopK(0)


def test_merge_partials_streams_parquet_partials_exactly(store):
    parts = random_partials(7, shards=12, depth=5, levels=3)
    records = [
        partials.write(store, f"s{i}", partials.new_attempt(), "r1", part, images_table([]), {})
        for i, part in enumerate(parts)
    ]
    index = merge_partials(store, records, k=3)
    assert index.equals(conform(merge([cut(p, 3) for p in parts], 3), "index"))
    assert index.schema.field("image_id").type == pa.string()
    with pytest.raises(DataError, match="written by run r1.*not by this run"):
        merge_partials(store, [{**records[0], "run": "r2"}], k=3)


def test_index_row_groups_let_a_unit_filter_read_one_group(store):
    units = 2 * UNITS_PER_ROW_GROUP + 10
    rows = pa.table(
        {
            "layer": ["wide"] * units * 3,
            "unit": pa.array(np.repeat(np.arange(units)[::-1], 3), pa.int32()),  # unsorted
            "rank": pa.array(np.tile([1, 2, 3], units), pa.int16()),
            "activation": pa.array(np.linspace(1, 0, units * 3), pa.float32()),
            "image_id": [f"i{n}" for n in range(units * 3)],
            "image_hash": ["h"] * units * 3,
            "y": pa.array([0] * units * 3, pa.int32()),
            "x": pa.array([0] * units * 3, pa.int32()),
        }
    )
    write_index(store, conform(rows, "index"), ("wide",))
    path = store.path("index/wide.parquet")
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    fragment = next(iter(ds.dataset(path).get_fragments()))
    hits = fragment.split_by_row_group(filter=pc.field("unit") == UNITS_PER_ROW_GROUP + 1)
    assert len(hits) == 1  # statistics on the sorted `unit` column skip the other groups
    back = pd.read_parquet(path, filters=[("unit", "==", 7)])
    assert list(back["rank"]) == [1, 2, 3] and set(back["unit"]) == {7}
