"""PostgreSQL calls bounded on the client side, by their own cap and the request's deadline.

``statement_timeout`` and ``lock_timeout`` are enforced by the server, so they never fire when
the server itself stops answering (a failover, a stuck volume, a partition that still ACKs),
and psycopg2 has no read timeout of its own. psycopg2 lets a process install one wait
callback through which every connection waits for the server; ours waits no longer than
min(cap, time the request has left) and then gives up on the connection. psycopg2 closes a
connection whose wait callback raised, and the error is an OperationalError on a closed
connection, which SQLAlchemy takes for a disconnect: the connection is discarded and the pool
starts afresh, so the process recovers by itself when the server is back.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import time
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions
from sqlalchemy import event
from sqlalchemy.engine import Dialect, Engine

from app import deadline

# The server's own statement timeout should answer first, as a clean error on a healthy
# connection; the client gives up only this much later.
SERVER_ANSWER_GRACE_SECONDS = 1.0


class DatabaseDeadlineExceeded(psycopg2.OperationalError):
    """PostgreSQL did not answer in time; the connection it was on is closed."""


@dataclass(frozen=True)
class _Caps:
    connect: float
    statement: float


_caps = _Caps(connect=10.0, statement=30.0)


def install(*, connect_timeout: float, statement_timeout: float) -> None:
    """Bound every psycopg2 connect and statement in this process.

    The callback is process-wide (psycopg2 keeps one), so the caps are too: the last app
    built in a process sets them.
    """
    global _caps
    _caps = _Caps(connect_timeout, statement_timeout + SERVER_ANSWER_GRACE_SECONDS)
    psycopg2.extensions.set_wait_callback(_wait)
    if not event.contains(Engine, "do_connect", _resolve_host_in_time):
        event.listen(Engine, "do_connect", _resolve_host_in_time)


def _wait(connection: Any) -> None:
    """Wait for the server like libpq would, giving up at the bound."""
    setting_up = connection.status == psycopg2.extensions.STATUS_SETUP
    cap = _caps.connect if setting_up else _caps.statement
    try:
        allowed = deadline.bound(cap)
    except deadline.DeadlineExceeded:
        raise DatabaseDeadlineExceeded("the request's deadline passed") from None
    limit = time.monotonic() + allowed
    while True:
        state = connection.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        left = limit - time.monotonic()
        if left <= 0:
            raise DatabaseDeadlineExceeded(f"PostgreSQL did not answer within {allowed:.1f} s")
        waiting = select.poll()
        flag = select.POLLIN if state == psycopg2.extensions.POLL_READ else select.POLLOUT
        waiting.register(connection.fileno(), flag)
        waiting.poll(left * 1000)


def _resolve_host_in_time(
    dialect: Dialect, connection_record: Any, cargs: Any, cparams: dict[str, Any]
) -> None:
    """Look the host name up within the connect bound and hand libpq the address.

    libpq resolves names before its connect timeout starts and blocks while it does; with
    ``hostaddr`` set it connects to that address and still checks TLS against the name.
    """
    host = cparams.get("host")
    if dialect.name != "postgresql" or not host or "hostaddr" in cparams:
        return
    if host.startswith("/") or "," in host or _is_address(host):
        return
    port = int(cparams.get("port") or 5432)
    try:
        # The database is what records a request's outcome: it may use the reserve too.
        found = deadline.call_within(
            _caps.connect,
            lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM),
            leave_reserve=False,
        )
    except deadline.DeadlineExceeded:
        raise DatabaseDeadlineExceeded(
            f"resolving the database host took over {_caps.connect:g} s"
        ) from None
    except OSError:
        # A name that does not resolve: libpq tries again and reports it in its own words.
        return
    cparams["hostaddr"] = found[0][4][0]


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
