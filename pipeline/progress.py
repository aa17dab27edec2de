"""Progress display for the driver: shards done, images/s, bad images, then a summary.

On a terminal the line is redrawn in place; in logs (Ray jobs, CI) a line is printed at most
every `interval` seconds, and always for the last shard.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None, interval: float = 5.0, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.interval = interval
        self.quiet = quiet
        self.tty = self.stream.isatty()
        self.total = self.done = self.resumed = self.images = self.bad = 0
        self.started = self.last_print = 0.0

    def start(self, total: int, resumed: int) -> None:
        self.total, self.done, self.resumed = total, resumed, resumed
        self.started = time.perf_counter()
        if resumed:
            self._write(f"resuming: {resumed} of {total} shards already done")

    def shard_done(self, record: Mapping[str, Any]) -> None:
        self.done += 1
        self.images += record["images"]
        self.bad += record["bad"]
        now = time.perf_counter()
        if self.tty or self.done == self.total or now - self.last_print >= self.interval:
            self.last_print = now
            rate = self.images / max(now - self.started, 1e-9)
            line = (
                f"map: {self.done}/{self.total} shards | {self.images} images | "
                f"{rate:.1f} img/s | {self.bad} bad"
            )
            self._write(line, redraw=self.tty and self.done < self.total)

    def finish(self, manifest: dict[str, Any]) -> None:
        counts, timings = manifest["counts"], manifest["timings"]
        self._write(
            f"indexed {counts['indexed']} of {counts['images']} images ({counts['bad']} bad) "
            f"into {len(manifest['layers'])} layers, {counts['index_rows']} index rows, "
            f"in {timings['total_seconds']:.1f} s (map {timings['map_seconds']:.1f} s, "
            f"reduce {timings['reduce_seconds']:.1f} s)"
        )

    def say(self, line: str) -> None:
        """One line of its own (a summary), unless quiet."""
        self._write(line)

    def _write(self, line: str, redraw: bool = False) -> None:
        if self.quiet:
            return
        end = "\r" if redraw else "\n"
        prefix = "\r" if self.tty else ""
        self.stream.write(f"{prefix}{line}{end}")
        self.stream.flush()
