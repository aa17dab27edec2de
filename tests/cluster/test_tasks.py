"""cluster.tasks on a real local Ray instance: every call's result once, as tasks finish; a task
whose worker dies is retried; errors come back as one line; every wait is bounded; an actor's
resources are seen released."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import ray

from pipeline.cluster import tasks
from pipeline.errors import DataError, WorkerError

pytestmark = pytest.mark.usefixtures("ray_local")


def square(x: int, pause: float = 0.0) -> int:
    time.sleep(pause)
    return x * x


def die_once(marker: str) -> int:
    """Kills its own worker process on the first call (the marker file says it did)."""
    path = Path(marker)
    if not path.exists():
        path.write_text("died")
        os._exit(1)
    return os.getpid()


def fail(kind: str) -> None:
    if kind == "user":
        raise DataError("the data is bad; fix it")
    raise KeyError("something unexpected\nsecond line")


def test_every_call_comes_back_once_with_its_position():
    pauses = [0.3, 0.0, 0.1, 0.0, 0.2]
    got = list(tasks.run(square, [(i, p) for i, p in enumerate(pauses)]))
    assert sorted(got) == [(i, i * i) for i in range(len(pauses))]
    assert list(tasks.run(square, [])) == []
    assert tasks.connected() and tasks.cpus() == 2


def test_a_task_whose_worker_died_is_retried(tmp_path):
    [(i, pid)] = list(tasks.run(die_once, [(str(tmp_path / "marker"),)]))
    assert i == 0 and pid != os.getpid() and (tmp_path / "marker").exists()


def test_errors_are_one_line_and_user_errors_pass_through():
    with pytest.raises(DataError, match="the data is bad; fix it"):
        list(tasks.run(fail, [("user",)]))
    with pytest.raises(WorkerError) as e:
        list(tasks.run(fail, [("bug",)], name=lambda i: f"group {i}"))
    assert str(e.value).startswith("group 0 failed: ") and "\n" not in str(e.value)


def test_no_node_able_to_run_a_task_fails_within_the_wait():
    started = time.monotonic()
    why = r"1 task waited 1 s .*\(each needs 64 CPUs; the cluster has 1 alive node, 2 CPUs\)"
    with pytest.raises(WorkerError, match=why):
        list(tasks.run(square, [(1,)], num_cpus=64, wait=1.0))
    assert time.monotonic() - started < 10


def test_a_task_that_never_finishes_fails_within_the_stall_bound():
    with pytest.raises(WorkerError, match=r"no task finished in 1 s \(1 left"):
        list(tasks.run(square, [(1, 60.0)], stall=1.0))
    assert tasks.wait_released({"CPU": 0.0, "GPU": 0.0}, timeout=20) is not None  # cancelled


def test_released_resources_are_seen_after_an_actor_is_killed():
    before = tasks.held()
    assert before == {"CPU": 0.0, "GPU": 0.0}

    @ray.remote(num_cpus=1)
    class Holder:
        def ping(self) -> int:
            return 1

    holder = Holder.remote()
    ray.get(holder.ping.remote())
    assert tasks.wait_released(before, timeout=0.5) is None  # it still holds a CPU
    ray.kill(holder, no_restart=True)
    assert tasks.wait_released(before, timeout=20) is not None
    assert tasks.held() == before
