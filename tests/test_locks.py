"""Guarantees that rest on PostgreSQL locks, staged so that they fail every time they break.

No test here hopes that two requests happen to overlap. Each one makes the overlap happen:
a storage call is held open at the proxy, or the lock is held by the test itself, and the
test then waits until PostgreSQL reports the other request waiting for that lock (its
pg_locks view is the barrier). If the lock were not taken, the request would not wait, and
the test fails on the spot rather than on an unlucky day.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import threading
import time
from collections.abc import Callable
from contextlib import closing
from datetime import timedelta

import psycopg2
from flask import Flask
from sqlalchemy import select, update
from sqlalchemy.engine import make_url

from app.clock import utcnow
from app.extensions import db, lock_key
from app.models import ChatSession
from tests.conftest import (
    JSON_HEADERS,
    TEST_SECRET_KEY,
    build_app,
    s3_env,
    smtp_env,
    smtp_server,
)
from tests.s3_proxy import S3Proxy

PDF = b"%PDF-1.7\n%%EOF\n"


def dsn(url: str) -> str:
    return make_url(url).render_as_string(hide_password=False)


def waiting_for_advisory_lock(url: str, key: int) -> bool:
    """Whether some connection is waiting (not granted) for the advisory lock ``key``."""
    high, low = (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF
    with closing(psycopg2.connect(dsn(url))) as connection:
        cursor = connection.cursor()
        cursor.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND classid = %s AND objid = %s",
            (high, low),
        )
        return bool(cursor.fetchone()[0])


def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_an_upload_waits_for_another_upload_of_its_session_and_the_limit_holds(
    postgres_url: str, s3_endpoint: str, proxy: tuple[S3Proxy, str]
) -> None:
    settings = {**s3_env(s3_endpoint), "S3_ENDPOINT_URL": proxy[1]}
    app = build_app(postgres_url, MAX_FILES_PER_SESSION="3", **settings)
    session_uuid = app.test_client().post("/api/v1/generate-uuid").get_json()["uuid"]
    for name in ("one.pdf", "two.pdf"):
        assert upload(app, session_uuid, name) == 200

    first_is_storing, release_first = threading.Event(), threading.Event()

    def hold_the_first_put(name: str, path: str, body: bytes) -> None:
        if name == "PutObject" and "first.pdf" in path:
            first_is_storing.set()
            release_first.wait(10)
        return

    proxy[0].fault = hold_the_first_put
    results: dict[str, int] = {}
    first = threading.Thread(
        target=lambda: results.update(first=upload(app, session_uuid, "first.pdf"))
    )
    first.start()
    assert first_is_storing.wait(10), "the first upload never reached storage"
    # The first upload has counted two files and is storing the third, its file lock held.
    second = threading.Thread(
        target=lambda: results.update(second=upload(app, session_uuid, "second.pdf"))
    )
    second.start()
    files_lock = lock_key(f"session-files:{session_uuid}")
    second_waited = eventually(lambda: waiting_for_advisory_lock(postgres_url, files_lock))
    release_first.set()
    first.join(20)
    second.join(20)

    assert second_waited, "the second upload did not wait for the first one's file lock"
    assert results == {"first": 200, "second": 409}


def upload(app: Flask, session_uuid: str, name: str) -> int:
    response = app.test_client().post(
        "/api/v1/upload",
        data={"session_uuid": session_uuid, "file": (io.BytesIO(PDF), name)},
        content_type="multipart/form-data",
    )
    return response.status_code


def test_sends_to_one_address_wait_for_each_other(postgres_url: str) -> None:
    with smtp_server() as (port, inbox):
        app = build_app(postgres_url, EMAIL_SENDS_PER_ADDRESS_PER_DAY="1", **smtp_env(port))
        client = app.test_client()
        sessions = [client.post("/api/v1/generate-uuid").get_json()["uuid"] for _ in range(2)]
        digest = hmac.new(
            TEST_SECRET_KEY.encode(), b"address:victim@example.org", hashlib.sha256
        ).hexdigest()
        address_lock = lock_key(f"email-address:{digest}")
        outcomes: list[str] = []

        def ask(session_uuid: str) -> None:
            response = app.test_client().post(
                "/api/v1/email-verification/verify-email",
                json={"email": "Victim@Example.org"},
                headers={**JSON_HEADERS, "X-Session-ID": session_uuid},
            )
            outcomes.append(response.get_json().get("code") or "sent")

        # The test holds the address's lock, as a first request counting its sends would.
        with closing(psycopg2.connect(dsn(postgres_url))) as holder:
            holder.cursor().execute("SELECT pg_advisory_xact_lock(%s)", (address_lock,))
            waiting = threading.Thread(target=ask, args=(sessions[0],))
            waiting.start()
            counted_in_turn = eventually(
                lambda: waiting_for_advisory_lock(postgres_url, address_lock)
            )
            holder.rollback()
        waiting.join(20)
        ask(sessions[1])

    assert counted_in_turn, "a send did not wait for the address's lock before counting"
    assert sorted(outcomes) == ["address_daily_limit", "sent"]
    assert len(inbox.messages) == 1


def test_a_purge_passes_over_a_session_whose_files_are_in_use(postgres_url: str) -> None:
    app = build_app(postgres_url)
    client = app.test_client()
    busy, idle = (client.post("/api/v1/generate-uuid").get_json()["uuid"] for _ in range(2))
    with app.app_context():
        db.session.execute(update(ChatSession).values(last_seen_at=utcnow() - timedelta(days=2)))
        db.session.commit()

    # The test holds the busy session's file lock, as a request storing a file would.
    with closing(psycopg2.connect(dsn(postgres_url))) as holder:
        holder.cursor().execute("SELECT pg_advisory_lock(%s)", (lock_key(f"session-files:{busy}"),))
        summary = json.loads(app.test_cli_runner().invoke(args=["cleanup", "abandoned"]).stdout)

    assert (summary["sessions_purged"], summary["errors"]) == (1, 0)
    with app.app_context():
        assert [str(u) for u in db.session.scalars(select(ChatSession.uuid))] == [busy]
    assert client.post("/api/v1/validate-uuid", json={"uuid": idle}).get_json()["status"] == (
        "collision"
    )


def test_erasing_a_session_waits_for_a_request_storing_its_files(postgres_url: str) -> None:
    app = build_app(postgres_url)
    session_uuid = app.test_client().post("/api/v1/generate-uuid").get_json()["uuid"]
    files_lock = lock_key(f"session-files:{session_uuid}")
    answers: list[int] = []

    with closing(psycopg2.connect(dsn(postgres_url))) as holder:
        holder.cursor().execute("SELECT pg_advisory_lock(%s)", (files_lock,))
        erasing = threading.Thread(
            target=lambda: answers.append(
                app.test_client().delete(f"/api/v1/session/{session_uuid}").status_code
            )
        )
        erasing.start()
        waited = eventually(lambda: waiting_for_advisory_lock(postgres_url, files_lock))
        answered_while_held = list(answers)
        holder.cursor().execute("SELECT pg_advisory_unlock(%s)", (files_lock,))
        erasing.join(20)

    assert waited, "the erasure did not wait for the session's file lock"
    assert answered_while_held == []
    assert answers == [200]
