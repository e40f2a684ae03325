"""Check, wait, act: what an operation decided before waiting for a lock is decided again after.

Every operation on a session's files waits for the session's file lock. Each test here makes
another request (or job) hold that lock, with its storage call held open at the proxy, until
PostgreSQL reports the operation waiting for it (its pg_locks view is the barrier). The holder
then ends the session, or takes its files, and commits; only then may the waiter go on, and
it must find the world as the holder left it: answer the contract's error, store nothing and
audit nothing. A job that waited, in turn, must spare a session that became active meanwhile.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg2
import pytest
from flask import Flask
from sqlalchemy import update

from app import jobs
from app.clock import utcnow
from app.extensions import db, lock_key
from app.models import ChatSession
from app.request_context import CORRELATION_HEADER
from tests.conftest import (
    JSON_HEADERS,
    audit_rows,
    build_app,
    s3_env,
    session_row,
    set_session_columns,
)
from tests.s3_proxy import S3Proxy
from tests.test_locks import dsn, eventually, waiting_for_advisory_lock

PDF = b"%PDF-1.7\n%%EOF\n"


@dataclass
class Held:
    """The first storage call of one kind for one session, held open until released."""

    operation: str
    session_uuid: str
    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    _taken: bool = False

    def __call__(self, name: str, path: str, body: bytes) -> None:
        named = self.session_uuid in path or self.session_uuid.encode() in body
        if name == self.operation and named and not self._taken:
            self._taken = True
            self.reached.set()
            self.release.wait(15)


@pytest.fixture
def app(postgres_url: str, s3_endpoint: str, proxy: tuple[S3Proxy, str]) -> Flask:
    return build_app(postgres_url, **{**s3_env(s3_endpoint), "S3_ENDPOINT_URL": proxy[1]})


def new_session_with_file(app: Flask, name: str = "kept.pdf") -> str:
    client = app.test_client()
    session_uuid = str(client.post("/api/v1/generate-uuid").get_json()["uuid"])
    assert upload(app, session_uuid, name).status_code == 200
    return session_uuid


def upload(app: Flask, session_uuid: str, name: str = "late.pdf") -> Any:
    return app.test_client().post(
        "/api/v1/upload",
        data={"session_uuid": session_uuid, "file": (io.BytesIO(PDF), name)},
        content_type="multipart/form-data",
    )


def delete_file(app: Flask, session_uuid: str) -> Any:
    return app.test_client().delete(
        "/api/v1/delete",
        json={"session_uuid": session_uuid, "filename": "kept.pdf"},
        headers=JSON_HEADERS,
    )


def withdraw(app: Flask, session_uuid: str) -> Any:
    return app.test_client().post(
        f"/api/v1/session/{session_uuid}/consent",
        json={"consent_user_data": False},
        headers=JSON_HEADERS,
    )


def erase(app: Flask, session_uuid: str) -> Any:
    return app.test_client().delete(f"/api/v1/session/{session_uuid}", headers=JSON_HEADERS)


def make_idle(app: Flask, session_uuid: str) -> None:
    with app.app_context():
        db.session.execute(
            update(ChatSession)
            .where(ChatSession.uuid == session_uuid)
            .values(last_seen_at=utcnow().replace(year=utcnow().year - 1))
        )
        db.session.commit()


def purge(app: Flask, session_uuid: str) -> Any:
    with app.app_context():
        return jobs.run_abandoned_purge()


def stage(
    app: Flask,
    postgres_url: str,
    proxy: S3Proxy,
    session_uuid: str,
    holder: Callable[[Flask, str], Any],
    held_call: str,
    waiter: Callable[[Flask, str], Any],
) -> tuple[Any, Any]:
    """Run ``holder`` until it holds the file lock, then ``waiter`` until it waits for it."""
    held = Held(held_call, session_uuid)
    proxy.fault = held
    results: dict[str, Any] = {}
    holding = threading.Thread(target=lambda: results.update(holder=holder(app, session_uuid)))
    holding.start()
    assert held.reached.wait(10), "the holder never reached storage"
    waiting = threading.Thread(target=lambda: results.update(waiter=waiter(app, session_uuid)))
    waiting.start()
    files_lock = lock_key(f"session-files:{session_uuid}")
    waited = eventually(lambda: waiting_for_advisory_lock(postgres_url, files_lock))
    held.release.set()
    holding.join(20)
    waiting.join(20)
    proxy.fault = None
    assert waited, "the waiter did not wait for the holder's file lock"
    return results["holder"], results["waiter"]


def stored(app: Flask, session_uuid: str) -> list[str]:
    with app.app_context():
        from app.storage import current_storage, session_objects

        return [o.key for o in session_objects(current_storage(), session_uuid)]


@pytest.mark.parametrize(
    ("waiter", "audited_if_wrong"),
    [(upload, "file_uploaded"), (delete_file, "file_deleted"), (withdraw, "consent_withdrawn")],
)
def test_an_operation_that_waited_for_an_erasure_finds_the_session_gone(
    app: Flask,
    postgres_url: str,
    proxy: tuple[S3Proxy, str],
    waiter: Callable[[Flask, str], Any],
    audited_if_wrong: str,
) -> None:
    session_uuid = new_session_with_file(app)
    before = len(audit_rows(app, audited_if_wrong))

    erased, waited = stage(
        app, postgres_url, proxy[0], session_uuid, erase, "ListObjectsV2", waiter
    )

    assert erased.status_code == 200
    assert waited.status_code == 404
    assert waited.get_json()["error"] == "session_not_found"
    assert stored(app, session_uuid) == []
    assert len(audit_rows(app, audited_if_wrong)) == before
    assert session_row(app, session_uuid) is None


def test_a_file_delete_that_waited_for_a_withdrawal_finds_no_file(
    app: Flask, postgres_url: str, proxy: tuple[S3Proxy, str]
) -> None:
    session_uuid = new_session_with_file(app)

    withdrawn, waited = stage(
        app, postgres_url, proxy[0], session_uuid, withdraw, "DeleteObjects", delete_file
    )

    assert withdrawn.status_code == 200
    assert (waited.status_code, waited.get_json()["error"]) == (404, "file_not_found")
    # The withdrawal's own record of the file it erased, and none of the delete that waited.
    [deleted] = audit_rows(app, "file_deleted")
    assert deleted.correlation_id == withdrawn.headers[CORRELATION_HEADER]


def test_a_purge_that_waited_spares_a_session_that_became_active(
    app: Flask, postgres_url: str, proxy: tuple[S3Proxy, str]
) -> None:
    # The purge chose the session while it was idle; the upload that waited for the purge's
    # file lock touched it first. Erasing it now would erase a session in use.
    session_uuid = new_session_with_file(app)
    make_idle(app, session_uuid)

    purged, waited = stage(
        app, postgres_url, proxy[0], session_uuid, purge, "ListObjectsV2", upload
    )

    assert purged is not None
    assert purged.sessions_purged == 0
    assert waited.status_code == 200
    assert session_row(app, session_uuid) is not None
    assert sorted(stored(app, session_uuid)) == [
        f"uploads/{session_uuid}/kept.pdf",
        f"uploads/{session_uuid}/late.pdf",
    ]


def waiting_for_a_row_lock(url: str) -> bool:
    """Whether some connection waits for a row lock (a transaction id) of another."""
    with closing(psycopg2.connect(dsn(url))) as connection:
        cursor = connection.cursor()
        cursor.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'transactionid' AND NOT granted"
        )
        return bool(cursor.fetchone()[0])


def test_a_resume_that_waited_for_an_erasure_is_not_audited_and_replaces_the_session(
    postgres_url: str,
) -> None:
    """The one-statement resume decided "stale, touch it" before the erasure's lock; after the
    wait its touch finds no row, so it audits nothing, and the general path answers collision."""
    app = build_app(postgres_url)
    client = app.test_client()
    session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]
    set_session_columns(app, session_uuid, last_seen_at=utcnow() - timedelta(hours=1))

    eraser = psycopg2.connect(dsn(postgres_url))
    answers: list[dict[str, Any]] = []
    try:
        cursor = eraser.cursor()
        cursor.execute("DELETE FROM chat_sessions WHERE uuid = %s", (session_uuid,))
        cursor.execute(
            "INSERT INTO retired_session_uuids (uuid, retired_at, reason)"
            " VALUES (%s, now(), 'deleted')",
            (session_uuid,),
        )
        resume = threading.Thread(
            target=lambda: answers.append(
                app.test_client()
                .post("/api/v1/validate-uuid", json={"uuid": session_uuid}, headers=JSON_HEADERS)
                .get_json()
            )
        )
        resume.start()
        assert eventually(lambda: waiting_for_a_row_lock(postgres_url))
        eraser.commit()
        resume.join(10)
    finally:
        eraser.close()

    [answer] = answers
    assert answer["status"] == "collision"
    assert answer["uuid"] != session_uuid
    events = [(row.event_type, str(row.session_uuid)) for row in audit_rows(app)]
    assert ("uuid_validated", session_uuid) not in events
    assert ("uuid_collision", session_uuid) in events
