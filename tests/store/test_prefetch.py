"""Reading ahead on threads: order kept, bounded, errors raised where the results are consumed."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.store.prefetch import background, prefetch


def test_prefetch_keeps_order_and_bounds_the_work_in_flight():
    lock, running, most = threading.Lock(), [0], [0]

    def work(i: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.002 * (i % 3))  # finish out of order
        with lock:
            running[0] -= 1
        return i * i

    started = []
    items = (started.append(i) or i for i in range(40))
    stream = prefetch(work, items, threads=4, window=6)
    assert next(stream) == 0
    assert len(started) <= 7  # the window, plus the one taken to refill it
    assert [0, *stream] == [i * i for i in range(40)]
    assert most[0] <= 4


def test_prefetch_raises_the_error_of_its_item():
    def work(i: int) -> int:
        if i == 3:
            raise OSError("unreadable 3")
        return i

    stream = prefetch(work, range(10), threads=2, window=4)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(OSError, match="unreadable 3"):
        next(stream)


def test_background_runs_ahead_and_re_raises_in_the_consumer():
    def items():
        yield from range(3)
        raise ValueError("broken at 3")

    stream = background(items(), size=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="broken at 3"):
        next(stream)


def test_background_stops_its_thread_and_closes_the_source_when_abandoned():
    closed = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.set()

    stream = background(endless(), size=3)
    assert next(stream) == 0
    stream.close()  # the consumer stops early, e.g. a shard restarted
    assert closed.wait(5)
    assert not any(t.name == "ninebest-reader" and t.is_alive() for t in threading.enumerate())
