"""Rate limits by intent: minting sessions is scarce, resuming one is what clients do all the time.

- **New sessions** (generate-uuid, and validate-uuid when it registers an unknown UUID or
  issues a replacement) share one budget per client IP, ``SESSION_RATE_LIMIT``. The service
  spends it at the moment it is about to create a session, so a resume never touches it.
- **validate-uuid** is limited per session it names (``RESUME_RATE_LIMIT``) and, with a
  generous ceiling for many users behind one address, per client IP (``RESUME_IP_RATE_LIMIT``).
- Every other limited endpoint has its own budget per client IP (``limited_per_ip``).

Counters live in flask-limiter's storage (Redis when configured), keyed the way it keys its own.
docs/decisions.md ("Rate limits") gives the reasoning behind the defaults.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import limits
from flask import current_app, request
from werkzeug.exceptions import HTTPException

from app.errors import RateLimited, seconds_until
from app.extensions import limiter
from app.privacy import client_key, keyed_hash
from app.services.chat_sessions import parse_uuid4

log = logging.getLogger(__name__)

NEW_SESSION_SCOPE = "new-session"

RouteDecorator = Callable[[Callable[..., Any]], Any]


@functools.lru_cache(maxsize=32)
def _parsed(limit_text: str) -> list[limits.RateLimitItem]:
    """The limits of a limit string, shortest window first."""
    return sorted(limits.parse_many(limit_text), key=lambda item: item.get_expiry())


class NewSessionBudget:
    """One client's allowance of new sessions, spent by the service just before it creates one."""

    def __init__(self, client: str) -> None:
        prefix = current_app.config["RATELIMIT_KEY_PREFIX"]
        self._identifiers = [prefix, client, NEW_SESSION_SCOPE] if prefix else [client]
        self._limit_text = current_app.config["SESSION_RATE_LIMIT"]

    def spend(self) -> None:
        """Count one new session; RateLimited if the budget was already used up.

        The limits are tried shortest window first and the first refusal stops the count, as
        flask-limiter does: a refused request must not eat into the longer windows. If the
        counters cannot be reached, the session is allowed: a limit is no reason for an outage.
        """
        strategy = limiter.limiter
        for item in _parsed(self._limit_text):
            try:
                if strategy.hit(item, *self._identifiers):
                    continue
                reset_at = strategy.get_window_stats(item, *self._identifiers).reset_time
            except Exception:
                log.warning("new-session budget not counted: rate-limit storage unavailable")
                return
            raise RateLimited(limit=self._limit_text, retry_after=seconds_until(reset_at))


def new_session_budget() -> NewSessionBudget:
    """The budget of the client making the current request."""
    return NewSessionBudget(client_key())


def _session_named_in_body() -> str:
    """The per-session key of a validate-uuid request: a keyed hash of the UUID it names.

    The UUID is the session's credential, so the counter's key holds only a keyed hash of it.
    A body that names no UUID v4 counts against its client address instead: every invalid
    verdict is audited, so invalid UUIDs share one budget rather than one each.
    """
    try:
        body = request.get_json(silent=True)
    except HTTPException:
        # A body too large to read: the view answers 413. Raising here would make the limiter
        # take its storage for dead and count in process memory for a while.
        body = None
    named = body.get("uuid") if isinstance(body, dict) else None
    session_uuid = parse_uuid4(named) if isinstance(named, str) else None
    if session_uuid is None:
        return f"no-session:{client_key()}"
    return f"session:{keyed_hash('resume-limit', str(session_uuid))[:32]}"


# The two decorator factories below run once, when the routes are imported, before a mutation
# test can switch anything on: `make mutate` leaves them alone, and the limits they set are
# exercised through the routes (tests/test_rate_limits.py).
def limited_per_ip(config_key: str) -> RouteDecorator:  # pragma: no mutate block
    """Limit a route per client IP by the limit string in ``app.config[config_key]``."""
    # CORS preflights never meet the limit: Flask answers OPTIONS without calling the view, and
    # flask-limiter checks a route's own limits in the view's decorator.
    return limiter.limit(lambda: str(current_app.config[config_key]))


def limited_as_resume(view: Callable[..., Any]) -> Any:  # pragma: no mutate block
    """validate-uuid's limits: per session named, and a ceiling per client IP."""
    per_ip = limited_per_ip("RESUME_IP_RATE_LIMIT")
    per_session = limiter.limit(
        lambda: str(current_app.config["RESUME_RATE_LIMIT"]),
        key_func=_session_named_in_body,
    )
    return per_ip(per_session(view))
