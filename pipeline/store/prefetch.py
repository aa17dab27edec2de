"""Iterate ahead on threads, in order and bounded, so I/O overlaps the work that consumes it.

* `prefetch(fn, items, threads, window)`: `fn` mapped over `items` on a thread pool (the map
  stage's reads and decodes, the reduce's partial reads), results in input order, at most
  `window` in flight.
* `background(items, size)`: one iterator run on a daemon thread at most `size` items ahead
  (a container streamed front to back); its exceptions re-raise in the consumer.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

_DONE = object()


def background(items: Iterator, size: int) -> Iterator:
    """Iterate `items` on a daemon thread, at most `size` ahead; its exceptions re-raise here.

    Stops the thread when the consumer stops early (an error, or a shard restarted).
    """
    buffer: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(value: object) -> bool:
        while not stop.is_set():
            try:
                buffer.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, which raises it
            put(e)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator holding the open file

    thread = threading.Thread(target=produce, daemon=True, name="ninebest-reader")
    thread.start()
    try:
        while (value := buffer.get()) is not _DONE:
            if isinstance(value, BaseException):
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


def prefetch(fn: Callable, items: Iterable, threads: int, window: int) -> Iterator:
    """Map `fn` over `items` on a thread pool, in order, with at most `window` in flight."""
    items = iter(items)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending = deque(pool.submit(fn, item) for item in itertools.islice(items, window))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(items, 1):
                pending.append(pool.submit(fn, item))
            yield result
