"""Transient storage failures are retried with backoff; permanent ones and the last are raised."""

from __future__ import annotations

import pytest

from pipeline.store import retry
from pipeline.store.retry import with_retries


@pytest.fixture
def pauses(monkeypatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(retry.time, "sleep", slept.append)
    return slept


def flaky(failures: list[BaseException]):
    calls = []

    def call() -> str:
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return "ok"

    return call, calls


def test_transient_failures_are_retried_with_doubling_pauses(pauses):
    call, calls = flaky([ConnectionResetError("reset"), TimeoutError("slow")])
    assert with_retries(call, attempts=4, backoff=0.5) == "ok"
    assert len(calls) == 3 and pauses == [0.5, 1.0]


def test_the_last_failure_is_raised_after_every_attempt(pauses):
    call, calls = flaky([OSError("1"), OSError("2"), OSError("3")])
    with pytest.raises(OSError, match="3"):
        with_retries(call, attempts=3)
    assert len(calls) == 3 and pauses == [retry.BACKOFF_SECONDS, 2 * retry.BACKOFF_SECONDS]


@pytest.mark.parametrize("error", [FileNotFoundError("gone"), PermissionError("no")])
def test_permanent_failures_are_not_retried(pauses, error):
    call, calls = flaky([error])
    with pytest.raises(type(error)):
        with_retries(call, attempts=5)
    assert len(calls) == 1 and pauses == []


def test_errors_that_are_not_oserrors_pass_through(pauses):
    call, calls = flaky([ValueError("a bug, not the network")])
    with pytest.raises(ValueError):
        with_retries(call, attempts=5)
    assert len(calls) == 1
