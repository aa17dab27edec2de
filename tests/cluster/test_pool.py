"""cluster.pool without a Ray instance: placement on fake node lists, retries on fake actors.

`actor_options` reads `ray.nodes()`, monkeypatched here to return node lists as Ray spells them.
`Pool.map` runs on a stand-in for the `ray` module whose actors answer from a script: each task
has a list of outcomes, one per attempt (a value, or the exception `ray.get` raises).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray
from hypothesis import given
from hypothesis import strategies as st

import pipeline.cluster.pool
from pipeline.cluster.pool import MAX_ATTEMPTS, Pool, actor_options
from pipeline.errors import DataError, WorkerError


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


# Pool.map on scripted actors


class Ref:
    def __init__(self, outcome):
        self.outcome = outcome


class Actor:
    def __init__(self, script: dict, log: list, args: tuple):
        self.args, self.alive = args, True
        self.index = SimpleNamespace(remote=lambda *call: self._call(script, log, call))

    def _call(self, script, log, call) -> Ref:
        assert self.alive, "a killed actor got a task"
        log.append((call, self))
        return Ref(script[call[0]].pop(0))


class Factory:
    """`ray.remote(cls)`: records its `.options()`, starts scripted actors."""

    def __init__(self, fake: FakeRay):
        self.fake = fake

    def options(self, **options) -> Factory:
        self.fake.options = options
        return self

    def remote(self, *args, threads: int) -> Actor:
        actor = Actor(self.fake.script, self.fake.calls, (*args, threads))
        self.fake.actors.append(actor)
        return actor


class FakeRay:
    """What pool.py uses of `ray`: nodes (one of 8 CPUs), remote, wait, get, kill, exceptions."""

    exceptions = ray.exceptions

    def __init__(self, script: dict[str, list]):
        self.script, self.calls, self.actors, self.options = script, [], [], None

    def nodes(self) -> list[dict]:
        return [node(8)]

    def remote(self, cls: type) -> Factory:
        return Factory(self)

    def wait(self, refs: list[Ref], num_returns: int) -> tuple[list[Ref], list[Ref]]:
        return refs[:num_returns], refs[num_returns:]  # the oldest running task finishes first

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
def cluster(monkeypatch):
    """make(script) -> (a Pool on one fake 8-CPU node, the fake ray that runs it)."""

    def make(script: dict[str, list]) -> tuple[Pool, FakeRay]:
        fake = FakeRay(script)
        monkeypatch.setattr(pipeline.cluster.pool, "ray", fake)
        return Pool(object, ("settings",), workers=2, threads=1, tasks=len(script)), fake

    return make


def test_pool_starts_its_actors_with_the_placement_and_threads(cluster):
    pool, fake = cluster({"s1": [1]})
    assert len(pool.actors) == 1  # one task: one actor, with every CPU
    assert fake.options == {"max_restarts": 0, "num_cpus": 8}
    assert pool.actors[0].args == ("settings", 8)  # the actor learns its thread count (threads=)
    with pool:
        pass
    assert not pool.actors[0].alive  # closed on exit


def test_map_yields_every_result_with_the_call_arguments(cluster):
    pool, fake = cluster({"s1": ["r1"], "s2": ["r2"], "s3": ["r3"]})
    results = list(pool.map("index", ["s1", "s2", "s3"], call=lambda t: (t, "extra")))
    assert sorted(results) == ["r1", "r2", "r3"]
    assert [call for call, _ in fake.calls] == [("s1", "extra"), ("s2", "extra"), ("s3", "extra")]
    assert {id(actor) for _, actor in fake.calls} == {id(a) for a in pool.actors}  # both worked


def test_an_unexpected_error_is_retried_on_the_same_actor(cluster):
    pool, fake = cluster({"s1": [task_error(RuntimeError("flaky")), "r1"], "s2": ["r2"]})
    assert sorted(pool.map("index", ["s1", "s2"])) == ["r1", "r2"]
    assert [call[0] for call, _ in fake.calls] == ["s1", "s2", "s1"]
    assert len(fake.actors) == 2 and all(a.alive for a in fake.actors)  # nobody replaced


def test_a_dead_actor_is_replaced_and_its_task_retried(cluster):
    pool, fake = cluster({"s1": [actor_died(), "r1"], "s2": ["r2"]})
    dead = pool.actors[0]
    assert sorted(pool.map("index", ["s1", "s2"])) == ["r1", "r2"]
    assert not dead.alive and dead not in pool.actors
    fresh = pool.actors[0]
    assert fresh is fake.actors[2] and fresh.args == dead.args
    assert [(call[0], actor) for call, actor in fake.calls][-1] == ("s1", fresh)


def test_a_task_that_keeps_failing_stops_the_run_naming_it(cluster):
    failures = [task_error(RuntimeError("cuda oom")), actor_died(), task_error(ValueError("nan"))]
    assert len(failures) == MAX_ATTEMPTS
    pool, fake = cluster({"shard-7": failures + ["never"], "s2": ["r2"]})
    with pytest.raises(WorkerError) as caught:
        list(pool.map("index", ["shard-7", "s2"], name=lambda t: f"shard {t}"))
    assert str(caught.value) == "shard shard-7 failed 3 times: ValueError: nan"
    assert caught.value.__cause__ is failures[-1]
    assert [call[0] for call, _ in fake.calls].count("shard-7") == MAX_ATTEMPTS


def test_a_users_error_is_raised_at_once(cluster):
    error = DataError("weights of another architecture")
    pool, fake = cluster({"s1": [task_error(error), "never"]})
    with pytest.raises(DataError) as caught:
        list(pool.map("index", ["s1"]))
    assert caught.value is error
    assert len(fake.calls) == 1  # not retried


def test_a_worker_that_cannot_start_stops_the_run_at_once(cluster):
    pool, fake = cluster({"s1": [actor_died(init_failed=True), "never"]})
    with pytest.raises(WorkerError, match="^a worker failed to start: worker killed: out of"):
        list(pool.map("index", ["s1"]))
    assert len(fake.calls) == 1
