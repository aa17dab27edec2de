"""store.versions: run ids, LATEST, complete versions, the lock on a fake clock, prune, history."""

from __future__ import annotations

import calendar
import os
import re
import time

import pyarrow as pa
import pytest

from pipeline.errors import DataError
from pipeline.store import versions
from pipeline.store.layout import COMMIT, LATEST, LOCK, MANIFEST
from pipeline.store.schemas import schema
from pipeline.store.storage import Store
from pipeline.store.versions import LOCK_TTL, Lock

# run ids as new_run_id spells them, oldest first
V1, V2, V3, V4 = (f"20261201T00000{i}Z-{c * 6}" for i, c in zip(range(1, 5), "abcd", strict=True))


class Clock:
    """Stands in for the `time` module inside pipeline.store.versions; `now` is set by hand."""

    def __init__(self, now: float):
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def gmtime(self, secs: float | None = None) -> time.struct_time:
        return time.gmtime(self.now if secs is None else secs)

    def localtime(self, secs: float | None = None) -> time.struct_time:
        return time.localtime(self.now if secs is None else secs)

    def strftime(self, fmt: str, t: time.struct_time | None = None) -> str:
        return time.strftime(fmt, self.localtime() if t is None else t)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock(1_000_000.0)
    monkeypatch.setattr(versions, "time", fake)
    return fake


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        yield Store(str(tmp_path / "out"))
        return
    store = Store(f"memory://versions-{tmp_path.name}")  # memory is process-wide: a unique root
    yield store
    store.remove("")


@pytest.fixture
def local(tmp_path) -> Store:
    return Store(str(tmp_path / "out"))


def previous_parts(prev) -> tuple[Store, dict]:
    """previous() as a (store, manifest) pair, whether it returns a tuple or a record."""
    store = getattr(prev, "store", None) or prev[0]
    manifest = getattr(prev, "manifest", None)
    return store, manifest if manifest is not None else prev[1]


def add_version(store: Store, run_id: str, shards: dict[str, str] | None, layers=()) -> None:
    """A version folder: a manifest naming `shards` {key: attempt} (None: half written)."""
    folder = versions.version(store, run_id)
    for layer in layers:
        folder.write_parquet(f"index/{layer}.parquet", index_rows(layer, run_id))
    if shards is not None:
        listed = [{"key": k, "attempt": a} for k, a in shards.items()]
        folder.write_json(MANIFEST, {"run_id": run_id, "shards": listed})


def index_rows(layer: str, run_id: str) -> pa.Table:
    """Two units, two ranks; image ids say which version wrote them."""
    columns = {
        "layer": [layer] * 4,
        "unit": [0, 0, 1, 1],
        "rank": [1, 2, 1, 2],
        "activation": [4.0, 3.0, 2.0, 1.0],
        "image_id": [f"{run_id[-1]}{i}.jpg" for i in range(4)],
        "image_hash": ["h"] * 4,
        "y": [0, 1, 2, 3],
        "x": [3, 2, 1, 0],
    }
    target = schema("index")
    return pa.Table.from_arrays(
        [pa.array(columns.get(f.name, [None] * 4), f.type) for f in target], schema=target
    )


def add_attempts(store: Store, key: str, *attempts: str) -> None:
    for attempt in attempts:
        store.write_bytes(f"partials/{key}/{attempt}/topk.parquet", b"t")
    store.write_json(f"partials/{key}/{COMMIT}", {"shard": key, "attempt": attempts[-1]})


# run ids


def test_run_ids_spell_utc_time_and_sort_by_it(clock):
    seconds = [
        calendar.timegm((2026, 12, 9, 23, 59, 59, 0, 0, 0)),
        calendar.timegm((2026, 12, 10, 0, 0, 0, 0, 0, 0)),
        calendar.timegm((2026, 12, 31, 23, 59, 59, 0, 0, 0)),
        calendar.timegm((2027, 1, 1, 0, 0, 0, 0, 0, 0)),
        calendar.timegm((2027, 1, 1, 0, 0, 1, 0, 0, 0)),
        calendar.timegm((2027, 10, 1, 0, 0, 0, 0, 0, 0)),
    ]
    ids = []
    for now in seconds:
        clock.now = now + 0.9  # fractions of a second are dropped
        ids.append(versions.new_run_id())
    assert all(re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", i) for i in ids)
    assert [i.split("-")[0] for i in ids] == [
        "20261209T235959Z",
        "20261210T000000Z",
        "20261231T235959Z",
        "20270101T000000Z",
        "20270101T000001Z",
        "20271001T000000Z",
    ]
    assert sorted(ids) == ids
    assert len({versions.new_run_id() for _ in range(20)}) == 20  # one second, distinct ids


# LATEST, complete, newest, previous


def test_latest_is_none_until_set(store):
    assert versions.latest(store) is None
    versions.set_latest(store, V1)
    assert store.read_bytes(LATEST) == f"{V1}\n".encode()
    assert versions.latest(store) == V1
    versions.set_latest(store, V2)
    assert versions.latest(store) == V2
    store.write_bytes(LATEST, b"\n")
    assert versions.latest(store) is None


def test_complete_lists_only_versions_with_a_manifest_oldest_first(store):
    assert versions.complete(store) == []
    add_version(store, V3, {})
    add_version(store, V2, None, layers=["fc"])  # half written: an index but no manifest
    add_version(store, V1, {})
    assert versions.complete(store) == [V1, V3]


def test_newest_and_previous(store):
    assert versions.previous(store) is None
    assert versions.newest(store).url == store.url
    store.write_json(MANIFEST, {"run_id": "index", "shards": []})  # a plain `ninebest index` run
    prev_store, manifest = previous_parts(versions.previous(store))
    assert prev_store.url == store.url and manifest["run_id"] == "index"
    add_version(store, V1, {})
    add_version(store, V2, {})
    versions.set_latest(store, V1)  # LATEST decides, not the newest folder
    prev_store, manifest = previous_parts(versions.previous(store))
    assert prev_store.url == f"{store.url}/versions/{V1}" and manifest["run_id"] == V1
    assert versions.newest(store).url == f"{store.url}/versions/{V1}"


# the lock


def test_lock_is_written_while_held_and_removed_after(store, clock):
    with Lock(store, owner="host:1:aaaa") as lock:
        held = store.read_json(LOCK)
        assert held == {
            "owner": "host:1:aaaa",
            "since": lock.since,
            "expires": clock.now + versions.LOCK_TTL,
        }
        assert lock.since == time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(clock.now))
    assert not store.exists(LOCK)


def test_lock_owners_differ_by_default(local, clock):
    assert Lock(local).owner != Lock(local).owner


def test_a_second_holder_is_refused_while_the_first_lives(store, clock):
    with Lock(store, owner="host:1:first"):
        until = time.strftime("%H:%M:%S", time.localtime(clock.now + versions.LOCK_TTL))
        clock.now += versions.LOCK_TTL - 1
        with pytest.raises(DataError) as caught, Lock(store, owner="host:2:second"):
            pass
        message = str(caught.value)
        assert f"another reindex holds {store.url!r} (owner host:1:first, since " in message
        assert f"remove {LOCK} if that run is dead (it expires by itself at {until})" in message
        assert store.read_json(LOCK)["owner"] == "host:1:first"  # the refused run left it alone
    assert not store.exists(LOCK)


def test_a_lock_taken_a_moment_ago_is_refused(local, clock):
    with Lock(local, owner="host:1:first"):
        blind = Store(local.url)  # checked for the lock just before the first run created it
        blind.exists = lambda rel: False
        with pytest.raises(DataError, match="took the lock on .* a moment ago"), Lock(blind):
            pass
        assert local.read_json(LOCK)["owner"] == "host:1:first"


def test_an_expired_lock_is_taken_over_and_its_old_owner_stops(store, clock):
    first = Lock(store, ttl=60, owner="host:1:first").__enter__()
    clock.now += 61  # no heartbeat for longer than the TTL: its owner died
    with Lock(store, ttl=60, owner="host:2:second"):
        assert store.read_json(LOCK)["owner"] == "host:2:second"
        with pytest.raises(DataError, match="another reindex took the lock .* this run stops"):
            first.heartbeat(force=True)
        first.__exit__(None, None, None)  # leaves the new owner's lock alone
        assert store.read_json(LOCK)["owner"] == "host:2:second"
    assert not store.exists(LOCK)


def test_heartbeat_extends_the_lock_at_most_every_ttl_over_30(store, clock):
    start = clock.now
    with Lock(store, ttl=60, owner="host:1:me") as lock:  # heartbeats at most every 2 s
        assert store.read_json(LOCK)["expires"] == start + 60
        clock.now = start + 1.5
        lock.heartbeat()
        assert store.read_json(LOCK)["expires"] == start + 60  # too soon: nothing written
        clock.now = start + 2.5
        lock.heartbeat()
        assert store.read_json(LOCK)["expires"] == start + 62.5
        clock.now = start + 3.0
        lock.heartbeat(force=True)
        assert store.read_json(LOCK)["expires"] == start + 63.0
        clock.now = start + 62
        with pytest.raises(DataError, match="another reindex holds"), Lock(store, ttl=60):
            pass  # past the first expiry, but kept alive by the heartbeats
    assert not store.exists(LOCK)


def test_an_empty_lock_file_is_refused_while_fresh_never_a_json_crash(local, clock):
    """Left by a run killed between its exclusive create and its first write."""
    local.write_bytes(LOCK, b"")
    with pytest.raises(DataError, match="owner unknown"), Lock(local):
        pass


def test_an_empty_lock_file_expires_ttl_after_it_was_made(local):
    local.write_bytes(LOCK, b"")
    old = time.time() - 2 * LOCK_TTL
    os.utime(local.path(LOCK), (old, old))
    with Lock(local) as lock:
        assert local.read_json(LOCK)["owner"] == lock.owner
    assert not local.exists(LOCK)


# prune


def test_prune_keeps_the_newest_versions_latest_and_the_partials_they_use(store):
    add_version(store, V1, {"s0": "a0", "s1": "a1"})
    add_version(store, V2, {"s0": "a0", "s1": "b1"})
    add_version(store, V3, {"s0": "b0", "s1": "b1"})
    add_version(store, V4, None, layers=["fc"])  # half written by a dead run
    add_attempts(store, "s0", "a0", "b0")
    add_attempts(store, "s1", "a1", "b1")
    add_attempts(store, "s2", "c2")  # a shard no version uses
    versions.set_latest(store, V3)
    assert versions.prune(store, keep=2) == [V1, V4]
    assert store.listdir("versions") == [V2, V3]
    assert store.listdir("partials") == ["s0", "s1"]
    assert store.listdir("partials/s0") == [COMMIT, "a0", "b0"]  # a0: still used by V2
    assert store.listdir("partials/s1") == [COMMIT, "b1"]
    assert versions.latest(store) == V3
    assert versions.prune(store, keep=2) == []  # nothing more to do


def test_prune_never_removes_latest(store):
    add_version(store, V1, {"s0": "a0"})
    add_version(store, V2, {"s0": "b0"})
    add_version(store, V3, {"s0": "c0"})
    add_attempts(store, "s0", "a0", "b0", "c0")
    versions.set_latest(store, V1)  # rolled back to the oldest
    assert versions.prune(store, keep=1) == [V2]
    assert store.listdir("versions") == [V1, V3]
    assert store.listdir("partials/s0") == [COMMIT, "a0", "c0"]


def test_prune_keeps_the_partials_of_a_plain_index_run_in_out(store):
    store.write_json(MANIFEST, {"shards": [{"key": "s0", "attempt": "a0"}]})
    add_version(store, V1, {"s0": "b0"})
    add_version(store, V2, {"s0": "c0"})
    add_attempts(store, "s0", "a0", "b0", "c0")
    versions.set_latest(store, V2)
    assert versions.prune(store, keep=1) == [V1]
    assert store.listdir("partials/s0") == [COMMIT, "a0", "c0"]


# history


def test_history_of_units_across_complete_versions(store):
    add_version(store, V1, {}, layers=["fc"])
    add_version(store, V2, {}, layers=["fc", "conv2"])
    add_version(store, V3, {}, layers=["conv2"])  # no fc: skipped
    add_version(store, V4, None, layers=["fc"])  # half written: never read
    table = versions.history(store, "fc", 0)
    assert table.column_names == ["version", "unit", "rank", "activation", "image_id", "y", "x"]
    assert [tuple(row.values()) for row in table.to_pylist()] == [
        (V1, 0, 1, 4.0, "a0.jpg", 0, 3),
        (V1, 0, 2, 3.0, "a1.jpg", 1, 2),
        (V2, 0, 1, 4.0, "b0.jpg", 0, 3),
        (V2, 0, 2, 3.0, "b1.jpg", 1, 2),
    ]
    both = versions.history(store, "conv2", [1, 0])
    assert both["version"].to_pylist() == [V2] * 4 + [V3] * 4
    assert both["unit"].to_pylist() == [0, 0, 1, 1] * 2  # file order within a version
    assert versions.history(store, "fc", [7]).num_rows == 0


def test_history_of_a_layer_no_version_indexes_names_the_fix(store):
    add_version(store, V1, {}, layers=["fc"])
    with pytest.raises(DataError, match=r"indexes layer 'conv9'; run `ninebest reindex` first"):
        versions.history(store, "conv9", 0)
