"""One deadline per request: every outbound call gets at most the time the request has left.

The HTTP layer starts a deadline when a request begins; adapters ask ``bound(own_timeout)``
before each call to a dependency and get the smaller of their own timeout and the time left.
Outside a request (jobs, CLI, alert threads) there is no deadline and each call keeps its own
timeout. This module sits at the bottom of the import graph: it knows nothing of Flask.

A per-read socket timeout does not bound a call whose peer answers one byte at a time, and
name resolution ignores socket timeouts altogether, so ``call_within`` runs a blocking call on
a thread of its own and waits for it no longer than its bound (docs/decisions.md, "One
deadline per request").
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

# Calls abandoned at their deadline keep a thread until their own timeouts end them; past
# this many running at once in a process, a new call fails at once.
MAX_RUNNING_CALLS = 32

# The share of a request's deadline that calls to storage, mail and Redis leave unused: after
# them the database still has to record what happened (an upload's audit row, a failed send),
# and a reply that says "stored" or "not sent" must not be lost to a database call that starts
# with no time left.
RESERVE_SHARE = 0.2


@dataclass(frozen=True)
class _Deadline:
    expires: float
    reserve: float


_deadline: ContextVar[_Deadline | None] = ContextVar("request_deadline", default=None)


class DeadlineExceeded(TimeoutError):
    """A dependency did not answer within the time the request had left."""


@contextmanager
def until(expires: float | None, *, reserve: float = 0.0) -> Iterator[None]:
    """Run the block under the deadline ``expires`` (from ``expires_at``; None for none)."""
    token = _deadline.set(None if expires is None else _Deadline(expires, reserve))
    try:
        yield
    finally:
        _deadline.reset(token)


@contextmanager
def grace() -> Iterator[None]:
    """A fresh allowance, the size of the request's reserve, for undoing a half-done change.

    A change that spans storage and the database can fail in the database after storage
    said yes, with the deadline spent; undoing it must not be refused for want of time.
    """
    current = _deadline.get()
    if current is None:
        yield
        return
    with until(time.monotonic() + current.reserve):
        yield


def start(seconds: float) -> None:
    """Start a deadline for the rest of the current context (a request, until ``clear``)."""
    _deadline.set(_Deadline(time.monotonic() + seconds, seconds * RESERVE_SHARE))


def clear() -> None:
    """End the current context's deadline."""
    _deadline.set(None)


def expires_at() -> float | None:
    """The current deadline on the ``time.monotonic`` clock, or None outside a request."""
    current = _deadline.get()
    return None if current is None else current.expires


def bound(timeout: float, *, leave_reserve: bool = False) -> float:
    """``timeout``, shortened to the time the request has left; DeadlineExceeded if none is.

    With ``leave_reserve`` (calls after which the database still has work to do), the
    request's reserve is not handed out.
    """
    current = _deadline.get()
    if current is None:
        return timeout
    left = current.expires - time.monotonic() - (current.reserve if leave_reserve else 0.0)
    if left <= 0:
        raise DeadlineExceeded("the request's deadline has passed")
    return min(timeout, left)


_running = 0
_running_lock = threading.Lock()


def _forget_threads_after_fork() -> None:
    # A forked child inherits the count but none of the threads it counts.
    global _running, _running_lock
    _running = 0
    _running_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_threads_after_fork)


def call_within(
    timeout: float,
    call: Callable[[], T],
    *,
    on_abandon: Callable[[], object] | None = None,
    leave_reserve: bool = True,
) -> T:
    """Run ``call`` and return its result, waiting at most ``bound(timeout, leave_reserve)``.

    Past that, DeadlineExceeded is raised and the call is abandoned to finish on its own
    thread; ``on_abandon`` runs then, to cut whatever connection the call is stuck on. The
    thread is a daemon (a pool's threads would be joined at exit, so a call stuck on a frozen
    peer would keep a worker from stopping), and while too many calls are still running, new
    ones fail at once rather than pile up.
    """
    global _running
    wait = bound(timeout, leave_reserve=leave_reserve)
    with _running_lock:
        if _running >= MAX_RUNNING_CALLS:
            raise DeadlineExceeded(f"{_running} calls to dependencies are still waiting")
        _running += 1
    done = threading.Event()
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        global _running
        try:
            outcome.append(call())
        except BaseException as exc:  # handed to the caller as it is
            failure.append(exc)
        finally:
            with _running_lock:
                _running -= 1
            done.set()

    threading.Thread(target=run, name="bounded-call", daemon=True).start()
    if not done.wait(wait):
        if on_abandon is not None:
            on_abandon()
        raise DeadlineExceeded(f"no answer within {wait:.1f} s")
    if failure:
        raise failure[0]
    return outcome[0]
