"""A pool of Ray actors that runs tasks with retries; the one place the map stages meet Ray.

Sizing. One actor per GPU when the cluster has GPUs (or when `gpus` asks for GPU actors that are
not there yet: an autoscaler adds nodes for pending actors), else up to `workers` CPU actors
sharing the CPUs; CPU actors get `num_cpus` so torch gets threads. The kind of actor and its Ray
options are fixed when the pool starts; the count follows the cluster: every second or so the
pool reads `ray.nodes()` and starts actors for GPUs (or CPUs, up to `workers`) that joined.

Placement. An actor gets tasks only once it is up (its `locate` call answered with the Ray node
and actor ids), so a task never waits behind an actor that no node can host. Each actor runs one
task at a time.

Failures. A task whose actor died (a worker crash, or its node lost: Ray declares a node dead
after its health checks fail, about 15 s with Ray's defaults when the node's processes die) is
retried on another actor; a task that raises an unexpected error is retried; a `NinebestError`
(the user's to fix) is raised at once; after MAX_ATTEMPTS failures of one task the run stops with
`WorkerError`. When work remains, no actor is up and no alive node can host one (every GPU node
lost, the local instance's raylet dead), the pool waits at most `wait` seconds for capacity (a
node joining, a spot replacement), then stops with a `WorkerError` naming what an actor needs
and what the cluster has; actors that nodes could host but that do not come up (resources taken
by other jobs) are waited for at most STARTUP_SECONDS (or `wait`, if longer). Every wait is
bounded: `ray.wait` returns at least every POLL_SECONDS.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ray

from pipeline.errors import NinebestError, WorkerError

MAX_ATTEMPTS = 3  # per task, across actor deaths and unexpected errors
POLL_SECONDS = 1.0  # longest a wait for results goes without looking at the cluster
NODES_EVERY = 1.0  # seconds between two reads of ray.nodes()
STARTUP_SECONDS = 600.0  # longest wait for a first actor on nodes that could host it


def alive_nodes() -> list[dict[str, float]]:
    """The total resources of every node Ray holds alive."""
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


@dataclass(frozen=True)
class Sizing:
    """What each actor asks for, and how many the cluster can hold."""

    gpu: bool  # one actor per GPU (else CPU actors)
    num_cpus: int  # CPUs per actor
    workers: int  # most CPU actors
    gpus: int  # GPU actors to ask for even while fewer GPUs are up (autoscaling from zero)

    @classmethod
    def from_cluster(cls, workers: int, threads: int, gpus: int, tasks: int) -> Sizing:
        nodes = alive_nodes()
        if sum(int(n.get("GPU", 0)) for n in nodes) >= 1 or gpus >= 1:
            gpu_nodes = [n for n in nodes if n.get("GPU", 0) >= 1]
            per_gpu = min((int(n.get("CPU", 0)) // int(n["GPU"]) for n in gpu_nodes), default=1)
            return cls(True, max(1, min(threads, per_gpu)), workers, gpus)
        # CPU actors: no more than the cluster's CPUs, and each must fit on a node
        node_cpus = [int(n.get("CPU", 0)) for n in nodes if n.get("CPU", 0) >= 1] or [1]
        count = max(1, min(workers, tasks, sum(node_cpus)))
        share = max(1, sum(node_cpus) // count)
        while share > 1 and sum(c // share for c in node_cpus) < count:
            share -= 1
        return cls(False, share, workers, 0)

    def options(self) -> dict[str, Any]:
        return (
            {"num_gpus": 1, "num_cpus": self.num_cpus} if self.gpu else {"num_cpus": self.num_cpus}
        )

    def hosts(self, node: dict[str, float]) -> int:
        """How many of these actors `node` can hold (GPU actors: one per GPU; `num_cpus` is
        what the tightest GPU node can spare per GPU)."""
        return int(node.get("GPU", 0)) if self.gpu else int(node.get("CPU", 0)) // self.num_cpus

    def capacity(self, nodes: list[dict[str, float]]) -> int:
        """Actors wanted on `nodes`: one per GPU (at least `gpus`), or up to `workers` CPU ones."""
        room = sum(self.hosts(n) for n in nodes)
        return max(room, self.gpus) if self.gpu else min(room, self.workers)

    def need(self) -> str:
        gpu = "1 GPU and " if self.gpu else ""
        return f"{gpu}{self.num_cpus} CPU{'s' if self.num_cpus > 1 else ''}"


def actor_options(workers: int, threads: int, tasks: int, gpus: int = 0) -> tuple[int, dict]:
    """(actors to start for `tasks` tasks on the cluster as it is now, their Ray options)."""
    sizing = Sizing.from_cluster(workers, threads, gpus, tasks)
    return max(1, min(sizing.capacity(alive_nodes()), tasks)), sizing.options()


def describe(nodes: list[dict[str, float]]) -> str:
    gpus = sum(int(n.get("GPU", 0)) for n in nodes)
    cpus = sum(int(n.get("CPU", 0)) for n in nodes)
    return f"{len(nodes)} alive node{'s' if len(nodes) != 1 else ''} with {gpus} GPUs, {cpus} CPUs"


def located(cls: type) -> type:
    """`cls` whose instances know the Ray node and actor they run on (`placement`), under the
    same name, so its worker processes stay `ray::<cls name>`."""

    class Located(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            context = ray.get_runtime_context()
            actor = context.get_actor_id() or "?"  # always set inside an actor
            self.placement = {"node": context.get_node_id(), "actor": actor}

        def locate(self) -> dict[str, str]:
            return self.placement

    Located.__name__ = cls.__name__
    Located.__qualname__ = cls.__qualname__
    return Located


@dataclass
class Member:
    """One actor of the pool."""

    handle: Any
    ready: ray.ObjectRef | None  # its pending `locate` call; None once it is up
    placement: dict[str, str] = field(default_factory=dict)
    running: int = 0  # its tasks in flight


# What the pool makes actors of: a class (ray.remote of a function would make a task, not an
# actor) built as `cls(*args, threads=n)`, n being the CPUs the actor holds (torch's thread
# count), whose methods take and return plain picklable values.
Worker = type[object]


class Pool:
    """Actors of `cls(*args, threads=n)`; `map` runs one method over many tasks."""

    def __init__(
        self, cls: Worker, args: tuple, workers: int, threads: int, tasks: int,
        wait: float = 300.0, gpus: int = 0, in_flight: int = 1,
    ):  # fmt: skip
        self.sizing = Sizing.from_cluster(workers, threads, gpus, tasks)
        self.in_flight = in_flight  # tasks per actor at once (threads of one actor process)
        self.factory: Any = ray.remote(located(cls)).options(
            max_restarts=0, max_concurrency=in_flight, **self.sizing.options()
        )
        self.args = args
        self.threads = self.sizing.num_cpus  # the actor's torch threads: the CPUs it holds
        self.wait = wait
        self.members: list[Member] = []
        self.started = time.monotonic()
        self.history: list[dict[str, float]] = []  # {"seconds", "actors"} at every change
        self.nodes: list[dict[str, float]] = []
        self.nodes_read = float("-inf")
        self.idle_since: float | None = None  # since when work waits with no actor up
        self.empty_since: float | None = None  # ... and no node can host one

    def map(
        self, method: str, tasks: list, call: Callable[[Any], tuple] = lambda t: (t,), name=str
    ) -> Iterator[Any]:
        """Yield `actor.method(*call(task))` for every task, in completion order."""
        queue = deque((task, 1) for task in tasks)
        running: dict[ray.ObjectRef, tuple[Any, int, Member]] = {}
        self.idle_since = self.empty_since = None
        while queue or running:
            self._grow(len(queue) + len(running))
            for level in range(self.in_flight):  # every actor gets one task before a second
                for member in self.members:
                    if queue and member.ready is None and member.running == level:
                        task, attempt = queue.popleft()
                        ref = getattr(member.handle, method).remote(*call(task))
                        running[ref] = (task, attempt, member)
                        member.running += 1
            self._check_starved()
            starting = {m.ready: m for m in self.members if m.ready is not None}
            if not running and not starting:  # no actor at all: wait for capacity to return
                time.sleep(POLL_SECONDS)
                continue
            done, _ = ray.wait([*running, *starting], num_returns=1, timeout=POLL_SECONDS)
            for ref in done:
                if ref in starting:
                    self._started(starting[ref])
                    continue
                task, attempt, member = running.pop(ref)
                member.running -= 1
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    self._drop(member)
                    _give_up_if(attempt, name(task), e, init_failed=_init_failed(e))
                    queue.appendleft((task, attempt + 1))
                except ray.exceptions.RayTaskError as e:
                    if isinstance(e.cause, NinebestError):
                        raise e.cause from None
                    _give_up_if(attempt, name(task), e)
                    queue.appendleft((task, attempt + 1))

    def up(self) -> int:
        """Actors up now."""
        return sum(m.ready is None for m in self.members)

    def _grow(self, remaining: int) -> None:
        """Start actors for capacity that joined (never more than the tasks left)."""
        now = time.monotonic()
        if now - self.nodes_read >= NODES_EVERY:
            self.nodes, self.nodes_read = alive_nodes(), now
        wanted = min(self.sizing.capacity(self.nodes), remaining)
        for _ in range(wanted - len(self.members)):
            handle = self.factory.remote(*self.args, threads=self.threads)
            self.members.append(Member(handle, handle.locate.remote()))

    def _started(self, member: Member) -> None:
        assert member.ready is not None
        try:
            member.placement = ray.get(member.ready)
        except ray.exceptions.RayActorError as e:
            self._drop(member)
            if _init_failed(e):
                _give_up_if(1, "", e, init_failed=True)
            return  # its node went away before it came up
        member.ready = None
        self._record()

    def _drop(self, member: Member) -> None:
        ray.kill(member.handle, no_restart=True)
        if member in self.members:
            self.members.remove(member)
            self._record()

    def _record(self) -> None:
        up = self.up()
        if not self.history or self.history[-1]["actors"] != up:
            seconds = round(time.monotonic() - self.started, 3)
            self.history.append({"seconds": seconds, "actors": up})

    def _check_starved(self) -> None:
        """Fail when work has waited `wait` seconds with no actor up and no node able to host
        one, or STARTUP_SECONDS (at least `wait`) with no actor up although nodes could."""
        now = time.monotonic()
        if self.up():
            self.idle_since = self.empty_since = None
            return
        hostable = any(self.sizing.hosts(n) for n in self.nodes)
        self.idle_since = self.idle_since if self.idle_since is not None else now
        self.empty_since = None if hostable else (self.empty_since or now)
        have = describe(self.nodes)
        need = self.sizing.need()
        if self.empty_since is not None and now - self.empty_since > self.wait:
            raise WorkerError(
                f"no worker for {self.wait:g} s (--worker-wait): no node can host one (each "
                f"needs {need}; the cluster has {have}), its nodes are gone or were never added; "
                "add nodes or raise --worker-wait, then rerun the same command to resume "
                "(finished shards are kept)"
            )
        limit = max(self.wait, STARTUP_SECONDS)
        if now - self.idle_since > limit:
            raise WorkerError(
                f"no worker came up in {limit:g} s although {have} could host one (each needs "
                f"{need}): their resources are taken by other jobs, or workers cannot start; "
                "free them or raise --worker-wait, then rerun the same command to resume "
                "(finished shards are kept)"
            )

    def close(self) -> None:
        for member in self.members:
            ray.kill(member.handle, no_restart=True)
        self.members = []

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _init_failed(error: Exception) -> bool:
    return bool(getattr(error, "actor_init_failed", False))


def _give_up_if(attempt: int, task: str, error: Exception, init_failed: bool = False) -> None:
    if not init_failed and attempt < MAX_ATTEMPTS:
        return
    detail = str(error).strip().splitlines()[-1][:300]
    why = "a worker failed to start" if init_failed else f"{task} failed {attempt} times"
    raise WorkerError(f"{why}: {detail}") from error
