"""User-facing errors.

Every error a user can fix (bad flag, bad data, bad weights) is a `NinebestError`; the CLI prints
it as one line and exits non-zero. Each subclass also derives from the matching builtin so callers
can catch `ValueError` / `FileNotFoundError` as usual. Internal invariants use `assert`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class NinebestError(Exception):
    """Base of every error that the CLI reports as one line."""


class ConfigError(NinebestError, ValueError):
    """A flag, job spec or model/layer choice is invalid."""


class DataError(NinebestError, ValueError):
    """The dataset, a manifest or an output folder cannot be used as asked."""


class InputNotFoundError(NinebestError, FileNotFoundError):
    """A path or URL the user named does not exist."""


class WorkerError(NinebestError, RuntimeError):
    """A shard kept failing on the workers, or a worker could not start."""


def closest(name: str, options: Iterable[str], n: int = 5) -> str:
    """Format the closest valid options to `name` for an error message."""
    options = list(options)
    near = difflib.get_close_matches(name, options, n=n, cutoff=0.4)
    if not near:
        near = options[:n]
    more = "" if len(options) <= len(near) else f" ({len(options)} in all)"
    return ", ".join(repr(o) for o in near) + more
