"""The in-process rate-limit counters behind ``memory://``: a moving window that forgets."""

from __future__ import annotations

import time

import pytest
from flask import Flask
from limits import parse
from limits.strategies import MovingWindowRateLimiter

from app.extensions import limiter
from app.memory_counters import MemoryCounters
from tests.conftest import build_app

THREE_PER_SECOND = parse("3/second")


def test_a_moving_window_counts_the_last_second_only() -> None:
    window = MovingWindowRateLimiter(MemoryCounters())

    first = time.time()
    assert [window.hit(THREE_PER_SECOND, "client") for _ in range(4)] == [True] * 3 + [False]
    stats = window.get_window_stats(THREE_PER_SECOND, "client")
    assert stats.remaining == 0
    assert first <= stats.reset_time - 1 <= time.time()
    assert window.hit(THREE_PER_SECOND, "another client")

    time.sleep(1.05)
    assert window.hit(THREE_PER_SECOND, "client")
    assert window.get_window_stats(THREE_PER_SECOND, "client").remaining == 2


def test_a_refused_request_is_not_counted() -> None:
    window = MovingWindowRateLimiter(MemoryCounters())
    for _ in range(10):
        window.hit(THREE_PER_SECOND, "client")

    time.sleep(1.05)
    assert [window.hit(THREE_PER_SECOND, "client") for _ in range(4)] == [True] * 3 + [False]


def test_keys_whose_window_has_passed_are_dropped() -> None:
    counters = MemoryCounters(sweep_every_seconds=0.5)
    window = MovingWindowRateLimiter(counters)
    for session in range(1000):
        window.hit(THREE_PER_SECOND, f"session-{session}")
    assert counters.key_count() == 1000

    time.sleep(1.05)
    window.hit(THREE_PER_SECOND, "the next request")

    assert counters.key_count() == 1


def test_keys_still_in_their_window_are_kept() -> None:
    counters = MemoryCounters(sweep_every_seconds=0)
    window = MovingWindowRateLimiter(counters)
    for _ in range(3):
        window.hit(THREE_PER_SECOND, "busy client")
    window.hit(THREE_PER_SECOND, "the next request")

    assert counters.key_count() == 2
    assert not window.hit(THREE_PER_SECOND, "busy client")


def test_fixed_window_counters_expire() -> None:
    counters = MemoryCounters(sweep_every_seconds=0)
    assert [counters.incr("key", 1) for _ in range(2)] == [1, 2]
    assert counters.get("key") == 2
    assert time.time() < counters.get_expiry("key") <= time.time() + 1

    time.sleep(1.05)
    assert counters.get("key") == 0
    assert counters.incr("key", 1) == 1
    counters.clear("key")
    assert counters.get("key") == 0
    assert counters.reset() == 0


@pytest.mark.parametrize("storage_uri", ["memory://", "redis"])
def test_every_in_process_count_uses_these_counters(
    storage_uri: str, sqlite_url: str, redis_url: str
) -> None:
    """memory:// at the defaults, and the fallback used while Redis is down."""
    uri = redis_url if storage_uri == "redis" else storage_uri
    app: Flask = build_app(sqlite_url, RATELIMIT_STORAGE_URI=uri)
    with app.app_context():
        if storage_uri == "redis":
            assert limiter._fallback_limiter is not None
            assert isinstance(limiter._fallback_limiter.storage, MemoryCounters)
        else:
            assert isinstance(limiter.storage, MemoryCounters)
