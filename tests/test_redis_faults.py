"""Redis that refuses, hangs, trickles or comes back: the limits keep limiting, on time.

Each Redis here is a real endpoint: a closed port, a server that accepts and never answers, one
that answers a byte at a time, and the real Redis behind a relay that can be switched on. The
new-session budget must keep limiting (in memory) while Redis is down, a hung or trickling
Redis must cost one bounded wait per process and retry period, not one per request or per read,
and counting must return to Redis once it answers again.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest
import redis
from flask.testing import FlaskClient

from app import deadline
from app.extensions import limiter
from app.redis_connection import bounded_options
from tests.conftest import JSON_HEADERS, RATE_LIMIT_PREFIX, build_app
from tests.servers import dripping_server, free_port, hung_server

# RATELIMIT_STORAGE_TIMEOUT_SECONDS: its smallest allowed value, to keep the tests short.
TIMEOUT = 1
# What a request may spend besides the one wait on Redis (the database, the app itself).
SLACK = 0.6
# A reply that takes 40 s in all while every single byte comes well within the timeout.
TRICKLE = (b"+" + b"O" * 200 + b"\r\n", 0.2)


@pytest.fixture(autouse=True)
def _storage_trusted_again() -> Iterator[None]:
    """Start and leave each test with flask-limiter counting in its storage.

    Its fallback state belongs to the process, which runs other test files too, and it offers
    no public way to reset it.
    """

    def trust() -> None:
        limiter._storage_dead = False
        limiter._Limiter__check_backend_count = 0

    trust()
    yield
    trust()


def client_on(database_url: str, redis_uri: str, **overrides: str) -> FlaskClient:
    app = build_app(
        database_url,
        RATELIMIT_STORAGE_URI=redis_uri,
        RATELIMIT_STORAGE_TIMEOUT_SECONDS=str(TIMEOUT),
        **overrides,
    )
    return app.test_client()


def redis_at(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


def generate(client: FlaskClient) -> int:
    return client.post("/api/v1/generate-uuid", headers=JSON_HEADERS).status_code


def validate(client: FlaskClient, session_uuid: str) -> int:
    answer = client.post("/api/v1/validate-uuid", json={"uuid": session_uuid}, headers=JSON_HEADERS)
    return answer.status_code


@contextmanager
def relay(port: int, target: str) -> Iterator[None]:
    """Forward 127.0.0.1:``port`` to the Redis at URL ``target`` until the block ends."""
    upstream = urlsplit(target)
    listener = socket.create_server(("127.0.0.1", port))
    sockets: list[socket.socket] = [listener]

    def pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass

    def accept() -> None:
        while True:
            try:
                near, _ = listener.accept()
            except OSError:
                return
            far = socket.create_connection((upstream.hostname, upstream.port or 6379))
            sockets.extend((near, far))
            threading.Thread(target=pump, args=(near, far), daemon=True).start()
            threading.Thread(target=pump, args=(far, near), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield
    finally:
        for each in sockets:
            each.close()


def test_while_redis_refuses_new_sessions_are_still_limited_in_memory(
    database_url: str,
) -> None:
    client = client_on(database_url, redis_at(free_port()), SESSION_RATE_LIMIT="3/minute")

    statuses = [generate(client) for _ in range(4)]

    assert statuses == [200, 200, 200, 429]


@pytest.mark.parametrize("first_call", ["generate-uuid", "validate-uuid"])
def test_a_hung_redis_costs_one_timeout_per_process_not_one_per_request(
    database_url: str, first_call: str
) -> None:
    with hung_server() as port:
        client = client_on(database_url, redis_at(port), SESSION_RATE_LIMIT="3/minute")
        started = time.monotonic()
        # Either call meets the hung Redis first: a route limit of flask-limiter's own, or the
        # new-session budget. Both register a new session.
        if first_call == "generate-uuid":
            first = client.post("/api/v1/generate-uuid", headers=JSON_HEADERS)
            session_uuid = first.get_json()["uuid"]
        else:
            session_uuid = str(uuid.uuid4())
            first = client.post(
                "/api/v1/validate-uuid", json={"uuid": session_uuid}, headers=JSON_HEADERS
            )
        statuses = [first.status_code]
        statuses += [generate(client) for _ in range(3)]
        statuses.append(validate(client, session_uuid))
        elapsed = time.monotonic() - started

    assert statuses == [200, 200, 200, 429, 200], "limited in memory, resumes still allowed"
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + SLACK, "one timeout for five requests"


def test_a_trickling_redis_costs_one_timeout_not_one_per_read(database_url: str) -> None:
    with dripping_server(*TRICKLE) as port:
        client = client_on(database_url, redis_at(port))
        started = time.monotonic()
        statuses = [generate(client) for _ in range(3)]
        elapsed = time.monotonic() - started

    assert statuses == [200, 200, 200]
    assert elapsed < TIMEOUT + SLACK


def test_counting_returns_to_redis_once_it_answers_again(database_url: str, redis_url: str) -> None:
    port = free_port()
    client = client_on(database_url, redis_at(port), SESSION_RATE_LIMIT="2/minute")

    while_refused = generate(client)  # counted in this process's memory
    with relay(port, redis_url):
        # flask-limiter looks at its storage again one second after it failed.
        time.sleep(1.2)
        once_back = [generate(client) for _ in range(3)]

    assert while_refused == 200
    # Memory held one, so it would refuse the second; Redis started from none.
    assert once_back == [200, 200, 429]
    counters = redis.Redis.from_url(redis_url)
    keys = list(counters.scan_iter(match=f"*{RATE_LIMIT_PREFIX}*new-session*"))
    assert sum(counters.llen(key) for key in keys) == 2


def test_a_redis_command_gets_no_more_than_the_time_the_request_has_left() -> None:
    failures: list[None] = []
    with dripping_server(*TRICKLE) as port:
        uri = redis_at(port)
        options = bounded_options(uri, on_failure=lambda: failures.append(None))
        client = redis.Redis.from_url(uri, socket_timeout=5, socket_connect_timeout=5, **options)
        with deadline.until(time.monotonic() + 0.5):
            started = time.monotonic()
            with pytest.raises(redis.TimeoutError):
                client.ping()
            elapsed = time.monotonic() - started
        client.close()

    assert 0.4 < elapsed < 0.8
    assert failures, "the failure was reported, so the limiter waits before trying again"


def test_a_redis_command_inside_a_request_leaves_the_reserve_for_the_database() -> None:
    with dripping_server(*TRICKLE) as port:
        uri = redis_at(port)
        options = bounded_options(uri, on_failure=lambda: None)
        client = redis.Redis.from_url(uri, socket_timeout=5, socket_connect_timeout=5, **options)
        with deadline.until(time.monotonic() + 1.2, reserve=0.6):
            started = time.monotonic()
            with pytest.raises((redis.TimeoutError, TimeoutError)):
                client.ping()
            elapsed = time.monotonic() - started
        client.close()

    assert 0.5 < elapsed < 0.9, "the command stops when only the reserve is left, not at the end"
