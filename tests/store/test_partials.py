"""store.partials: write -> read_commit -> read_table, on local disk and in memory."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.errors import DataError
from pipeline.store import partials
from pipeline.store.layout import partial_commit, partial_folder, partial_table
from pipeline.store.schemas import schema
from pipeline.store.storage import Store

RUN = "f" * 64  # run fingerprints are sha256 hex
OTHER_RUN = "0" * 64


def table(name: str, **columns: list) -> pa.Table:
    """A table in schema `name`: the given columns, every other (nullable) column null."""
    target = schema(name)
    rows = len(next(iter(columns.values())))
    unknown = set(columns) - set(target.names)
    assert not unknown, f"not in schema {name}: {unknown}"
    return pa.Table.from_arrays(
        [pa.array(columns.get(f.name, [None] * rows), f.type) for f in target], schema=target
    )


def topk(ids: list[str], values: list[float]) -> pa.Table:
    n = len(ids)
    return table(
        "partial",
        layer=["conv2"] * n,
        unit=[0] * n,
        rank=list(range(1, n + 1)),
        activation=values,
        image_id=ids,
        image_hash=[f"h-{i}" for i in ids],
        y=[1] * n,
        x=[2] * n,
    )


def images(ids: list[str], shard_key: str) -> pa.Table:
    n = len(ids)
    return table(
        "images",
        image_id=ids,
        uri=[f"/data/{i}" for i in ids],
        image_hash=[f"h-{i}" for i in ids],
        bytes=[100] * n,
        height=[5] * n,
        width=[7] * n,
        shard=[shard_key] * n,
    )


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        yield Store(str(tmp_path / "out"))
        return
    store = Store(f"memory://partials-{tmp_path.name}")  # memory is process-wide: a unique root
    yield store
    store.remove("")


def write(store, key="000000-aa", attempt=None, run=RUN, ids=("a.jpg", "b.jpg"), values=(2, 1)):
    attempt = attempt or partials.new_attempt()
    report = {"images": len(ids), "indexed": len(ids), "bad": 0}
    return partials.write(
        store, key, attempt, run, topk(list(ids), list(values)), images(list(ids), key), report
    )


def test_new_attempts_are_12_hex_digits_and_differ():
    attempts = {partials.new_attempt() for _ in range(50)}
    assert len(attempts) == 50
    assert all(len(a) == 12 and int(a, 16) >= 0 for a in attempts)


def test_round_trip(store):
    record = write(store, attempt="0123456789ab", values=(2.5, 1.0))
    assert record == {
        "images": 2,
        "indexed": 2,
        "bad": 0,
        "shard": "000000-aa",
        "attempt": "0123456789ab",
        "run": RUN,
    }
    assert store.listdir(partial_folder("000000-aa", "0123456789ab")) == [
        "images.parquet",
        "topk.parquet",
    ]
    assert partials.read_commit(store, "000000-aa", RUN) == record
    top = partials.read_table(store, record, "topk")
    assert top.to_pylist() == topk(["a.jpg", "b.jpg"], [2.5, 1.0]).to_pylist()
    for field in schema("partial"):
        assert top.schema.field(field.name).type == field.type, field.name
    meta = top.schema.metadata
    assert meta[partials.RUN_KEY] == RUN.encode()
    assert meta[b"ninebest.schema"] == b"partial"
    seen = partials.read_table(store, record, "images")
    assert seen.to_pylist() == images(["a.jpg", "b.jpg"], "000000-aa").to_pylist()
    assert seen.schema.metadata[b"ninebest.schema"] == b"images"
    kept = partials.read_table(store, record, "topk", read_dictionary=["image_id"])
    assert pa.types.is_dictionary(kept.schema.field("image_id").type)
    assert kept["image_id"].to_pylist() == ["a.jpg", "b.jpg"]


def test_no_commit_no_record(store):
    assert partials.read_commit(store, "000000-aa", RUN) is None


def test_a_commit_of_another_run_or_shard_is_ignored(store):
    record = write(store, run=OTHER_RUN)
    assert partials.read_commit(store, "000000-aa", RUN) is None
    assert partials.read_commit(store, "000000-aa", OTHER_RUN) == record
    store.write_json(partial_commit("000001-bb"), record)  # a commit copied under another shard
    assert partials.read_commit(store, "000001-bb", OTHER_RUN) is None


def test_commit_checks_are_answered_from_one_listing(store, monkeypatch):
    mine = write(store, key="000000-aa")
    write(store, key="000001-bb", run=OTHER_RUN)  # another run's commit: listed, then ignored
    store.write_parquet(partial_table("000002-cc", "dddddddddddd", "topk"), topk(["z"], [9]))
    keys = ["000000-aa", "000001-bb", "000002-cc", "000003-dd"]  # cc: attempt, no commit
    assert partials.committed(store) == {"000000-aa", "000001-bb"}
    reads: list[str] = []
    read_json = store.read_json
    monkeypatch.setattr(store, "read_json", lambda rel: reads.append(rel) or read_json(rel))
    monkeypatch.setattr(store, "exists", lambda rel: pytest.fail(f"a request per shard: {rel}"))
    found = partials.read_commits(store, keys, RUN)
    assert found == {"000000-aa": mine, "000001-bb": None, "000002-cc": None, "000003-dd": None}
    assert sorted(reads) == [partial_commit("000000-aa"), partial_commit("000001-bb")]
    assert partials.read_commits(store, [], RUN) == {}


def test_an_attempt_without_a_commit_is_never_read(store):
    first = write(store, attempt="aaaaaaaaaaaa", ids=("a.jpg",), values=(1,))
    # a dead attempt wrote its tables but never its commit
    store.write_parquet(partial_table("000000-aa", "dddddddddddd", "topk"), topk(["z.jpg"], [9]))
    assert partials.read_commit(store, "000000-aa", RUN) == first
    assert partials.read_table(store, first, "topk")["image_id"].to_pylist() == ["a.jpg"]
    # a later attempt that commits replaces the first: the last commit counts
    second = write(store, attempt="bbbbbbbbbbbb", ids=("b.jpg",), values=(3,))
    assert partials.read_commit(store, "000000-aa", RUN) == second
    assert partials.read_table(store, second, "topk")["image_id"].to_pylist() == ["b.jpg"]


def test_a_table_stamped_by_another_run_names_the_fix(store):
    record = write(store, attempt="aaaaaaaaaaaa", run=OTHER_RUN)
    forged = {**record, "run": RUN}  # e.g. a commit copied from another run's OUT
    store.write_json(partial_commit("000000-aa"), forged)
    assert partials.read_commit(store, "000000-aa", RUN) == forged
    folder = store.uri(partial_folder("000000-aa", "aaaaaaaaaaaa"))
    with pytest.raises(DataError) as caught:
        partials.read_table(store, forged, "topk")
    message = str(caught.value)
    assert f"written by run {OTHER_RUN[:12]}, not by this run ({RUN[:12]})" in message
    assert f"remove {folder} and rerun" in message
    assert isinstance(caught.value, ValueError)


def test_an_unstamped_table_is_refused(store):
    record = write(store, attempt="aaaaaaaaaaaa")
    plain = topk(["a.jpg"], [1])  # written around partials.write: no run stamp
    store.write_parquet(partial_table("000000-aa", "aaaaaaaaaaaa", "topk"), plain)
    with pytest.raises(DataError, match=r"written by run \?"):
        partials.read_table(store, record, "topk")


def test_tables_are_conformed_to_their_schemas(store):
    as_int64 = topk(["a.jpg"], [1]).cast(
        pa.schema([f.with_type(pa.int64()) if f.name == "unit" else f for f in schema("partial")])
    )
    record = partials.write(
        store, "000000-aa", "aaaaaaaaaaaa", RUN, as_int64, images(["a.jpg"], "000000-aa"), {}
    )
    assert partials.read_table(store, record, "topk").schema.field("unit").type == pa.int32()


@pytest.mark.parametrize(
    "broken, error",
    [
        (lambda t, i: (t.select(t.column_names[::-1]), i), "expects"),  # columns out of order
        (lambda t, i: (t.drop_columns(["image_hash"]), i), "expects"),
        (lambda t, i: (t, i.drop_columns(["shard"])), "expects"),
        (
            lambda t, i: (t, i.set_column(0, "image_id", pa.array([None], pa.string()))),
            "non-nullable column 'image_id'",
        ),
    ],
)
def test_a_table_off_its_schema_writes_no_commit(store, broken, error):
    top, seen = broken(topk(["a.jpg"], [1]), images(["a.jpg"], "000000-aa"))
    with pytest.raises(ValueError, match=error):
        partials.write(store, "000000-aa", "aaaaaaaaaaaa", RUN, top, seen, {})
    assert partials.read_commit(store, "000000-aa", RUN) is None
    assert not store.exists(partial_commit("000000-aa"))


def test_a_rank_out_of_range_is_refused(store):
    top = topk(["a.jpg"], [1]).set_column(2, "rank", pa.array([70000], pa.int32()))
    with pytest.raises(pa.ArrowInvalid):
        partials.write(store, "000000-aa", "aaaaaaaaaaaa", RUN, top, images([], "s"), {})
    assert partials.read_commit(store, "000000-aa", RUN) is None
