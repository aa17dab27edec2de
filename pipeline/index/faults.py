"""Test-only fault injection for the map workers and the reduce's tasks (after each partial
they merge: index/reduce_tree.py), driven by one environment variable.

NINEBEST_FAULTS="exit_once=/tmp/marker;delay=0.2" makes a worker
- exit_once=PATH: kill its own process after the first batch of a shard, once per PATH (the
  first worker to create PATH dies; later attempts run normally), as a crashed node would;
- delay=SECONDS: sleep after every batch, so a test can interrupt a run midway.
Unset (always, outside tests) it costs one dictionary lookup per batch.
"""

from __future__ import annotations

import os
import time

VARIABLE = "NINEBEST_FAULTS"


def _settings() -> dict[str, str]:
    raw = os.environ.get(VARIABLE, "")
    return dict(item.split("=", 1) for item in raw.split(";") if "=" in item)


def after_batch() -> None:
    """Called by the worker after each batch of a shard."""
    settings = _settings()
    if not settings:
        return
    if "delay" in settings:
        time.sleep(float(settings["delay"]))
    marker = settings.get("exit_once")
    if marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os._exit(17)  # no cleanup, like a killed process
