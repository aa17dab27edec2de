"""cluster.pool: placement on fake node lists, the pool on a scripted stand-in for `ray`, then a
real multi-node Ray cluster on 127.0.0.1 (tests/helpers/multinode.py).

`actor_options` and `Sizing` read `ray.nodes()`, monkeypatched here to return node lists as Ray
spells them. `Pool.map` runs on a stand-in for the `ray` module whose actors answer from a
script: each task has a list of outcomes, one per attempt (a value, or the exception `ray.get`
raises). On the multi-node cluster GPU worker nodes are killed mid-run and added mid-run; after
each the index equals brute force (tests/helpers/oracle.py) and every shard counts once. Batches
are slowed (index/faults.py) so a kill or a join lands while shards remain. The multi-node tests
run alone with `pytest -m multinode`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import ray
import torch
from hypothesis import given
from hypothesis import strategies as st

import oracle
import pipeline.cluster.pool
from multinode import HEALTH, LocalCluster
from pipeline.cluster.pool import MAX_ATTEMPTS, Pool, Sizing, actor_options
from pipeline.config import IndexConfig
from pipeline.errors import DataError, WorkerError
from pipeline.index.run import index
from pipeline.net.models import load_model
from pipeline.progress import Progress
from pipeline.store import layout, partials
from pipeline.store.storage import Store

LAYERS = ("conv2", "fc")
DEAD_AFTER = HEALTH["health_check_period_ms"] * HEALTH["health_check_failure_threshold"] / 1000


def node(cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    resources = {"CPU": float(cpus), "memory": 8e9, "node:127.0.0.1": 1.0}
    if gpus:
        resources["GPU"] = float(gpus)
    return {"NodeID": "n", "Alive": alive, "Resources": resources}


def options(monkeypatch, nodes: list[dict], workers=2, threads=4, tasks=100):
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    return actor_options(workers, threads, tasks)


# GPU clusters: one actor per GPU, with the CPUs the tightest GPU node can spare per GPU


@pytest.mark.parametrize(
    "nodes, threads, tasks, expected",
    [
        ([node(16, 4), node(8, 1)], 8, 100, (5, 4)),  # 16 CPUs / 4 GPUs is the tightest
        ([node(16, 4), node(8, 1)], 2, 100, (5, 2)),  # fewer threads than the share
        ([node(16, 4), node(8, 1)], 8, 3, (3, 4)),  # fewer tasks than GPUs
        ([node(2, 4)], 8, 100, (4, 1)),  # less than one CPU per GPU: still 1
        ([node(0, 1)], 8, 100, (1, 1)),
        ([node(4, 2), node(64)], 16, 100, (2, 2)),  # a CPU-only node does not set the share
        ([node(8, 8, alive=False), node(12, 1)], 8, 100, (1, 8)),  # dead nodes are ignored
        ([node(96, 8), node(96, 8)], 16, 100, (16, 12)),
    ],
)
def test_gpu_clusters_get_one_actor_per_gpu(monkeypatch, nodes, threads, tasks, expected):
    count, cpus = expected
    assert options(monkeypatch, nodes, workers=2, threads=threads, tasks=tasks) == (
        count,
        {"num_gpus": 1, "num_cpus": cpus},
    )


# CPU-only clusters: `workers` actors at most, each with the same CPUs, each fitting on a node


@pytest.mark.parametrize(
    "cpus, workers, tasks, expected",
    [
        ([8], 2, 100, (2, 4)),
        ([8], 3, 100, (3, 2)),  # 8 // 3
        ([8], 4, 1, (1, 8)),  # one task: one actor with every CPU
        ([2], 4, 100, (2, 1)),  # no more actors than CPUs
        ([3, 1], 2, 100, (2, 1)),  # 2 CPUs each would leave the second actor nowhere to run
        ([3, 3], 2, 100, (2, 3)),
        ([5, 1], 3, 100, (3, 1)),  # 2 each: only two fit on the 5-CPU node
        ([4, 4, 1], 2, 100, (2, 4)),
        ([4, 4, 1], 3, 100, (3, 2)),  # 9 // 3 = 3 fits only twice; 2 fits four times
        ([0, 4], 2, 100, (2, 2)),  # a head started with --num-cpus 0
        ([0.5, 2], 2, 100, (2, 1)),  # less than one CPU: not a place for an actor
    ],
)
def test_cpu_clusters_share_the_cpus(monkeypatch, cpus, workers, tasks, expected):
    count, share = expected
    nodes = [node(c) for c in cpus]
    assert options(monkeypatch, nodes, workers=workers, threads=64, tasks=tasks) == (
        count,
        {"num_cpus": share},
    )


def test_dead_nodes_are_ignored(monkeypatch):
    nodes = [node(32, alive=False), node(2), node(64, 8, alive=False)]
    assert options(monkeypatch, nodes, workers=4) == (2, {"num_cpus": 1})


@pytest.mark.parametrize("nodes", [[], [node(0)], [node(8, alive=False)], [node(0.5)]])
def test_no_cpus_at_all_still_asks_for_one_actor_of_one_cpu(monkeypatch, nodes):
    assert options(monkeypatch, nodes, workers=4) == (1, {"num_cpus": 1})


def best_share(cpus: list[int], count: int) -> int:
    """Oracle: the most CPUs per actor with which `count` actors all fit on the nodes."""
    fits = [s for s in range(1, max(cpus) + 1) if sum(c // s for c in cpus) >= count]
    return max(fits)


@given(
    cpus=st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=6),
    workers=st.integers(min_value=1, max_value=40),
    tasks=st.integers(min_value=1, max_value=40),
)
def test_cpu_actors_always_fit_with_the_largest_equal_share(cpus, workers, tasks):
    nodes = [node(c) for c in cpus]
    with pytest.MonkeyPatch.context() as monkeypatch:
        count, opts = options(monkeypatch, nodes, workers=workers, threads=1, tasks=tasks)
    assert count == min(workers, tasks, sum(cpus))
    assert sum(c // opts["num_cpus"] for c in cpus) >= count  # every actor has a place
    assert opts == {"num_cpus": best_share(cpus, count)}


HEAD = {"CPU": 4.0}
GPU_NODE = {"CPU": 8.0, "GPU": 2.0}


def test_gpu_sizing_is_one_actor_per_gpu_and_at_least_what_is_asked():
    sizing = Sizing(gpu=True, num_cpus=4, workers=2, gpus=0)
    assert [sizing.hosts(n) for n in (HEAD, GPU_NODE, {"CPU": 3.0, "GPU": 1.0})] == [0, 2, 1]
    assert sizing.capacity([HEAD, GPU_NODE, GPU_NODE]) == 4  # workers does not cap GPU actors
    assert sizing.capacity([HEAD]) == 0
    asked = Sizing(gpu=True, num_cpus=4, workers=2, gpus=8)
    assert asked.capacity([HEAD]) == 8 and asked.capacity([GPU_NODE] * 5) == 10
    assert sizing.need() == "1 GPU and 4 CPUs"


def test_cpu_sizing_fills_the_cpus_up_to_workers():
    sizing = Sizing(gpu=False, num_cpus=2, workers=3, gpus=0)
    assert sizing.capacity([HEAD]) == 2
    assert sizing.capacity([HEAD, HEAD]) == 3  # a node joined: up to --workers
    assert sizing.capacity([{"CPU": 1.0}]) == 0 and sizing.need() == "2 CPUs"


# Pool.map on scripted actors


class Ref:
    def __init__(self, outcome):
        self.outcome = outcome


class Actor:
    def __init__(self, fake: FakeRay, args: tuple):
        self.args, self.alive = args, True
        self.index = SimpleNamespace(remote=lambda *call: self._call(fake, call))
        started = fake.starts.pop(0) if fake.starts else {"node": "n", "actor": str(id(self))}
        self.locate = SimpleNamespace(remote=lambda: Ref(started))

    def _call(self, fake, call) -> Ref:
        assert self.alive, "a killed actor got a task"
        fake.calls.append((call, self))
        return Ref(fake.script[call[0]].pop(0))


class Factory:
    """`ray.remote(cls)`: records its `.options()`, starts scripted actors."""

    def __init__(self, fake: FakeRay):
        self.fake = fake

    def options(self, **options) -> Factory:
        self.fake.options = options
        return self

    def remote(self, *args, threads: int) -> Actor:
        actor = Actor(self.fake, (*args, threads))
        self.fake.actors.append(actor)
        return actor


class FakeRay:
    """What pool.py uses of `ray`: nodes, remote, wait, get, kill, exceptions. Every task and
    every actor start is done by the time `wait` is called; `nodes` answers from `cluster`."""

    exceptions = ray.exceptions

    def __init__(self, script: dict[str, list], cluster: list[list[dict]] | None = None):
        self.script, self.calls, self.actors, self.options = script, [], [], None
        self.cluster = cluster or [[node(8)]]  # node lists, one per read; the last one stays
        self.starts: list = []  # outcomes of the next actors' `locate` (default: up)

    def nodes(self) -> list[dict]:
        return self.cluster.pop(0) if len(self.cluster) > 1 else self.cluster[0]

    def remote(self, cls: type) -> Factory:
        return Factory(self)

    def wait(self, refs: list[Ref], num_returns: int, timeout: float):
        assert refs and timeout is not None, "an unbounded wait"
        return refs, []

    def get(self, ref: Ref):
        if isinstance(ref.outcome, BaseException):
            raise ref.outcome
        return ref.outcome

    def kill(self, actor: Actor, no_restart: bool) -> None:
        assert no_restart
        actor.alive = False


def task_error(cause: Exception) -> ray.exceptions.RayTaskError:
    trace = f"Traceback (most recent call last):\n  File x\n{type(cause).__name__}: {cause}"
    return ray.exceptions.RayTaskError("index", trace, cause)


def actor_died(init_failed: bool = False) -> ray.exceptions.RayActorError:
    return ray.exceptions.RayActorError(
        error_msg="The actor died unexpectedly.\nworker killed: out of memory",
        actor_init_failed=init_failed,
    )


@pytest.fixture
def fake_cluster(monkeypatch):
    """make(script, cluster=None, **pool) -> (a Pool on fake nodes, the fake ray that runs it)."""
    monkeypatch.setattr(pipeline.cluster.pool, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(pipeline.cluster.pool, "NODES_EVERY", 0.0)

    def make(script: dict[str, list], cluster=None, **pool) -> tuple[Pool, FakeRay]:
        fake = FakeRay(script, cluster)
        monkeypatch.setattr(pipeline.cluster.pool, "ray", fake)
        settings = {"workers": 2, "threads": 1, "tasks": len(script), **pool}
        return Pool(object, ("settings",), **settings), fake

    return make


def test_pool_starts_its_actors_with_the_placement_and_threads(fake_cluster):
    pool, fake = fake_cluster({"s1": [1]})
    with pool:
        assert list(pool.map("index", ["s1"])) == [1]
    [actor] = fake.actors  # one task: one actor, with every CPU
    assert fake.options == {"max_restarts": 0, "max_concurrency": 1, "num_cpus": 8}
    assert actor.args == ("settings", 8)  # the actor learns its thread count (threads=)
    assert not actor.alive and pool.history == [{"seconds": pool.history[0]["seconds"],
                                                  "actors": 1}]  # fmt: skip


def test_map_yields_every_result_with_the_call_arguments(fake_cluster):
    pool, fake = fake_cluster({"s1": ["r1"], "s2": ["r2"], "s3": ["r3"]})
    results = list(pool.map("index", ["s1", "s2", "s3"], call=lambda t: (t, "extra")))
    assert sorted(results) == ["r1", "r2", "r3"]
    assert [call for call, _ in fake.calls] == [("s1", "extra"), ("s2", "extra"), ("s3", "extra")]
    assert {id(actor) for _, actor in fake.calls} == {id(a) for a in fake.actors}  # both worked


def test_two_in_flight_gives_each_actor_a_task_before_a_second(fake_cluster):
    script = {f"s{i}": [f"r{i}"] for i in range(5)}
    pool, fake = fake_cluster(script, in_flight=2)
    assert sorted(pool.map("index", list(script))) == sorted(f"r{i}" for i in range(5))
    first = [actor for _, actor in fake.calls[:4]]
    assert first == [fake.actors[0], fake.actors[1]] * 2 and fake.options["max_concurrency"] == 2


def test_an_unexpected_error_is_retried(fake_cluster):
    pool, fake = fake_cluster({"s1": [task_error(RuntimeError("flaky")), "r1"], "s2": ["r2"]})
    assert sorted(pool.map("index", ["s1", "s2"])) == ["r1", "r2"]
    assert [call[0] for call, _ in fake.calls] == ["s1", "s2", "s1"]
    assert len(fake.actors) == 2 and all(a.alive for a in fake.actors)  # nobody replaced


def test_a_dead_actor_is_dropped_its_task_retried_and_a_fresh_one_started(fake_cluster):
    pool, fake = fake_cluster({"s1": [actor_died(), "r1"], "s2": ["r2"], "s3": ["r3"]})
    assert sorted(pool.map("index", ["s1", "s2", "s3"])) == ["r1", "r2", "r3"]
    dead, other, fresh = fake.actors
    assert not dead.alive and fresh.args == dead.args
    assert [c[0] for c, actor in fake.calls if actor is dead] == ["s1"]  # nothing after death
    assert [c[0] for c, _ in fake.calls].count("s1") == 2
    assert [h["actors"] for h in pool.history] == [1, 2, 1, 2]  # up, up, died, replaced


def test_a_task_that_keeps_failing_stops_the_run_naming_it(fake_cluster):
    failures = [task_error(RuntimeError("cuda oom")), actor_died(), task_error(ValueError("nan"))]
    assert len(failures) == MAX_ATTEMPTS
    pool, fake = fake_cluster({"shard-7": failures + ["never"], "s2": ["r2"]})
    with pytest.raises(WorkerError) as caught:
        list(pool.map("index", ["shard-7", "s2"], name=lambda t: f"shard {t}"))
    assert str(caught.value) == "shard shard-7 failed 3 times: ValueError: nan"
    assert caught.value.__cause__ is failures[-1]
    assert [call[0] for call, _ in fake.calls].count("shard-7") == MAX_ATTEMPTS


def test_a_users_error_is_raised_at_once(fake_cluster):
    error = DataError("weights of another architecture")
    pool, fake = fake_cluster({"s1": [task_error(error), "never"]})
    with pytest.raises(DataError) as caught:
        list(pool.map("index", ["s1"]))
    assert caught.value is error
    assert len(fake.calls) == 1  # not retried


def test_a_worker_that_cannot_start_stops_the_run_at_once(fake_cluster):
    pool, fake = fake_cluster({"s1": ["never"]})
    fake.starts = [actor_died(init_failed=True)]
    with pytest.raises(WorkerError, match="^a worker failed to start: worker killed: out of"):
        list(pool.map("index", ["s1"]))
    assert fake.calls == []


def test_no_capacity_fails_after_the_wait_with_one_line(fake_cluster):
    """The GPU node goes away before its actor comes up: nothing can host an actor any more."""
    gpu = [node(0), node(8, 1)]
    pool, fake = fake_cluster({"s1": ["never"]}, cluster=[gpu, gpu, [node(0)]], wait=0.2)
    fake.starts = [actor_died()]  # its node died: not the user's error, no retry counted
    began = time.monotonic()
    with pytest.raises(WorkerError) as caught:
        list(pool.map("index", ["s1"]))
    assert 0.2 <= time.monotonic() - began < 5 and fake.calls == []
    message = str(caught.value)
    assert "\n" not in message and message.startswith("no worker for 0.2 s (--worker-wait)")
    assert "each needs 1 GPU and 1 CPU; the cluster has 1 alive node with 0 GPUs" in message


def test_capacity_back_within_the_wait_goes_on(fake_cluster):
    gpu = [node(0), node(8, 1)]
    gone = [[node(0)]] * 3
    pool, fake = fake_cluster({"s1": ["r1"]}, cluster=[gpu, gpu, *gone, gpu], wait=5.0)
    fake.starts = [actor_died()]
    assert list(pool.map("index", ["s1"])) == ["r1"]
    assert len(fake.actors) == 2


def test_the_pool_grows_onto_gpus_that_join(fake_cluster):
    one, two = [node(0), node(8, 1)], [node(0), node(8, 1), node(8, 1)]
    script = {f"s{i}": [f"r{i}"] for i in range(4)}
    pool, fake = fake_cluster(script, cluster=[one, one, one, two])
    assert sorted(pool.map("index", list(script))) == sorted(f"r{i}" for i in range(4))
    assert len(fake.actors) == 2 and len({id(a) for _, a in fake.calls}) == 2
    assert [h["actors"] for h in pool.history] == [1, 2]


@pytest.fixture(scope="module")
def cluster():
    local = LocalCluster(env={"NINEBEST_FAULTS": "delay=0.4"})
    yield local
    local.shutdown()


def config(data: Path, out: Path, **kw) -> IndexConfig:
    base = dict(
        model="tiny_models:tiny", layers=LAYERS, batch_size=2, shard_size=4, decode_threads=1
    )
    return IndexConfig(data=str(data), out=str(out), **{**base, **kw})


class Run(threading.Thread):
    """`index(cfg)` on a thread: the driver keeps going while the test kills or adds nodes."""

    def __init__(self, cfg: IndexConfig):
        super().__init__(daemon=True)
        self.cfg, self.manifest, self.error = cfg, None, None
        self.start()

    def run(self) -> None:
        try:
            self.manifest = index(self.cfg, Progress(quiet=True))
        except Exception as e:  # handed to the test
            self.error = e

    def commits(self) -> list[dict]:
        store = Store(self.cfg.out)
        found = sorted(Path(self.cfg.out).glob(f"{layout.PARTIALS}/*/{layout.COMMIT}"))
        return [store.read_json(str(p.relative_to(self.cfg.out))) for p in found]

    def wait_commits(self, count: int, timeout: float = 120.0) -> list[dict]:
        deadline = time.time() + timeout
        while len(done := self.commits()) < count:
            assert self.is_alive(), f"the run ended early: {self.error!r}"
            assert time.time() < deadline, "no shard was committed"
            time.sleep(0.1)
        return done

    def result(self, timeout: float = 240.0) -> dict:
        self.join(timeout)
        assert not self.is_alive(), "the run hangs"
        if self.error is not None:
            raise self.error
        return self.manifest


def assert_brute_force(photos: Path, manifest: dict, out: Path) -> None:
    """The index equals brute force, and every shard and image counts once."""
    paths = sorted(photos.rglob("*.*"), key=lambda p: p.relative_to(photos).as_posix())
    ids = [p.relative_to(photos).as_posix() for p in paths]
    outputs = oracle.activations(
        load_model("tiny_models:tiny").module, list(LAYERS),
        torch.stack([oracle.load(p) for p in paths]),
    )  # fmt: skip
    rows = pd.read_parquet(out / "index").to_dict("records")
    oracle.compare(rows, outputs, ids, k=9, hashes=oracle.content_hashes(photos, ids))
    keys = [s["key"] for s in manifest["shards"]]
    assert len(keys) == len(set(keys)) == -(-len(ids) // 4)
    images = pd.read_parquet(out / "images.parquet")
    assert sorted(images.image_id) == ids
    for shard in manifest["shards"]:  # the manifest names the attempt the commit names
        record = partials.read_commit(Store(str(out)), shard["key"], manifest["run"])
        assert (record["attempt"], record["node"]) == (shard["attempt"], shard["node"])


@pytest.mark.multinode
def test_a_gpu_node_lost_mid_run_is_replaced_by_the_others(cluster, photos, tmp_path):
    cluster.resize(2)
    run = Run(config(photos, tmp_path / "out"))
    [first] = run.wait_commits(1)[:1]
    victim = first["node"]  # a node with an actor, most likely computing its next shard
    cluster.kill(cluster.node(victim))
    manifest = run.result()
    assert_brute_force(photos, manifest, tmp_path / "out")
    assert manifest["environment"]["devices"] == ["cpu"], "GPU assigned, no CUDA: CPU fallback"
    nodes = Counter(s["node"] for s in manifest["shards"])
    assert len(nodes) == 2 and nodes[victim] < sum(nodes.values()) / 2, nodes
    sizes = [h["actors"] for h in manifest["pool"]]
    assert max(sizes) == 2 and sizes[-1] == 1, manifest["pool"]


@pytest.mark.multinode
def test_all_gpu_nodes_lost_fails_within_worker_wait_then_resumes(cluster, photos, tmp_path):
    cluster.resize(1)
    out, wait = tmp_path / "out", 4.0
    run = Run(config(photos, out, worker_wait=wait))
    run.wait_commits(1)
    cluster.kill(cluster.workers[0])
    killed = time.monotonic()
    with pytest.raises(WorkerError) as failed:
        run.result()
    waited = time.monotonic() - killed
    message = str(failed.value)
    assert "\n" not in message and "--worker-wait" in message and "no node can host" in message
    assert "1 GPU" in message and "rerun the same command" in message, message
    assert wait <= waited <= DEAD_AFTER + wait + 30, waited  # 30 s: a slow shard, a slow CI
    kept = len(run.commits())
    assert 1 <= kept < 12 and not (out / "manifest.json").exists()
    cluster.resize(1)  # capacity is back
    manifest = Run(config(photos, out, worker_wait=wait)).result()
    assert manifest["counts"]["computed_shards"] == 12 - kept
    assert_brute_force(photos, manifest, out)


@pytest.mark.multinode
def test_a_node_that_joins_mid_run_computes_shards(cluster, photos, tmp_path):
    cluster.resize(1)
    run = Run(config(photos, tmp_path / "out", batch_size=1))  # 1.6 s a shard: time to join
    run.wait_commits(1)
    joined = cluster.add()
    manifest = run.result()
    assert_brute_force(photos, manifest, tmp_path / "out")
    nodes = Counter(s["node"] for s in manifest["shards"])
    assert nodes[joined.node_id] >= 1, (joined.node_id, nodes, manifest["pool"])
    actors = {s["actor"] for s in manifest["shards"]}
    assert len(actors) == 2 and None not in actors
    assert [h["actors"] for h in manifest["pool"]] == [1, 2], manifest["pool"]
