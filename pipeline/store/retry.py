"""Retry a storage call through transient failures, with exponential backoff.

Object stores throttle, drop connections and tear uploads; local disks do not. What is retried is
an OSError that is not `permanent` (a missing file stays missing): `attempts` tries in all,
sleeping `backoff`, then twice that, and so on between them. The last failure is raised as is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
PERMANENT: tuple[type[OSError], ...] = (
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileNotFoundError,
)
BACKOFF_SECONDS = 0.2  # the first pause; doubled after each failure


def with_retries(
    call: Callable[[], T],
    attempts: int,
    permanent: tuple[type[OSError], ...] = PERMANENT,
    backoff: float | None = None,
) -> T:
    """`call()`, retried on transient OSErrors; at most `attempts` calls."""
    pause = BACKOFF_SECONDS if backoff is None else backoff
    for attempt in range(attempts - 1):
        try:
            return call()
        except permanent:
            raise
        except OSError:
            time.sleep(pause * 2**attempt)
    return call()
