"""Shared fixtures for the fast, in-memory unit tests."""

from __future__ import annotations

import argon2
import pytest
from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

# A real argon2id hash, made cheap so each verification takes about a millisecond.
_CHEAP_ARGON2 = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def _run_in_thread_synchronously(function, *args, **kwargs) -> defer.Deferred:
    return defer.maybeDeferred(function, *args, **kwargs)


def _result_of(deferred: defer.Deferred):
    results = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired synchronously"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


@pytest.fixture
def run_in_thread():
    """A ``run_in_thread`` that runs the work at once (no thread pool, no reactor)."""
    return _run_in_thread_synchronously


@pytest.fixture
def result_of():
    """Return the result of an already-fired Deferred, re-raising its failure."""
    return _result_of


@pytest.fixture
def log_lines():
    """The text of every log event emitted during the test, in order (a list that grows)."""
    lines: list[str] = []

    def observer(event):
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield lines  # a fixture's teardown runs also when the test fails
    globalLogPublisher.removeObserver(observer)


@pytest.fixture(scope="session")
def make_hash():
    """Hash a password into a real but cheap argon2id hash."""
    return _CHEAP_ARGON2.hash
