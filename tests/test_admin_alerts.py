"""Admin notifications over real SMTP: unexpected errors, job errors and suspicious bursts."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg2
from flask import Flask
from sqlalchemy.engine import make_url

from app.services.admin_alerts import SIGNATURES_REMEMBERED, Alert, current_alerts
from tests.conftest import (
    GENERAL_ERROR,
    JSON_HEADERS,
    audit_rows,
    base_env,
    build_app,
    code_in,
    json_lines,
    smtp_env,
    smtp_server,
    unreachable_s3_env,
)
from tests.servers import free_port, gunicorn_process
from tests.test_faults import row_locked_elsewhere

ADMIN = "admin@ops.example"


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def with_failing_route(app: Flask) -> Flask:
    """Register a route that always raises (tests only)."""

    @app.post("/api/v1/test-failure")
    def failure() -> str:
        raise RuntimeError("forced failure for the test")

    return app


def test_a_500_mails_the_admin_once_per_window_without_delaying_the_answer(
    database_url: str,
) -> None:
    with smtp_server(delay=1.5) as (port, inbox):
        app = with_failing_route(build_app(database_url, ADMIN_EMAIL=ADMIN, **smtp_env(port)))
        client = app.test_client()
        session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]

        started = time.monotonic()
        response = client.post(
            "/api/v1/test-failure", json={"uuid": session_uuid}, headers=JSON_HEADERS
        )
        elapsed = time.monotonic() - started

        assert response.status_code == 500
        assert response.get_json()["message"] == GENERAL_ERROR
        assert elapsed < 1.0, "the response waited for the mail server"
        assert wait_for(lambda: len(inbox.to(ADMIN)) == 1)
        [alert] = inbox.to(ADMIN)
        text = alert.get_body(preferencelist=("plain",)).get_content()
        assert response.headers["X-Correlation-ID"] in text
        assert f"Session UUID: {session_uuid}" in text
        assert "POST /api/v1/test-failure" in text
        assert "RuntimeError: forced failure for the test" in text
        assert "Traceback" in text
        assert re.search(r"User actions.*\n.*uuid_generated", text)

        again = client.post(
            "/api/v1/test-failure", json={"uuid": session_uuid}, headers=JSON_HEADERS
        )
        assert again.status_code == 500
        assert not wait_for(lambda: len(inbox.to(ADMIN)) > 1, timeout=3.0)


def test_a_failing_mail_server_never_breaks_the_answer(database_url: str) -> None:
    app = with_failing_route(build_app(database_url, ADMIN_EMAIL=ADMIN, **smtp_env(free_port())))

    response = app.test_client().post("/api/v1/test-failure")

    assert response.status_code == 500
    assert response.get_json()["message"] == GENERAL_ERROR


def test_a_burst_of_failed_codes_is_notified_once(database_url: str) -> None:
    with smtp_server() as (port, inbox):
        app = build_app(
            database_url, ADMIN_EMAIL=ADMIN, SUSPICIOUS_FAILED_CODES="3", **smtp_env(port)
        )
        client = app.test_client()

        def guess_wrong(times: int) -> None:
            session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]
            headers = {**JSON_HEADERS, "X-Session-ID": session_uuid}
            client.post(
                "/api/v1/email-verification/verify-email",
                json={"email": f"{uuid.uuid4().hex[:8]}@example.org"},
                headers=headers,
            )
            for _ in range(times):
                client.post(
                    "/api/v1/email-verification/verify-code",
                    json={"code": "000000"},
                    headers=headers,
                )

        guess_wrong(3)
        guess_wrong(2)

        assert wait_for(lambda: len(inbox.to(ADMIN)) == 1)
        assert not wait_for(lambda: len(inbox.to(ADMIN)) > 1, timeout=2.0)
        [alert] = inbox.to(ADMIN)
        assert "Suspicious activity" in alert["Subject"]
        assert "IP 127.0.0.0" in alert["Subject"]


def test_without_a_client_address_a_burst_on_one_session_is_notified_with_it(
    database_url: str,
) -> None:
    with smtp_server() as (port, inbox):
        app = build_app(
            database_url, ADMIN_EMAIL=ADMIN, SUSPICIOUS_FAILED_CODES="3", **smtp_env(port)
        )
        # Behind a proxy on a unix socket with no forwarded address, requests carry no IP.
        client = app.test_client()
        client.environ_base["REMOTE_ADDR"] = ""
        session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]
        headers = {**JSON_HEADERS, "X-Session-ID": session_uuid}
        client.post(
            "/api/v1/email-verification/verify-email",
            json={"email": "someone@example.org"},
            headers=headers,
        )
        code = code_in(inbox.to("someone@example.org")[0])
        wrong = f"{(int(code) + 1) % 10**6:06d}"
        for _ in range(3):
            client.post(
                "/api/v1/email-verification/verify-code", json={"code": wrong}, headers=headers
            )

        assert wait_for(lambda: len(inbox.to(ADMIN)) == 1)
        [alert] = inbox.to(ADMIN)
        assert f"session {session_uuid}" in alert["Subject"]


def test_a_burst_of_rate_limit_hits_is_audited_and_notified(database_url: str) -> None:
    with smtp_server() as (port, inbox):
        app = build_app(
            database_url,
            ADMIN_EMAIL=ADMIN,
            SESSION_RATE_LIMIT="2/minute",
            SUSPICIOUS_RATE_LIMIT_HITS="3",
            **smtp_env(port),
        )
        client = app.test_client()

        statuses = [client.post("/api/v1/generate-uuid").status_code for _ in range(6)]

        assert statuses == [200, 200, 429, 429, 429, 429]
        assert wait_for(lambda: len(inbox.to(ADMIN)) == 1)
        assert "3 rate-limit refusals from IP 127.0.0.0" in inbox.to(ADMIN)[0]["Subject"]
    # The first refusal of the window, and the one that made it a burst; not every refusal.
    assert [row.details for row in audit_rows(app, "rate_limited")] == [{"limit": "2/minute"}]
    [burst] = audit_rows(app, "rate_limit_burst")
    assert burst.details == {"limit": "2/minute", "refusals": 3}


def test_a_flood_of_refusals_costs_the_database_two_rows(database_url: str) -> None:
    with smtp_server() as (port, inbox):
        app = build_app(
            database_url, ADMIN_EMAIL=ADMIN, SESSION_RATE_LIMIT="1/minute", **smtp_env(port)
        )
        client = app.test_client()

        statuses = [client.post("/api/v1/generate-uuid").status_code for _ in range(300)]

        assert statuses == [200] + [429] * 299
        assert len(audit_rows(app)) == 1 + 2  # the session issued, then two refusal rows
        assert wait_for(lambda: len(inbox.to(ADMIN)) == 1)
        assert not wait_for(lambda: len(inbox.to(ADMIN)) > 1, timeout=1.0)


def test_a_job_error_is_notified(database_url: str) -> None:
    with smtp_server() as (port, inbox):
        app = build_app(
            database_url,
            ADMIN_EMAIL=ADMIN,
            **unreachable_s3_env(),
            **smtp_env(port),
        )
        result = app.test_cli_runner().invoke(args=["cleanup", "orphans"])

        assert result.exit_code == 0
        assert wait_for(lambda: len(inbox.to(ADMIN)) == 1)
        assert "orphan_sweep" in inbox.to(ADMIN)[0]["Subject"]


def test_one_notification_per_window_across_workers(database_url: str) -> None:
    with smtp_server() as (port, inbox):
        workers = [
            with_failing_route(build_app(database_url, ADMIN_EMAIL=ADMIN, **smtp_env(port)))
            for _ in range(2)
        ]
        for worker in workers:
            assert worker.test_client().post("/api/v1/test-failure").status_code == 500
            assert wait_for(lambda: len(inbox.to(ADMIN)) == 1)

        assert not wait_for(lambda: len(inbox.to(ADMIN)) > 1, timeout=2.0)


def test_a_burst_of_rate_limit_hits_on_several_workers_is_one_mail(database_url: str) -> None:
    with smtp_server() as (port, inbox):
        workers = [
            build_app(
                database_url,
                ADMIN_EMAIL=ADMIN,
                SESSION_RATE_LIMIT="2/minute",
                SUSPICIOUS_RATE_LIMIT_HITS="3",
                **smtp_env(port),
            ).test_client()
            for _ in range(3)
        ]

        statuses = [workers[i % 3].post("/api/v1/generate-uuid").status_code for i in range(12)]

        assert statuses.count(429) == 10
        assert wait_for(lambda: len(inbox.to(ADMIN)) == 1)
        assert not wait_for(lambda: len(inbox.to(ADMIN)) > 1, timeout=2.0)


def test_a_503_from_an_upload_names_the_session_of_the_form(database_url: str) -> None:
    with smtp_server() as (port, inbox):
        app = build_app(database_url, ADMIN_EMAIL=ADMIN, **unreachable_s3_env(), **smtp_env(port))
        client = app.test_client()
        session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]

        refused = client.post(
            "/api/v1/upload",
            data={"session_uuid": session_uuid, "file": (io.BytesIO(b"%PDF-1.4\n"), "cv.pdf")},
            content_type="multipart/form-data",
        )

        assert refused.status_code == 503
        assert wait_for(lambda: len(inbox.to(ADMIN)) == 1)
        text = inbox.to(ADMIN)[0].get_body(preferencelist=("plain",)).get_content()
        assert f"Session UUID: {session_uuid}" in text
        assert refused.headers["X-Correlation-ID"] in text


def test_a_failing_readiness_check_is_notified(database_url: str) -> None:
    with smtp_server() as (port, inbox):
        app = build_app(database_url, ADMIN_EMAIL=ADMIN, **unreachable_s3_env(), **smtp_env(port))

        assert app.test_client().get("/ready").status_code == 503

        assert wait_for(lambda: len(inbox.to(ADMIN)) == 1)
        [alert] = inbox.to(ADMIN)
        assert "Readiness check failing" in alert["Subject"]
        assert "Storage: unreachable" in alert.get_body(preferencelist=("plain",)).get_content()


def children_of(parent: int) -> list[int]:
    """The process ids whose parent is ``parent`` (read from /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def test_a_worker_crash_and_a_worker_timeout_reach_the_admin(
    sqlite_url: str, tmp_path: Path
) -> None:
    build_app(sqlite_url)  # the schema the server will use
    with smtp_server() as (port, inbox):
        env = base_env(
            sqlite_url,
            ADMIN_EMAIL=ADMIN,
            **smtp_env(port),
            # The shortest worker timeout these dependency timeouts allow (config.py).
            GUNICORN_TIMEOUT="6",
            DATABASE_CONNECT_TIMEOUT_SECONDS="1",
            DATABASE_LOCK_TIMEOUT_MS="200",
            DATABASE_STATEMENT_TIMEOUT_MS="500",
        )
        log = tmp_path / "gunicorn.log"
        with gunicorn_process(
            "wsgi:app", env, workers=3, probe_path="/health", output=log
        ) as served:
            assert wait_for(lambda: len(children_of(served.process.pid)) >= 3)
            crashed, stuck, aborted = sorted(children_of(served.process.pid))[:3]
            # gunicorn judges a worker by its heartbeat, which starts some seconds after boot.
            time.sleep(3)
            os.kill(crashed, signal.SIGSEGV)
            os.kill(stuck, signal.SIGSTOP)
            # What gunicorn sends a worker past its timeout: the hook logs where it was.
            os.kill(aborted, signal.SIGABRT)

            def subjects() -> str:
                return " | ".join(str(message["Subject"]) for message in inbox.to(ADMIN))

            try:
                assert wait_for(lambda: "SIGSEGV" in subjects(), timeout=30), subjects()
                assert wait_for(lambda: "WORKER TIMEOUT" in subjects(), timeout=30), subjects()
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stuck, signal.SIGCONT)
    # The aborted worker logs where it was; so may the stuck one, once it runs again.
    abort_lines = [
        line for line in json_lines(log.read_text()) if line["message"] == "worker timed out"
    ]
    assert abort_lines
    for line in abort_lines:
        assert any("MainThread" in name for name in line["threads"])  # type: ignore[union-attr]


def test_a_notification_that_could_not_be_sent_does_not_silence_the_next(
    database_url: str,
) -> None:
    port = free_port()
    app = with_failing_route(build_app(database_url, ADMIN_EMAIL=ADMIN, **smtp_env(port)))
    other_worker = with_failing_route(build_app(database_url, ADMIN_EMAIL=ADMIN, **smtp_env(port)))
    assert app.test_client().post("/api/v1/test-failure").status_code == 500
    time.sleep(0.5)  # the mail server is down: that notification is lost

    with smtp_server(port) as (_, inbox):
        assert other_worker.test_client().post("/api/v1/test-failure").status_code == 500
        assert app.test_client().post("/api/v1/test-failure").status_code == 500

        assert wait_for(lambda: len(inbox.to(ADMIN)) == 1)


def test_a_lock_wait_and_a_lost_database_connection_are_two_alerts(postgres_url: str) -> None:
    with smtp_server() as (port, inbox):
        app = build_app(
            postgres_url,
            **smtp_env(port),
            ADMIN_EMAIL=ADMIN,
            DATABASE_LOCK_TIMEOUT_MS="300",
            DATABASE_STATEMENT_TIMEOUT_MS="2000",
        )
        client = app.test_client()
        session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]
        persist = {"uuid": session_uuid, "consent_user_data": True}

        with row_locked_elsewhere(postgres_url, session_uuid):
            busy = client.post("/api/v1/persist_session", json=persist, headers=JSON_HEADERS)
        assert busy.get_json()["error"] == "session_busy"
        assert wait_for(lambda: len(inbox.to(ADMIN)) == 1)

        # The database ends the app's connections, as a restart or failover does.
        _terminate_app_connections(postgres_url)
        lost = client.post("/api/v1/persist_session", json=persist, headers=JSON_HEADERS)
        assert lost.get_json()["error"] == "database_unavailable"
        assert wait_for(lambda: len(inbox.to(ADMIN)) == 2)

    subjects = [message["Subject"] for message in inbox.to(ADMIN)]
    assert all("OperationalError in sessions.persist_session" in s for s in subjects)


def test_a_long_lived_worker_does_not_remember_every_signature(database_url: str) -> None:
    # Every signature new (one per client network, say), each within its window.
    app = build_app(database_url, ADMIN_NOTIFY_DEDUP_MINUTES="60")
    with app.app_context():
        alerts = current_alerts()
        for number in range(SIGNATURES_REMEMBERED + 10):
            alerts.send(Alert(subject="s", signature=f"burst:network-{number}", facts={}))
        assert alerts.remembered() <= SIGNATURES_REMEMBERED


def _terminate_app_connections(database_url: str) -> None:
    """End the app's connections, and wait until they are gone (termination is a signal)."""
    url = make_url(database_url)
    with contextlib.closing(psycopg2.connect(url.render_as_string(hide_password=False))) as admin:
        admin.autocommit = True
        cursor = admin.cursor()
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND application_name = 'chat-session-service'",
            (url.database,),
        )

        def gone() -> bool:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = %s AND application_name = 'chat-session-service'",
                (url.database,),
            )
            return cursor.fetchone() == (0,)

        assert wait_for(gone), "the app's connections outlived their termination"
