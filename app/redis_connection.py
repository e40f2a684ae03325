"""Redis connections on which every command, as a whole, gets at most its timeout and the time left.

redis-py's ``socket_timeout`` bounds each read on the socket, so a Redis that trickles its
answer one byte at a time is never timed out; and its connect timeout starts only after the
host name is resolved. Here each command gets one budget, min(``socket_timeout``, the time
the request has left), counted from when it is sent: every send and receive on the socket
waits at most what is left of it. Connecting (name resolution and TLS handshake included) runs
through ``deadline.call_within``, bounded by ``socket_connect_timeout`` and the time left.
A connection that fails or runs out of time calls ``on_failure`` before raising.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.connection import Connection, SSLConnection

from app import deadline

# A wait cut short by the budget is a builtin TimeoutError when it is raised outside the
# socket calls redis-py translates (the deadline already gone when a command starts).
_FAILURES = (redis.ConnectionError, redis.TimeoutError, TimeoutError)


class _Budget:
    """When the command in flight must be done, on the ``time.monotonic`` clock."""

    def __init__(self) -> None:
        self.ends_at = math.inf


class _BudgetedSocket:
    """A socket whose every send and receive waits at most what is left of the command's budget."""

    def __init__(self, sock: socket.socket, budget: _Budget) -> None:
        self._sock = sock
        self._budget = budget
        self._timeout = sock.gettimeout()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout
        self._sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._timeout

    def recv(self, size: int, flags: int = 0) -> bytes:
        self._arm()
        return self._sock.recv(size, flags)

    # The hiredis parser, when installed, reads with recv_into instead of recv.
    def recv_into(self, buffer: Any, size: int = 0, flags: int = 0) -> int:
        self._arm()
        return self._sock.recv_into(buffer, size, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._arm()
        self._sock.sendall(data, flags)

    def _arm(self) -> None:
        """Let the next socket call wait no longer than the budget has left."""
        if self._timeout == 0:
            return  # a poll (redis-py's can_read): it never waits
        left = self._budget.ends_at - time.monotonic()
        if left <= 0:
            raise TimeoutError("the Redis command ran out of time")
        self._sock.settimeout(left if self._timeout is None else min(left, self._timeout))


class BoundedConnection(Connection):
    """A TCP connection to Redis whose connect and commands are each bounded as a whole."""

    def __init__(
        self,
        *,
        socket_timeout: float,
        socket_connect_timeout: float,
        on_failure: Callable[[], object],
        **kwargs: Any,
    ) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout, **kwargs
        )
        self._command_timeout = socket_timeout
        self._connect_timeout = socket_connect_timeout
        self._budget = _Budget()
        self._on_failure = on_failure

    def _connect(self) -> _BudgetedSocket:
        connect = super()._connect
        abandoned = threading.Event()

        def connect_unless_abandoned() -> socket.socket:
            sock: socket.socket = connect()  # type: ignore[no-untyped-call]
            if abandoned.is_set():
                sock.close()  # nobody waits for it any more
            return sock

        sock = deadline.call_within(
            self._connect_timeout, connect_unless_abandoned, on_abandon=abandoned.set
        )
        return _BudgetedSocket(sock, self._budget)

    def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        with self._reporting_failure():
            super().connect_check_health(check_health, retry_socket_connect)

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        with self._reporting_failure():
            self._budget.ends_at = time.monotonic() + deadline.bound(
                self._command_timeout, leave_reserve=True
            )
            super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        with self._reporting_failure():
            return super().read_response(*args, **kwargs)  # type: ignore[no-untyped-call]

    @contextmanager
    def _reporting_failure(self) -> Iterator[None]:
        try:
            yield
        except _FAILURES:
            self._on_failure()
            raise


class BoundedSSLConnection(BoundedConnection, SSLConnection):
    """``BoundedConnection`` over TLS (``rediss://``); the handshake is part of connecting."""


def bounded_options(uri: str, on_failure: Callable[[], object]) -> dict[str, Any]:
    """Options for ``redis.from_url(uri)`` that make its connections bounded ones.

    The bounds are ``socket_timeout`` (per command) and ``socket_connect_timeout``, which the
    caller must give too.
    """
    kind = BoundedSSLConnection if uri.startswith("rediss://") else BoundedConnection
    return {"connection_class": kind, "on_failure": on_failure}
