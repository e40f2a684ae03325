"""PostgreSQL that stops answering on an open connection costs a JSON 503 within the deadline.

The server's statement_timeout cannot fire when the server is what hangs, so only the client
side can end the wait. The database sits behind a TCP proxy that freezes (relays nothing and
keeps every connection open) or trickles; the app's pooled connections were opened before.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from werkzeug.test import TestResponse

from app import deadline
from tests.conftest import GENERAL_ERROR, JSON_HEADERS, build_app, smtp_env
from tests.fault_proxy import FaultProxy
from tests.servers import hung_server

DEADLINE = 3
SLACK = 1.5


@pytest.fixture
def proxy(postgres_url: str) -> Iterator[FaultProxy]:
    url = make_url(postgres_url)
    with FaultProxy(url.host or "127.0.0.1", url.port or 5432, name="postgres") as fault_proxy:
        yield fault_proxy


def app_through(proxy: FaultProxy, postgres_url: str, **overrides: str) -> Flask:
    """An app whose database is reached through ``proxy``.

    The schema is applied straight to the database; the app then goes through the proxy.
    """
    build_app(postgres_url)
    url = make_url(postgres_url).set(host=proxy.host, port=proxy.port)
    return build_app(url.render_as_string(hide_password=False), **overrides)


@pytest.fixture
def app(postgres_url: str, proxy: FaultProxy) -> Flask:
    return app_through(proxy, postgres_url, REQUEST_DEADLINE_SECONDS=str(DEADLINE))


def timed_post(app: Flask, path: str, **kwargs: object) -> tuple[int, dict[str, object], float]:
    started = time.monotonic()
    response = app.test_client().post(path, headers=JSON_HEADERS, **kwargs)  # type: ignore[arg-type]
    return response.status_code, response.get_json(), time.monotonic() - started


def timed_verify_email(client: FlaskClient, session_uuid: str) -> tuple[TestResponse, float]:
    """verify-email for the session, and how long its answer took."""
    started = time.monotonic()
    response = client.post(
        "/api/v1/email-verification/verify-email",
        json={"email": "ann@example.org"},
        headers={**JSON_HEADERS, "X-Session-ID": session_uuid},
    )
    return response, time.monotonic() - started


@pytest.mark.parametrize("shape", ["freeze", "trickle"])
def test_a_database_that_stops_answering_costs_a_json_503_within_the_deadline(
    app: Flask, proxy: FaultProxy, shape: str
) -> None:
    status, _, _ = timed_post(app, "/api/v1/generate-uuid")
    assert status == 200
    proxy.mode = shape

    status, body, elapsed = timed_post(app, "/api/v1/generate-uuid")

    assert status == 503
    assert body["error"] == "database_unavailable"
    assert elapsed < DEADLINE + SLACK


def test_the_same_app_serves_again_once_the_database_answers(app: Flask, proxy: FaultProxy) -> None:
    assert timed_post(app, "/api/v1/generate-uuid")[0] == 200
    proxy.mode = "freeze"
    assert timed_post(app, "/api/v1/generate-uuid")[0] == 503
    proxy.mode = "pass"

    # The connection given up on was discarded; no restart, no stale connection served.
    status, body, elapsed = timed_post(app, "/api/v1/generate-uuid")

    assert (status, body["status"]) == (200, "success")
    assert elapsed < 1.0


def test_new_connections_to_a_frozen_database_give_up_within_the_deadline(
    app: Flask, proxy: FaultProxy
) -> None:
    proxy.mode = "freeze"

    status, body, elapsed = timed_post(app, "/api/v1/generate-uuid")

    assert (status, body["error"]) == (503, "database_unavailable")
    assert elapsed < DEADLINE + SLACK


def test_a_request_whose_time_is_spent_gets_no_more_from_the_database(app: Flask) -> None:
    with app.app_context(), deadline.until(time.monotonic() - 1):
        from app.extensions import db

        with pytest.raises(Exception, match="deadline passed"):
            db.session.connection().exec_driver_sql("SELECT 1")
        db.session.rollback()


def test_outside_a_request_a_frozen_database_is_given_up_on_after_its_own_cap(
    postgres_url: str, proxy: FaultProxy
) -> None:
    # A job or the admin-alert thread has no request deadline: statement timeout + 1 s.
    job_app = app_through(
        proxy, postgres_url, DATABASE_STATEMENT_TIMEOUT_MS="1000", DATABASE_LOCK_TIMEOUT_MS="500"
    )
    with job_app.app_context():
        from app.extensions import db

        assert db.session.connection().exec_driver_sql("SELECT 1").scalar() == 1
        proxy.mode = "freeze"
        started = time.monotonic()
        with pytest.raises(OperationalError, match=r"did not answer within 2\.0 s"):
            db.session.connection().exec_driver_sql("SELECT 2")
        elapsed = time.monotonic() - started
        db.session.rollback()

    assert 1.8 < elapsed < 3.0


def test_the_email_screens_get_a_200_error_when_the_database_stops_answering(
    app: Flask, proxy: FaultProxy
) -> None:
    client = app.test_client()
    session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]
    proxy.mode = "freeze"

    response, elapsed = timed_verify_email(client, session_uuid)

    body = response.get_json()
    assert response.status_code == 200
    assert (body["status"], body["code"], body["nextTransition"]) == (
        "error",
        "database_unavailable",
        "EMAIL_INPUT",
    )
    assert body["error"] == body["message"] == GENERAL_ERROR
    assert "Retry-After" not in response.headers
    assert elapsed < DEADLINE + SLACK


def test_mail_that_hangs_past_the_deadline_leaves_time_to_record_the_failure(
    database_url: str,
) -> None:
    with hung_server() as hung_port:
        app = build_app(
            database_url,
            **{**smtp_env(hung_port), "SMTP_TIMEOUT_SECONDS": "10"},
            REQUEST_DEADLINE_SECONDS=str(DEADLINE),
        )
        client = app.test_client()
        session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]

        response, elapsed = timed_verify_email(client, session_uuid)

    body = response.get_json()
    assert (response.status_code, body["status"], body["code"]) == (
        200,
        "error",
        "mail_unavailable",
    )
    # The send gave up before the deadline, leaving its reserve for recording the failure.
    assert elapsed < DEADLINE


def test_a_host_name_is_resolved_within_the_bound_and_handed_to_libpq(postgres_url: str) -> None:
    # libpq would resolve the name itself, outside every timeout; the app resolves it first.
    by_name = make_url(postgres_url).set(host="localhost").render_as_string(hide_password=False)
    app = build_app(by_name)
    with app.app_context():
        from app.extensions import db

        driver = db.session.connection().connection.dbapi_connection
        parameters = driver.get_dsn_parameters()  # type: ignore[union-attr]
        db.session.rollback()

    assert parameters["host"] == "localhost"
    assert parameters.get("hostaddr") in {"127.0.0.1", "::1"}


def test_a_new_connection_to_a_frozen_database_gives_up_after_the_connect_timeout(
    postgres_url: str, proxy: FaultProxy
) -> None:
    # Outside a request: connecting has its own, shorter cap than a statement.
    job_app = app_through(
        proxy,
        postgres_url,
        DATABASE_CONNECT_TIMEOUT_SECONDS="1",
        DATABASE_STATEMENT_TIMEOUT_MS="4000",
    )
    proxy.mode = "freeze"
    with job_app.app_context():
        from app.extensions import db

        db.engine.dispose()
        started = time.monotonic()
        with pytest.raises(OperationalError, match="did not answer"):
            db.session.connection()
        elapsed = time.monotonic() - started
        db.session.rollback()

    assert 0.8 < elapsed < 2.5
