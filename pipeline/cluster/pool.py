"""A pool of Ray actors that runs tasks with retries; the one place the map stages meet Ray.

One actor per GPU when the cluster has GPUs, else `workers` CPU actors sharing the CPUs (an actor
asking for a GPU on a CPU-only cluster would wait forever, so the choice is made from
`ray.cluster_resources()` at run time; CPU actors get `num_cpus` so torch gets threads). Each
actor runs one task at a time. A task whose actor dies is retried on a fresh actor that replaces
the dead one; a task that raises an unexpected error is retried; a `NinebestError` (the user's to
fix) is raised at once. After MAX_ATTEMPTS failures of one task the run stops with WorkerError.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import ray

from pipeline.errors import NinebestError, WorkerError

MAX_ATTEMPTS = 3  # per task, across actor deaths and unexpected errors


def actor_options(workers: int, threads: int, tasks: int) -> tuple[int, dict[str, Any]]:
    """(actor count, Ray options) for `tasks` tasks on the connected cluster."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpus = sum(int(n.get("GPU", 0)) for n in nodes)
    if gpus >= 1:  # one actor per GPU, with the CPUs its node can spare per GPU
        per_gpu = min(int(n.get("CPU", 0)) // int(n["GPU"]) for n in nodes if n.get("GPU", 0) >= 1)
        count = min(gpus, tasks)
        return count, {"num_gpus": 1, "num_cpus": max(1, min(threads, per_gpu))}
    # CPU actors: no more than the cluster's CPUs, and each must fit on a node (an actor that
    # cannot be placed would wait forever)
    node_cpus = [int(n.get("CPU", 0)) for n in nodes if n.get("CPU", 0) >= 1] or [1]
    count = max(1, min(workers, tasks, sum(node_cpus)))
    share = max(1, sum(node_cpus) // count)
    while share > 1 and sum(c // share for c in node_cpus) < count:
        share -= 1
    return count, {"num_cpus": share}


# What the pool makes actors of: a class (ray.remote of a function would make a task, not an
# actor) built as `cls(*args, threads=n)`, n being the CPUs the actor holds (torch's thread
# count), whose methods take and return plain picklable values.
Worker = type[object]


class Pool:
    """`count` actors of `cls(*args, threads=n)`; `map` runs one method over many tasks."""

    def __init__(self, cls: Worker, args: tuple, workers: int, threads: int, tasks: int):
        count, options = actor_options(workers, threads, tasks)
        self.factory = ray.remote(cls).options(max_restarts=0, **options)
        self.args = args
        self.threads: int = options["num_cpus"]
        self.actors = [self._start() for _ in range(count)]

    def _start(self) -> Any:
        return self.factory.remote(*self.args, threads=self.threads)

    def map(
        self, method: str, tasks: list, call: Callable[[Any], tuple] = lambda t: (t,), name=str
    ) -> Iterator[Any]:
        """Yield `actor.method(*call(task))` for every task, in completion order."""
        queue = deque((task, 1) for task in tasks)
        running: dict[ray.ObjectRef, tuple[Any, int, Any]] = {}

        def submit(actor) -> None:
            if queue:
                task, attempt = queue.popleft()
                running[getattr(actor, method).remote(*call(task))] = (task, attempt, actor)

        for actor in self.actors:
            submit(actor)
        while running:
            [done], _ = ray.wait(list(running), num_returns=1)
            task, attempt, actor = running.pop(done)
            try:
                yield ray.get(done)
            except ray.exceptions.RayActorError as e:
                _give_up_if(attempt, name(task), e, init_failed=_init_failed(e))
                queue.appendleft((task, attempt + 1))
                actor = self._replace(actor)
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, NinebestError):
                    raise e.cause from None
                _give_up_if(attempt, name(task), e)
                queue.appendleft((task, attempt + 1))
            submit(actor)

    def _replace(self, dead) -> Any:
        ray.kill(dead, no_restart=True)
        fresh = self._start()
        self.actors[self.actors.index(dead)] = fresh
        return fresh

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)

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
