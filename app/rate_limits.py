"""Rate limits by intent: minting sessions is scarce, resuming one is what clients do all the time.

- **New sessions** (generate-uuid, and validate-uuid when it registers an unknown UUID or
  issues a replacement) share one budget per client IP, ``SESSION_RATE_LIMIT``. The service
  spends it at the moment it is about to create a session, so a resume never touches it.
- **validate-uuid** is limited per session it names (``RESUME_RATE_LIMIT``) and, with a
  generous ceiling for many users behind one address, per client IP (``RESUME_IP_RATE_LIMIT``).
  The service spends both before it judges the UUID: the commonest request of all pays for
  two counts, not for flask-limiter's evaluation of two route limits.
- Every other limited endpoint has its own budget per client IP (``limited_per_ip``).

Counters live in flask-limiter's storage (Redis when configured), keyed the way it keys its own.
Every Redis call is bounded as a whole (app.redis_connection); after a failure the whole process,
the service's budgets included, counts in memory until flask-limiter finds Redis answering
again. docs/decisions.md ("Rate limits", "One deadline per request") gives the reasoning.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import limits
from flask import Flask, current_app
from limits.strategies import STRATEGIES, RateLimiter

from app.errors import RateLimited
from app.extensions import limiter
from app.memory_counters import MemoryCounters
from app.privacy import client_key, keyed_hash
from app.redis_connection import bounded_options
from app.services.chat_sessions import parse_uuid4

log = logging.getLogger(__name__)

NEW_SESSION_SCOPE = "new-session"
RESUME_SCOPE = "resume"

RouteDecorator = Callable[[Callable[..., Any]], Any]


def seconds_until(reset_at: float) -> int:
    """A Retry-After value: whole seconds until ``reset_at``, at least one."""
    return max(1, math.ceil(reset_at - time.time()))


@functools.lru_cache(maxsize=32)
def _parsed(limit_text: str) -> list[limits.RateLimitItem]:
    """The limits of a limit string, shortest window first."""
    return sorted(limits.parse_many(limit_text), key=lambda item: item.get_expiry())


class Budget:
    """An allowance under the limit string ``app.config[setting]``, spent by the service as it acts.

    Counted in flask-limiter's storage under ``identifiers`` (after the key prefix), the way
    flask-limiter counts its own limits.
    """

    def __init__(self, setting: str, *identifiers: str) -> None:
        prefix = current_app.config["RATELIMIT_KEY_PREFIX"]
        self._identifiers = [prefix, *identifiers] if prefix else list(identifiers)
        self._limit_text = current_app.config[setting]

    def spend(self) -> None:
        """Count one use; RateLimited if the budget was already used up.

        If the shared counters fail, the process counts in memory from then on, as flask-limiter
        does for the route limits, until it finds the storage answering again: a limit is no
        reason for an outage, and an outage of Redis no reason to drop the limit.
        """
        try:
            self._count(limiter.limiter)
        except RateLimited:
            raise
        except Exception:
            log.warning("rate-limit storage unavailable: counting in memory")
            _count_in_memory_for_a_while()
            self._count(limiter.limiter)

    def _count(self, strategy: RateLimiter) -> None:
        """Hit every window of the limit with ``strategy``; RateLimited at the first refusal.

        Shortest window first, and the first refusal stops the count, as flask-limiter does: a
        refused request must not eat into the longer windows.
        """
        for item in _parsed(self._limit_text):
            if not strategy.hit(item, *self._identifiers):
                reset_at = strategy.get_window_stats(item, *self._identifiers).reset_time
                raise RateLimited(limit=self._limit_text, retry_after=seconds_until(reset_at))


# flask-limiter offers no public way to say "the storage failed" or "wait before trying it again",
# so these two functions reach into its state (as ``init_app`` does into its fallback): the flag
# its own fallback sets (its ``limiter`` property then answers with the in-memory limiter, and
# its requests check the storage again with back-off), and the time of its last look at the
# storage, which that back-off counts from. Without restarting that clock, a process whose storage
# failed after a long healthy spell would try it again on the very next request and pay a second
# timeout. flask-limiter sets its flag itself when a route limit fails, but never restarts the
# clock, so every Redis connection restarts it on failure, whichever limit met the failure.
def _count_in_memory_for_a_while() -> None:
    """Switch every limit of the process to in-memory counting until Redis answers again."""
    limiter._storage_dead = True
    _wait_before_trying_storage_again()


def _wait_before_trying_storage_again() -> None:
    """Make flask-limiter's back-off before its next look at the storage start now."""
    limiter._Limiter__last_check_backend = time.time()  # type: ignore[attr-defined]


def init_app(app: Flask) -> None:
    """Bind flask-limiter: Redis calls bounded as a whole, in-memory counts in MemoryCounters."""
    _bound_storage_calls(app.config)
    limiter.init_app(app)
    # flask-limiter builds its fallback from limits' MemoryStorage by name, not by scheme, and
    # has no public way to give it another storage.
    if limiter._fallback_limiter is not None:
        limiter._fallback_limiter = STRATEGIES[app.config["RATELIMIT_STRATEGY"]](MemoryCounters())


def _bound_storage_calls(config: MutableMapping[str, Any]) -> None:
    """Bound every call to a Redis counter storage as a whole; before ``limiter.init_app``."""
    uri = config["RATELIMIT_STORAGE_URI"]
    if uri.startswith(("redis://", "rediss://")):
        config["RATELIMIT_STORAGE_OPTIONS"] = {
            **config["RATELIMIT_STORAGE_OPTIONS"],
            **bounded_options(uri, on_failure=_wait_before_trying_storage_again),
        }


class Budgets:
    """Several allowances spent together; the first refusal stops the count."""

    def __init__(self, *budgets: Budget) -> None:
        self._budgets = budgets

    def spend(self) -> None:
        for budget in self._budgets:
            budget.spend()


def new_session_budget() -> Budget:
    """The new-session budget of the client making the current request."""
    return Budget("SESSION_RATE_LIMIT", client_key(), NEW_SESSION_SCOPE)


def resume_budget(named: str) -> Budgets:
    """validate-uuid's budgets: per session named in ``named``, and a ceiling per client.

    The UUID is the session's credential, so the counter's key holds only a keyed hash of it.
    A body that names no UUID v4 counts against its client address instead: every invalid
    verdict is audited, so invalid UUIDs share one budget rather than one each.
    """
    client = client_key()
    session_uuid = parse_uuid4(named)
    if session_uuid is None:
        session = f"no-session:{client}"
    else:
        session = f"session:{keyed_hash('resume-limit', str(session_uuid))[:32]}"
    return Budgets(
        Budget("RESUME_RATE_LIMIT", session, RESUME_SCOPE),
        Budget("RESUME_IP_RATE_LIMIT", client, RESUME_SCOPE),
    )


# The decorator factory below runs once, when the routes are imported, before a mutation test can
# switch anything on: `make mutate` leaves it alone, and the limits it sets are exercised through
# the routes (tests/test_rate_limits.py).
def limited_per_ip(config_key: str) -> RouteDecorator:  # pragma: no mutate block
    """Limit a route per client IP by the limit string in ``app.config[config_key]``."""
    # CORS preflights never meet the limit: Flask answers OPTIONS without calling the view, and
    # flask-limiter checks a route's own limits in the view's decorator.
    return limiter.limit(lambda: str(current_app.config[config_key]))
