"""Run one module-level function over many argument tuples as Ray tasks on the cluster's CPUs.

`run(fn, calls)` submits `fn(*call)` for every call at once, each asking `num_cpus` CPUs, and
yields `(i, result)` as tasks finish (completion order, `i` the call's position). Ray schedules
them on whatever nodes have CPUs free, so a cluster's CPUs share the work and nodes that join take
some of it. `fn` must be a module-level function of an importable module (Ray's workers import it
by name) whose arguments and result pickle.

Failures. A task whose worker process or node died is resubmitted by Ray, up to MAX_RETRIES times
(the driver owns the task, so a lost node only costs the tasks it ran); a result lost with its
node is recomputed the same way. An error raised by `fn` itself is not retried: a
`NinebestError` (the user's to fix) is raised as it is, anything else as a one-line
`WorkerError` naming the task. Every wait is bounded: `ray.wait` returns at least every
POLL_SECONDS; when no alive node has `num_cpus` CPUs for `wait` seconds, or no task finishes for
`stall` seconds, the run stops with a `WorkerError` saying which and what to do. Tasks not
finished when the caller stops (an error, or it stops reading) are cancelled.

`cpus()` is what the caller sizes its work by: the CPUs of the cluster's alive nodes, 0 when this
process is not connected to Ray. `held()` and `wait_released()` let a caller start tasks only
once the actors of a stage before are gone: `held()` before the stage, `wait_released(before)`
after it waits (bounded) until the cluster holds no more CPUs and GPUs than it did.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray

from pipeline.errors import NinebestError, WorkerError

MAX_RETRIES = 3  # resubmissions of a task whose worker or node died (Ray's system retries)
POLL_SECONDS = 1.0  # longest a wait for results goes without looking at the cluster
NODES_EVERY = 1.0  # seconds between two reads of ray.nodes() while nothing finishes
STALL_SECONDS = 1800.0  # longest wait for the next task to finish, by default
RELEASE_SECONDS = 30.0  # longest wait for a finished stage's actors to give their resources back
RESOURCES = ("CPU", "GPU")


def connected() -> bool:
    """Whether this process holds a Ray session (the driver's, from `connect.ray_session`)."""
    return ray.is_initialized()


def cpus() -> int:
    """The CPUs of the cluster's alive nodes (0 when not connected to Ray)."""
    if not ray.is_initialized():
        return 0
    return int(sum(n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")))


def held() -> dict[str, float]:
    """The cluster's CPUs and GPUs held by actors and tasks now (empty when not connected)."""
    if not ray.is_initialized():
        return {}
    total, available = ray.cluster_resources(), ray.available_resources()
    return {kind: total.get(kind, 0.0) - available.get(kind, 0.0) for kind in RESOURCES}


def wait_released(before: dict[str, float], timeout: float = RELEASE_SECONDS) -> float | None:
    """Wait until the cluster holds no more than `before` (a `held()` reading) again, as it
    does once the actors started since are gone (nodes lost or joined meanwhile change what is
    held by what they held: nothing then); return the seconds waited, or None after `timeout`
    (other jobs took resources meanwhile: tasks then queue for them, bounded by `run`). Ray
    reports released resources within about a second of an actor's death."""
    started = time.monotonic()
    while True:
        now = held()
        if all(now.get(kind, 0.0) <= amount + 1e-6 for kind, amount in before.items()):
            return round(time.monotonic() - started, 3)
        if time.monotonic() - started > timeout:
            return None
        time.sleep(0.05)


def run(
    fn: Callable[..., Any],
    calls: Sequence[tuple],
    num_cpus: float = 1,
    wait: float = 300.0,
    stall: float = STALL_SECONDS,
    name: Callable[[int], str] = lambda i: f"task {i}",
) -> Iterator[tuple[int, Any]]:
    """Yield `(i, fn(*calls[i]))` for every call as its Ray task finishes (see the module)."""
    remote = ray.remote(fn).options(
        num_cpus=num_cpus, max_retries=MAX_RETRIES, retry_exceptions=False
    )
    pending = {remote.remote(*call): i for i, call in enumerate(calls)}
    waiting = Waiting(num_cpus, wait, stall, time.monotonic())
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
            if not done:
                waiting.check(time.monotonic(), len(pending))
                continue
            for ref in done:
                i = pending.pop(ref)
                yield i, _result(ref, name(i))
            waiting.progress(time.monotonic())
    finally:
        for ref in pending:  # the caller stopped early: free the CPUs
            ray.cancel(ref, force=True)


def _result(ref: ray.ObjectRef, task: str) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:  # raised by the function itself
        if isinstance(e.cause, NinebestError):
            raise e.cause from None
        raise WorkerError(f"{task} failed: {_last_line(e)}") from e
    except ray.exceptions.RayError as e:  # its worker or node died once more than retried
        raise WorkerError(
            f"{task} failed {MAX_RETRIES + 1} times (its worker or node died: {_last_line(e)}); "
            "check the cluster's nodes, then rerun the same command (finished shards are kept)"
        ) from e


def _last_line(error: Exception) -> str:
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[-1][:300]


class Waiting:
    """The bounds on a wait for tasks: capacity gone for `wait` s, or no result for `stall` s."""

    def __init__(self, num_cpus: float, wait: float, stall: float, now: float):
        self.num_cpus, self.wait, self.stall = num_cpus, wait, stall
        self.last_result = now  # when a task last finished (or the run began)
        self.empty_since: float | None = None  # since when no alive node can run a task
        self.nodes_read = float("-inf")
        self.have = "no node read yet"

    def progress(self, now: float) -> None:
        self.last_result, self.empty_since = now, None

    def check(self, now: float, left: int) -> None:
        """Raise `WorkerError` once a bound is passed; read the nodes at most every NODES_EVERY."""
        if now - self.nodes_read >= NODES_EVERY:
            self.nodes_read = now
            nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
            hostable = any(n.get("CPU", 0) >= self.num_cpus for n in nodes)
            self.empty_since = None if hostable else (self.empty_since or now)
            cpus = int(sum(n.get("CPU", 0) for n in nodes))
            self.have = f"{len(nodes)} alive node{'s' if len(nodes) != 1 else ''}, {cpus} CPUs"
        need = f"{self.num_cpus:g} CPU{'s' if self.num_cpus != 1 else ''}"
        if self.empty_since is not None and now - self.empty_since > self.wait:
            raise WorkerError(
                f"{left} task{'s' if left != 1 else ''} waited {self.wait:g} s (--worker-wait) "
                "with no node able to run "
                f"one (each needs {need}; the cluster has {self.have}); add nodes or raise "
                "--worker-wait, then rerun the same command (finished shards are kept)"
            )
        if now - self.last_result > self.stall:
            raise WorkerError(
                f"no task finished in {self.stall:g} s ({left} left, each needing {need}; the "
                f"cluster has {self.have}): their CPUs are taken by other jobs or the tasks "
                "hang; free CPUs, then rerun the same command (finished shards are kept)"
            )
