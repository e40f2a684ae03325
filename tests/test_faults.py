"""Faults: storage failing mid-operation, the database gone or locked, a sweep killed halfway.

Storage faults are real S3 protocol errors: the app talks to a proxy in front of the moto
server that answers chosen requests with HTTP 500 instead of forwarding them.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import timedelta

import boto3
import psycopg2
import pytest
from flask import Flask
from sqlalchemy import insert, select, update
from sqlalchemy.engine import make_url
from werkzeug.test import TestResponse

from app import create_app
from app.clock import utcnow
from app.extensions import db, lock_key
from app.models import ChatSession, PendingFileDeletion, RetirementReason, SessionState
from app.services.erasure import erase_all, files_lock_name
from app.services.files import file_ref
from app.services.orphan_sweep import sweep_orphans
from app.storage import StorageUnavailable, current_storage
from tests.conftest import (
    GENERAL_ERROR,
    JSON_HEADERS,
    audit_rows,
    base_env,
    build_app,
    s3_env,
    session_row,
    smtp_env,
    smtp_server,
)
from tests.s3_proxy import DROP, S3Proxy, Slow
from tests.servers import PROJECT_ROOT, free_port
from tests.test_atomicity import audit_refused, audit_trigger
from tests.test_locks import eventually

S3_ERROR = b"<Error><Code>InternalError</Code><Message>injected fault</Message></Error>"
PDF = b"%PDF-1.7 fault test"


@pytest.fixture
def faulty_app(database_url: str, s3_endpoint: str, proxy: tuple[S3Proxy, str]) -> Flask:
    settings = s3_env(s3_endpoint)
    settings["S3_ENDPOINT_URL"] = proxy[1]
    return build_app(database_url, S3_MAX_ATTEMPTS="2", **settings)


@pytest.fixture
def one_attempt_app(database_url: str, s3_endpoint: str, proxy: tuple[S3Proxy, str]) -> Flask:
    """S3 through the proxy, each call tried once: a fault is not hidden by a retry."""
    settings = s3_env(s3_endpoint)
    settings["S3_ENDPOINT_URL"] = proxy[1]
    return build_app(database_url, S3_MAX_ATTEMPTS="1", **settings)


def fail(operation: str, containing: bytes = b"") -> object:
    """A fault rule: answer ``operation`` with 500 when its path or body contains ``containing``."""

    def rule(name: str, path: str, body: bytes) -> tuple[int, bytes] | None:
        if name == operation and (containing in body or containing.decode() in path):
            return 500, S3_ERROR
        return None

    return rule


def stored(app: Flask) -> list[str]:
    with app.app_context():
        return [o.key for page in current_storage().list_pages("uploads/") for o in page]


def new_session(app: Flask) -> str:
    return str(app.test_client().post("/api/v1/generate-uuid").get_json()["uuid"])


def new_session_with_file(app: Flask) -> str:
    session_uuid = new_session(app)
    upload_file(app, session_uuid, "cv.pdf")
    return session_uuid


def upload_file(app: Flask, session_uuid: str, name: str) -> None:
    assert upload_answer(app, session_uuid, name).status_code == 200


def upload_answer(app: Flask, session_uuid: str, name: str = "cv.pdf") -> TestResponse:
    return app.test_client().post(
        "/api/v1/upload",
        data={"session_uuid": session_uuid, "file": (io.BytesIO(PDF), name)},
        content_type="multipart/form-data",
    )


def make_every_session_idle_for_two_days(app: Flask) -> None:
    """Age every session past the abandoned-session threshold (a day)."""
    with app.app_context():
        db.session.execute(update(ChatSession).values(last_seen_at=utcnow() - timedelta(days=2)))
        db.session.commit()


def sessions_oldest_first(app: Flask, count: int) -> list[str]:
    """Sessions with a file each, idle for ``count`` days down to one: the first is the oldest."""
    sessions = [new_session_with_file(app) for _ in range(count)]
    with app.app_context():
        for age, session_uuid in enumerate(reversed(sessions), start=1):
            db.session.execute(
                update(ChatSession)
                .where(ChatSession.uuid == uuid.UUID(session_uuid))
                .values(last_seen_at=utcnow() - timedelta(days=age))
            )
        db.session.commit()
    return sessions


def refuse_listing(session_uuid: str, seen: list[str] | None = None) -> object:
    """A fault rule: answer every listing of one session's folder with 500 (noted in ``seen``)."""

    def rule(name: str, path: str, body: bytes) -> tuple[int, bytes] | None:
        if name == "ListObjectsV2" and session_uuid in path:
            if seen is not None:
                seen.append(path)
            return 500, S3_ERROR
        return None

    return rule


def test_upload_when_storing_fails(
    faulty_app: Flask, proxy: tuple[S3Proxy, str], caplog: pytest.LogCaptureFixture
) -> None:
    proxy[0].fault = fail("PutObject")
    client = faulty_app.test_client()
    session_uuid = str(client.post("/api/v1/generate-uuid").get_json()["uuid"])

    response = client.post(
        "/api/v1/upload",
        data={"session_uuid": session_uuid, "file": (io.BytesIO(PDF), "cv.pdf")},
        content_type="multipart/form-data",
    )

    assert response.status_code == 503
    assert response.get_json()["error"] == "storage_unavailable"
    assert proxy[0].counts["PutObject"] >= 2  # retried, then given up
    proxy[0].fault = None
    assert stored(faulty_app) == []
    assert audit_rows(faulty_app, "file_uploaded") == []
    # The log line (and the admin's stack trace) carries the storage failure behind the 503.
    [failure] = [r for r in caplog.records if r.getMessage() == "domain failure"]
    assert isinstance(failure.exc_info[1].__cause__, StorageUnavailable)


def test_delete_when_deleting_fails(faulty_app: Flask, proxy: tuple[S3Proxy, str]) -> None:
    session_uuid = pending_after_storage_refused(faulty_app, proxy)

    assert stored(faulty_app) == [f"uploads/{session_uuid}/cv.pdf"]
    assert audit_rows(faulty_app, "file_deleted") == []


def delete_file(app: Flask, session_uuid: str, filename: str = "cv.pdf") -> int:
    response = app.test_client().delete(
        "/api/v1/delete",
        json={"filename": filename, "session_uuid": session_uuid},
        headers=JSON_HEADERS,
    )
    return response.status_code


def pending_deletions(app: Flask) -> list[tuple[uuid.UUID, str]]:
    with app.app_context():
        rows = db.session.execute(
            select(PendingFileDeletion.session_uuid, PendingFileDeletion.file_ref)
        )
        return [tuple(row) for row in rows]


def sweep(app: Flask, *, hours_later: int = 0, dry_run: bool = False) -> dict[str, object]:
    """Run the orphan sweep as if ``hours_later`` hours had passed; its report."""
    with app.app_context():
        report = sweep_orphans(
            current_storage(),
            now=utcnow() + timedelta(hours=hours_later),
            min_age=timedelta(minutes=30),
            dry_run=dry_run,
        )
    return report.as_dict()


def pending_after_storage_refused(app: Flask, proxy: tuple[S3Proxy, str]) -> str:
    """A session whose file deletion storage refused (503), so it stays pending."""
    session_uuid = new_session_with_file(app)
    proxy[0].fault = fail("DeleteObjects")
    assert delete_file(app, session_uuid) == 503
    proxy[0].fault = None
    return session_uuid


def test_a_retried_delete_finishes_one_storage_refused(
    faulty_app: Flask, proxy: tuple[S3Proxy, str]
) -> None:
    session_uuid = pending_after_storage_refused(faulty_app, proxy)

    assert delete_file(faulty_app, session_uuid) == 200

    assert stored(faulty_app) == []
    assert len(audit_rows(faulty_app, "file_deleted")) == 1
    assert pending_deletions(faulty_app) == []


def test_a_delete_whose_record_fails_after_deleting_is_finished_by_a_retry(
    database_url: str, storage_env: dict[str, str]
) -> None:
    # Storage deleted the file, then the database refused the record: the file is gone, and
    # what says so must not be lost with the failed transaction.
    app = build_app(database_url, **storage_env)
    session_uuid = pending_after_record_refused(app)
    assert stored(app) == []
    assert audit_rows(app, "file_deleted") == []
    assert len(pending_deletions(app)) == 1

    assert delete_file(app, session_uuid) == 200

    [deleted] = audit_rows(app, "file_deleted")
    assert deleted.details["file_ref"] == pending_ref(app, "cv.pdf")
    assert pending_deletions(app) == []
    assert delete_file(app, session_uuid) == 404


def pending_ref(app: Flask, filename: str) -> str:
    with app.app_context():
        return file_ref(filename)


def pending_after_record_refused(app: Flask) -> str:
    """A session whose file storage deleted but whose deletion the database refused to record."""
    session_uuid = new_session_with_file(app)
    with audit_refused(app, "file_deleted"):
        assert delete_file(app, session_uuid) == 500
    return session_uuid


def test_the_orphan_sweep_finishes_deletions_nobody_retried(
    database_url: str, storage_env: dict[str, str]
) -> None:
    app = build_app(database_url, **storage_env)
    gone = pending_after_record_refused(app)
    still_stored = new_session_with_file(app)
    mark_pending(app, still_stored, "cv.pdf")

    young = sweep(app)
    assert (young["deletions_finished"], young["deletions_pending"]) == (0, 0)
    assert len(pending_deletions(app)) == 2
    dry = sweep(app, hours_later=1, dry_run=True)
    assert (dry["deletions_finished"], dry["deletions_pending"]) == (0, 2)
    assert len(pending_deletions(app)) == 2

    report = sweep(app, hours_later=1)

    assert (report["deletions_finished"], report["deletions_pending"]) == (2, 0)
    assert stored(app) == []
    deleted = audit_rows(app, "file_deleted")
    assert {str(row.session_uuid) for row in deleted} == {gone, still_stored}
    assert pending_deletions(app) == []


def mark_pending(app: Flask, session_uuid: str, *names: str) -> None:
    """Record the deletion of ``names`` as pending, as a request that failed midway leaves it."""
    with app.app_context():
        db.session.execute(
            insert(PendingFileDeletion),
            [
                {
                    "session_uuid": uuid.UUID(session_uuid),
                    "file_ref": file_ref(name),
                    "requested_at": utcnow(),
                }
                for name in names
            ],
        )
        db.session.commit()


def pending_names(app: Flask, *names: str) -> set[tuple[str, str]]:
    """The pending deletions, as (session, name) for the names given."""
    refs = {pending_ref(app, name): name for name in names}
    return {(str(session), refs[ref]) for session, ref in pending_deletions(app)}


def test_the_sweep_leaves_pending_a_session_held_elsewhere_or_whose_storage_fails(
    postgres_url: str, s3_endpoint: str, proxy: tuple[S3Proxy, str]
) -> None:
    settings = {**s3_env(s3_endpoint), "S3_ENDPOINT_URL": proxy[1]}
    app = build_app(postgres_url, S3_MAX_ATTEMPTS="1", **settings)
    # Chosen UUIDs, so the sweep meets them in this order: held, unlistable, held, then free.
    held, unlistable, held_too, free = (
        f"00000000-0000-4000-8000-00000000000{n}" for n in (1, 2, 3, 4)
    )
    for session_uuid in (held, unlistable, held_too, free):
        registered = app.test_client().post("/api/v1/validate-uuid", json={"uuid": session_uuid})
        assert registered.get_json()["status"] == "success"
        upload_file(app, session_uuid, "cv.pdf")
        mark_pending(app, session_uuid, "cv.pdf")
    proxy[0].fault = refuse_listing(unlistable)

    with closing(psycopg2.connect(make_url(postgres_url).render_as_string(False))) as other:
        for session_uuid in (held, held_too):
            other.cursor().execute(
                "SELECT pg_advisory_xact_lock(%s)",
                (lock_key(files_lock_name(uuid.UUID(session_uuid))),),
            )
        report = sweep(app, hours_later=1)

    proxy[0].fault = None
    assert (report["deletions_finished"], report["deletions_pending"]) == (1, 3)
    left = {held, unlistable, held_too}
    assert pending_names(app, "cv.pdf") == {(session_uuid, "cv.pdf") for session_uuid in left}
    assert sorted(stored(app)) == sorted(f"uploads/{session_uuid}/cv.pdf" for session_uuid in left)
    assert [str(row.session_uuid) for row in audit_rows(app, "file_deleted")] == [free]


def refuse_deleting(refused_key: str, s3_endpoint: str, bucket: str) -> object:
    """A fault rule: DeleteObjects deletes every key but ``refused_key``, and reports that one."""
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")

    def rule(name: str, path: str, body: bytes) -> tuple[int, bytes] | None:
        if name != "DeleteObjects":
            return None
        for key in re.findall(r"<Key>(.*?)</Key>", body.decode()):
            if key != refused_key:
                s3.delete_object(Bucket=bucket, Key=key)
        answer = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            '<DeleteResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<Error><Key>{refused_key}</Key><Code>AccessDenied</Code>"
            "<Message>injected</Message></Error></DeleteResult>"
        )
        return 200, answer.encode()

    return rule


def test_a_file_storage_refuses_stays_pending_while_its_neighbour_is_finished(
    database_url: str, s3_endpoint: str, proxy: tuple[S3Proxy, str]
) -> None:
    settings = {**s3_env(s3_endpoint), "S3_ENDPOINT_URL": proxy[1]}
    app = build_app(database_url, S3_MAX_ATTEMPTS="1", **settings)
    session_uuid = new_session_with_file(app)
    upload_file(app, session_uuid, "letter.pdf")
    mark_pending(app, session_uuid, "cv.pdf", "letter.pdf")
    refused = f"uploads/{session_uuid}/letter.pdf"
    proxy[0].fault = refuse_deleting(refused, s3_endpoint, settings["S3_BUCKET"])

    report = sweep(app, hours_later=1)

    proxy[0].fault = None
    assert (report["deletions_finished"], report["deletions_pending"]) == (1, 1)
    assert pending_names(app, "cv.pdf", "letter.pdf") == {(session_uuid, "letter.pdf")}
    assert stored(app) == [refused]
    [deleted] = audit_rows(app, "file_deleted")
    assert deleted.details["file_ref"] == pending_ref(app, "cv.pdf")
    assert delete_file(app, session_uuid, "letter.pdf") == 200
    assert stored(app) == []


def test_an_upload_ends_only_the_pending_deletion_of_its_own_name(
    database_url: str, storage_env: dict[str, str]
) -> None:
    app = build_app(database_url, **storage_env)
    session_uuid = new_session_with_file(app)
    upload_file(app, session_uuid, "letter.pdf")
    mark_pending(app, session_uuid, "cv.pdf", "letter.pdf")

    upload_file(app, session_uuid, "cv.pdf")

    assert pending_names(app, "cv.pdf", "letter.pdf") == {(session_uuid, "letter.pdf")}
    [deleted] = audit_rows(app, "file_deleted")
    assert (str(deleted.session_uuid), deleted.details) == (
        session_uuid,
        {"file_ref": pending_ref(app, "cv.pdf")},
    )


def test_an_upload_of_a_name_pending_deletion_ends_that_deletion(
    faulty_app: Flask, proxy: tuple[S3Proxy, str]
) -> None:
    # Left pending, the deletion would later remove the new upload.
    session_uuid = pending_after_storage_refused(faulty_app, proxy)

    response = faulty_app.test_client().post(
        "/api/v1/upload",
        data={"session_uuid": session_uuid, "file": (io.BytesIO(PDF), "cv.pdf")},
        content_type="multipart/form-data",
    )
    assert response.status_code == 200

    assert pending_deletions(faulty_app) == []
    events = [row.event_type for row in audit_rows(faulty_app) if row.event_type.startswith("file")]
    assert events == ["file_uploaded", "file_deleted", "file_uploaded"]
    sweep(faulty_app, hours_later=1)
    assert stored(faulty_app) == [f"uploads/{session_uuid}/cv.pdf"]


def withdraw_consent(app: Flask, session_uuid: str) -> int:
    response = app.test_client().post(
        f"/api/v1/session/{session_uuid}/consent",
        json={"consent_user_data": False},
        headers=JSON_HEADERS,
    )
    return response.status_code


def test_a_withdrawal_whose_record_fails_after_deleting_is_finished_by_its_retry(
    database_url: str, storage_env: dict[str, str]
) -> None:
    # Storage deleted the files, then the withdrawal could not be recorded: the files are gone,
    # and the retry must still say which, and how many, the withdrawal erased.
    app = build_app(database_url, **storage_env)
    session_uuid = new_session_with_file(app)
    client = app.test_client()
    granted = client.post(
        "/api/v1/persist_session",
        json={"uuid": session_uuid, "consent_user_data": True, "name": "Ada"},
        headers=JSON_HEADERS,
    )
    assert granted.status_code == 200
    with audit_refused(app, "consent_withdrawn"):
        assert withdraw_consent(app, session_uuid) == 500
    assert stored(app) == []
    assert session_row(app, session_uuid).name == "Ada"  # type: ignore[union-attr]
    assert len(pending_deletions(app)) == 1

    assert withdraw_consent(app, session_uuid) == 200

    assert session_row(app, session_uuid).name is None  # type: ignore[union-attr]
    assert [row.details for row in audit_rows(app, "consent_withdrawn")] == [{"files": 1}]
    [deleted] = audit_rows(app, "file_deleted")
    assert deleted.details["file_ref"] == pending_ref(app, "cv.pdf")
    assert pending_deletions(app) == []


def test_erasing_a_session_ends_its_pending_deletions(
    faulty_app: Flask, proxy: tuple[S3Proxy, str]
) -> None:
    session_uuid = pending_after_storage_refused(faulty_app, proxy)

    erased = faulty_app.test_client().delete(f"/api/v1/session/{session_uuid}")

    assert erased.status_code == 200
    assert stored(faulty_app) == []
    assert pending_deletions(faulty_app) == []


def test_erasure_when_deleting_fails_then_a_retry_completes(
    faulty_app: Flask, proxy: tuple[S3Proxy, str], caplog: pytest.LogCaptureFixture
) -> None:
    session_uuid = new_session_with_file(faulty_app)
    client = faulty_app.test_client()
    proxy[0].fault = fail("DeleteObjects")

    refused = client.delete(f"/api/v1/session/{session_uuid}")

    # The session is ended in the database first; only its file is left, and the answer says so.
    assert refused.status_code == 503
    assert session_row(faulty_app, session_uuid) is None
    caplog.clear()
    refused_again = client.delete(f"/api/v1/session/{session_uuid}")
    assert (refused_again.status_code, refused_again.get_json()["error"]) == (
        503,
        "storage_unavailable",
    )
    # The log line (and the admin's stack trace) says what storage answered.
    [failure] = [r for r in caplog.records if r.getMessage() == "domain failure"]
    assert str(failure.exc_info[1].__cause__) == "storage unavailable (failed)"
    proxy[0].fault = None
    assert stored(faulty_app) == [f"uploads/{session_uuid}/cv.pdf"]
    retried = client.delete(f"/api/v1/session/{session_uuid}")
    assert retried.status_code == 200
    assert retried.get_json()["message"] == "Session was already erased."
    assert stored(faulty_app) == []


def test_a_sweep_isolates_folders_whose_delete_fails_and_tells_the_admin_once(
    database_url: str, s3_endpoint: str, proxy: tuple[S3Proxy, str]
) -> None:
    bad = sorted(str(uuid.uuid4()) for _ in range(2))
    good = str(uuid.uuid4())
    with smtp_server() as (port, inbox):
        settings = {**s3_env(s3_endpoint), "S3_ENDPOINT_URL": proxy[1]}
        app = build_app(
            database_url,
            S3_MAX_ATTEMPTS="2",
            ADMIN_EMAIL="ops@chat.example",
            **settings,
            **smtp_env(port),
        )
        with app.app_context():
            for folder in (*bad, good):
                current_storage().put(f"uploads/{folder}/a.pdf", io.BytesIO(PDF), "application/pdf")

        def refuse_bad(name: str, path: str, body: bytes) -> tuple[int, bytes] | None:
            if name == "DeleteObjects" and any(folder.encode() in body for folder in bad):
                return 500, S3_ERROR
            return None

        proxy[0].fault = refuse_bad
        with app.app_context():
            report = sweep_orphans(
                current_storage(),
                now=utcnow() + timedelta(hours=1),
                min_age=timedelta(minutes=30),
                dry_run=False,
            )
        deadline = time.monotonic() + 10
        while not inbox.messages and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)

    assert (report.folders_deleted, report.errors) == (1, 2)
    proxy[0].fault = None
    assert stored(app) == [f"uploads/{folder}/a.pdf" for folder in bad]
    errors = audit_rows(app, "orphan_sweep_error")
    assert [(str(e.session_uuid), e.details["objects"], e.details["error"]) for e in errors] == [
        (folder, 1, "delete failed: InternalError from S3") for folder in bad
    ]
    assert not any("a.pdf" in json.dumps(e.details) for e in errors)
    [notice] = inbox.messages
    assert bad[0] in notice.get_body(preferencelist=("plain",)).get_content()


def test_an_unreachable_database_answers_503_and_tells_the_admin() -> None:
    unreachable = f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/nothing"
    with smtp_server() as (port, inbox):
        app = create_app(
            base_env(
                unreachable,
                DATABASE_CONNECT_TIMEOUT_SECONDS="1",
                ADMIN_EMAIL="admin@ops.example",
                **smtp_env(port),
            )
        )

        response = app.test_client().post("/api/v1/generate-uuid", headers=JSON_HEADERS)

        assert response.status_code == 503
        assert response.get_json()["message"] == GENERAL_ERROR
        deadline = time.monotonic() + 10
        while not inbox.to("admin@ops.example") and time.monotonic() < deadline:
            time.sleep(0.05)
        [alert] = inbox.to("admin@ops.example")
        assert "503" in alert["Subject"]
        assert response.headers["X-Correlation-ID"] in alert.get_body(("plain",)).get_content()


def test_a_sweep_killed_halfway_loses_nothing_and_the_next_run_finishes(
    postgres_url: str, s3_endpoint: str
) -> None:
    settings = s3_env(s3_endpoint)
    bucket = settings["S3_BUCKET"]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    app = build_app(postgres_url, **settings)
    live = [new_session_with_file(app) for _ in range(3)]
    orphans = [str(uuid.uuid4()) for _ in range(1500)]
    for orphan in orphans:
        s3.put_object(Bucket=bucket, Key=f"uploads/{orphan}/a.pdf", Body=PDF)

    s3_proxy = S3Proxy(s3_endpoint)

    def slow_deletes(name: str, path: str, body: bytes) -> None:
        if name == "DeleteObjects":
            time.sleep(1.0)
        return

    s3_proxy.fault = slow_deletes
    with s3_proxy.serving() as proxy_url:
        env = base_env(
            postgres_url, ORPHAN_MIN_AGE_MINUTES="0", **{**settings, "S3_ENDPOINT_URL": proxy_url}
        )
        sweeper = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", "wsgi", "cleanup", "orphans"],
            cwd=PROJECT_ROOT,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while s3_proxy.completed["DeleteObjects"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        sweeper.send_signal(signal.SIGKILL)
        sweeper.wait(timeout=10)
    halfway = {
        key["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for key in page.get("Contents", [])
    }

    assert sweeper.returncode == -signal.SIGKILL
    assert 0 < sum(f"uploads/{o}/a.pdf" in halfway for o in orphans) < len(orphans)

    rerun = create_app(base_env(postgres_url, ORPHAN_MIN_AGE_MINUTES="0", **settings))
    result = rerun.test_cli_runner().invoke(args=["cleanup", "orphans"])

    assert result.exit_code == 0, result.output
    remaining = stored(app)
    assert sorted(remaining) == sorted(f"uploads/{session}/cv.pdf" for session in live)


@contextmanager
def row_locked_elsewhere(
    database_url: str, session_uuid: str, *, files: bool = False
) -> Iterator[None]:
    """Another connection holds the session's row (PostgreSQL) or the write lock (SQLite).

    With ``files``, on PostgreSQL it holds the session's file lock instead, as a file
    operation in progress does.
    """
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        holder = sqlite3.connect(str(url.database), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
    elif files:
        holder = psycopg2.connect(url.render_as_string(hide_password=False))
        key = lock_key(files_lock_name(uuid.UUID(session_uuid)))
        holder.cursor().execute("SELECT pg_advisory_xact_lock(%s)", (key,))
    else:
        holder = psycopg2.connect(url.render_as_string(hide_password=False))
        holder.cursor().execute(
            "SELECT uuid FROM chat_sessions WHERE uuid = %s FOR UPDATE", (session_uuid,)
        )
    try:
        yield
    finally:
        holder.rollback()
        holder.close()


def test_a_session_held_too_long_answers_busy_and_a_retry_succeeds(database_url: str) -> None:
    with smtp_server() as (port, inbox):
        app = build_app(database_url, ADMIN_EMAIL="ops@chat.example", **smtp_env(port))
        client = app.test_client()
        session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]
        body = {"uuid": session_uuid, "consent_user_data": True}

        with row_locked_elsewhere(database_url, session_uuid):
            started = time.monotonic()
            busy = client.post("/api/v1/persist_session", json=body, headers=JSON_HEADERS)
            waited = time.monotonic() - started

        assert busy.status_code == 503
        assert busy.get_json()["error"] == "session_busy"
        assert busy.headers["Retry-After"] == "1"
        assert 1.5 < waited < 4.0, "the wait is the 2 s lock timeout, not the statement timeout"
        retried = client.post("/api/v1/persist_session", json=body, headers=JSON_HEADERS)
        assert retried.status_code == 200
        # The admin learns which lock and where: the database's own error, with its trace.
        deadline = time.monotonic() + 10
        while not inbox.messages and time.monotonic() < deadline:
            time.sleep(0.05)
        [alert] = inbox.messages
        text = alert.get_body(preferencelist=("plain",)).get_content()
        assert "OperationalError" in text
        assert "lock" in text.lower()
        assert "persist_session" in text


def test_an_upload_to_a_held_session_stores_nothing(
    database_url: str, storage_env: dict[str, str]
) -> None:
    app = build_app(database_url, **storage_env)
    client = app.test_client()
    session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]

    with row_locked_elsewhere(database_url, session_uuid, files=True):
        busy = client.post(
            "/api/v1/upload",
            data={"session_uuid": session_uuid, "file": (io.BytesIO(PDF), "cv.pdf")},
            content_type="multipart/form-data",
        )

    assert busy.status_code == 503
    assert busy.get_json()["error"] == "session_busy"
    assert stored(app) == []


def test_repeating_an_erasure_lists_the_folder_once(
    faulty_app: Flask, proxy: tuple[S3Proxy, str]
) -> None:
    session_uuid = new_session_with_file(faulty_app)
    client = faulty_app.test_client()
    assert client.delete(f"/api/v1/session/{session_uuid}").status_code == 200
    proxy[0].reset()

    again = client.delete(f"/api/v1/session/{session_uuid}")

    assert again.get_json()["message"] == "Session was already erased."
    assert dict(proxy[0].counts) == {"ListObjectsV2": 1}


def test_readiness_names_a_missing_bucket_and_the_create_command_makes_it(
    database_url: str, s3_endpoint: str
) -> None:
    settings = {**s3_env(s3_endpoint), "S3_BUCKET": f"missing-{uuid.uuid4().hex[:12]}"}
    app = build_app(database_url, **settings, READY_CACHE_SECONDS="0")
    client, runner = app.test_client(), app.test_cli_runner()

    missing = client.get("/ready")

    assert missing.status_code == 503
    assert missing.get_json()["checks"]["storage"] == "unavailable"
    assert missing.get_json()["reasons"]["storage"].startswith("missing_bucket: ")
    assert runner.invoke(args=["storage", "create"]).stdout.strip() == "created"
    assert client.get("/ready").get_json()["reasons"] == {}
    assert runner.invoke(args=["storage", "create"]).stdout.strip() == "already exists"


def test_readiness_names_refused_access(faulty_app: Flask, proxy: tuple[S3Proxy, str]) -> None:
    proxy[0].fault = lambda name, path, body: (403, b"") if name == "HeadBucket" else None

    refused = faulty_app.test_client().get("/ready")

    assert refused.status_code == 503
    assert refused.get_json()["reasons"]["storage"].startswith("access_denied: ")


@pytest.mark.parametrize("job", ["abandoned", "retention"])
def test_one_undeletable_file_stalls_no_erasure_job(
    database_url: str, s3_endpoint: str, proxy: tuple[S3Proxy, str], job: str
) -> None:
    with smtp_server() as (port, inbox):
        settings = {**s3_env(s3_endpoint), "S3_ENDPOINT_URL": proxy[1]}
        app = build_app(database_url, ADMIN_EMAIL="ops@chat.example", **settings, **smtp_env(port))
        sessions = [new_session_with_file(app) for _ in range(5)]
        stuck = sessions[2]
        state = SessionState.VERIFIED if job == "retention" else SessionState.PENDING
        with app.app_context():
            db.session.execute(
                update(ChatSession).values(last_seen_at=utcnow() - timedelta(days=400), state=state)
            )
            db.session.commit()
        proxy[0].fault = fail("DeleteObjects", stuck.encode())
        runner = app.test_cli_runner()

        first = json.loads(runner.invoke(args=["cleanup", job]).stdout)
        second = json.loads(runner.invoke(args=["cleanup", job]).stdout)

        erased = "sessions_purged" if job == "abandoned" else "sessions_erased"
        assert (first[erased], first["files_deleted"], first["errors"]) == (5, 4, 1)
        assert (second[erased], second["errors"]) == (0, 0)
        assert all(session_row(app, session) is None for session in sessions)
        assert stored(app) == [f"uploads/{stuck}/cv.pdf"]
        [problem] = audit_rows(app, f"{'abandoned_purge' if job == 'abandoned' else job}_error")
        assert (str(problem.session_uuid), problem.details) == (
            stuck,
            {"error": "storage unavailable (failed)"},
        )
        deadline = time.monotonic() + 10
        while not inbox.messages and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert len(inbox.messages) == 1, "reported to the admin once"
        job_name = "abandoned_sessions" if job == "abandoned" else "retention"
        assert inbox.messages[0]["Subject"] == (
            f"[Chat Assistant] {job_name}: 1 session(s) not finished, "
            "e.g. storage unavailable (failed)"
        )

    # The stuck file belongs to no session now: the orphan sweep deletes it once it can.
    proxy[0].fault = None
    app.config["ORPHAN_MIN_AGE_MINUTES"] = 0
    assert (
        json.loads(app.test_cli_runner().invoke(args=["cleanup", "orphans"]).stdout)[
            "folders_deleted"
        ]
        == 1
    )
    assert stored(app) == []


def test_a_session_whose_listing_times_out_stalls_no_purge(
    database_url: str, s3_endpoint: str, proxy: tuple[S3Proxy, str]
) -> None:
    settings = {**s3_env(s3_endpoint), "S3_ENDPOINT_URL": proxy[1]}
    app = build_app(database_url, S3_READ_TIMEOUT_SECONDS="1", S3_MAX_ATTEMPTS="1", **settings)
    sessions = sorted(new_session_with_file(app) for _ in range(5))
    stuck = sessions[0]  # first in line, so it is listed before the others
    make_every_session_idle_for_two_days(app)

    def hang_on_stuck(name: str, path: str, body: bytes) -> None:
        if name == "ListObjectsV2" and stuck in path:
            time.sleep(2)  # longer than the read timeout: the call times out
        return

    proxy[0].fault = hang_on_stuck
    summary = json.loads(app.test_cli_runner().invoke(args=["cleanup", "abandoned"]).stdout)

    assert (summary["sessions_purged"], summary["errors"]) == (4, 1)
    assert [session for session in sessions if session_row(app, session)] == [stuck]
    [problem] = audit_rows(app, "abandoned_purge_error")
    assert (str(problem.session_uuid), problem.details) == (
        stuck,
        {"error": "files could not be listed (unreachable)"},
    )


def test_storage_that_stops_answering_stops_a_purge_after_one_session(
    one_attempt_app: Flask, proxy: tuple[S3Proxy, str]
) -> None:
    app = one_attempt_app
    sessions = [new_session_with_file(app) for _ in range(3)]
    make_every_session_idle_for_two_days(app)
    proxy[0].reset()
    proxy[0].fault = lambda name, path, body: DROP

    summary = json.loads(app.test_cli_runner().invoke(args=["cleanup", "abandoned"]).stdout)

    # One listing fails, one check confirms storage is gone: waiting out a timeout for each
    # further session would only hold the job up.
    assert (summary["sessions_purged"], summary["errors"]) == (0, 3)
    assert dict(proxy[0].counts) == {"ListObjectsV2": 1, "HeadBucket": 1}
    assert all(session_row(app, session) is not None for session in sessions)
    # Each session not listed is on the record with the reason, the unlisted ones too.
    problems = {
        str(row.session_uuid): row.details for row in audit_rows(app, "abandoned_purge_error")
    }
    unlisted = {"error": "files could not be listed (unreachable)"}
    assert problems == dict.fromkeys(sessions, unlisted)


def test_erasing_works_through_every_batch_past_a_session_it_cannot_list(
    one_attempt_app: Flask, proxy: tuple[S3Proxy, str]
) -> None:
    app = one_attempt_app
    sessions = sessions_oldest_first(app, 5)
    stuck = sessions[0]
    stuck_listings: list[str] = []
    proxy[0].fault = refuse_listing(stuck, stuck_listings)
    with app.app_context():
        totals = erase_all(
            ChatSession.last_seen_at < utcnow(), reason=RetirementReason.ABANDONED, batch_size=2
        )

    # Oldest first, two at a time: the stuck session is tried once and the others all go.
    assert (totals.sessions, totals.files, list(totals.problems)) == (4, 4, [uuid.UUID(stuck)])
    assert [session for session in sessions if session_row(app, session)] == [stuck]
    assert len(stuck_listings) == 1


def test_a_batch_that_erases_nothing_ends_the_run(
    one_attempt_app: Flask, proxy: tuple[S3Proxy, str]
) -> None:
    app = one_attempt_app
    sessions = sessions_oldest_first(app, 3)
    stuck = sessions[0]
    proxy[0].fault = refuse_listing(stuck)
    with app.app_context():
        totals = erase_all(
            ChatSession.last_seen_at < utcnow(), reason=RetirementReason.ABANDONED, batch_size=1
        )

    # The oldest session, alone in its batch, cannot be listed: storage is most likely down, so
    # the run stops there and the next run starts over.
    assert (totals.sessions, list(totals.problems)) == (0, [uuid.UUID(stuck)])
    assert all(session_row(app, session) is not None for session in sessions)


def test_storage_that_stops_answering_mid_delete_is_not_retried_session_by_session(
    one_attempt_app: Flask, proxy: tuple[S3Proxy, str]
) -> None:
    app = one_attempt_app
    sessions = [new_session_with_file(app) for _ in range(3)]
    make_every_session_idle_for_two_days(app)
    proxy[0].reset()
    proxy[0].fault = lambda name, path, body: DROP if name == "DeleteObjects" else None

    summary = json.loads(app.test_cli_runner().invoke(args=["cleanup", "abandoned"]).stdout)

    # The sessions are ended; their files wait for the orphan sweep.
    assert (summary["sessions_purged"], summary["errors"]) == (3, 3)
    assert proxy[0].counts["DeleteObjects"] == 1
    assert all(session_row(app, session) is None for session in sessions)
    problems = audit_rows(app, "abandoned_purge_error")
    assert {p.details["error"] for p in problems} == {"storage unavailable (unreachable)"}


def test_a_session_that_comes_back_while_a_purge_lists_its_files_is_kept(
    database_url: str, s3_endpoint: str, proxy: tuple[S3Proxy, str]
) -> None:
    settings = {**s3_env(s3_endpoint), "S3_ENDPOINT_URL": proxy[1]}
    app = build_app(database_url, **settings)
    session_uuid = new_session_with_file(app)
    make_every_session_idle_for_two_days(app)
    listing, resume = threading.Event(), threading.Event()

    def hold_the_listing(name: str, path: str, body: bytes) -> None:
        if name == "ListObjectsV2" and session_uuid in path:
            listing.set()
            resume.wait(10)
        return

    proxy[0].fault = hold_the_listing
    summaries: list[dict[str, object]] = []
    purge = threading.Thread(
        target=lambda: summaries.append(
            json.loads(app.test_cli_runner().invoke(args=["cleanup", "abandoned"]).stdout)
        )
    )
    purge.start()
    assert listing.wait(10), "the purge never listed the session's files"
    # The visitor returns while the purge is waiting for storage.
    validated = app.test_client().post("/api/v1/validate-uuid", json={"uuid": session_uuid})
    resume.set()
    purge.join(20)

    assert validated.get_json()["status"] == "success"
    assert summaries[0]["sessions_purged"] == 0
    assert session_row(app, session_uuid) is not None
    assert stored(app) == [f"uploads/{session_uuid}/cv.pdf"]


def test_an_upload_whose_record_fails_after_storing_leaves_no_file(
    database_url: str, storage_env: dict[str, str]
) -> None:
    # The database refuses the upload's audit row after the object was stored: the file must go.
    app = build_app(database_url, **storage_env)
    client = app.test_client()
    session_uuid = str(client.post("/api/v1/generate-uuid").get_json()["uuid"])

    with audit_refused(app, "file_uploaded"):
        response = client.post(
            "/api/v1/upload",
            data={"session_uuid": session_uuid, "file": (io.BytesIO(PDF), "cv.pdf")},
            content_type="multipart/form-data",
        )

    assert response.status_code == 500
    assert stored(app) == []
    assert audit_rows(app, "file_uploaded") == []
    listed = client.get(f"/api/v1/session/{session_uuid}/files").get_json()
    assert listed["files"] == []


@contextmanager
def at_commit(app: Flask, event_type: str, plpgsql: str) -> Iterator[None]:
    """A COMMIT carrying an audit row of ``event_type`` first runs ``plpgsql`` on the server.

    A deferred constraint trigger runs at COMMIT time, after every statement has succeeded.
    """
    statements = [
        "CREATE OR REPLACE FUNCTION at_commit() RETURNS trigger AS $$ BEGIN "
        f"{plpgsql}; RETURN NULL; END $$ LANGUAGE plpgsql",
        "CREATE CONSTRAINT TRIGGER at_commit AFTER INSERT ON audit_events "
        f"DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.event_type = '{event_type}') "
        "EXECUTE FUNCTION at_commit()",
    ]
    with audit_trigger(app, statements, "DROP TRIGGER at_commit ON audit_events"):
        yield


def test_an_upload_whose_commit_is_refused_leaves_no_file(postgres_url: str) -> None:
    # The server answered: the COMMIT failed, so nothing was recorded and the file must go.
    app = build_app(postgres_url)
    session_uuid = new_session(app)

    with at_commit(app, "file_uploaded", "RAISE EXCEPTION 'refused at commit'"):
        response = upload_answer(app, session_uuid)

    assert response.status_code == 500
    assert stored(app) == []
    assert audit_rows(app, "file_uploaded") == []


def test_an_upload_whose_commit_lands_after_its_answer_keeps_its_file(postgres_url: str) -> None:
    # The COMMIT reaches the server and the request gives up at its deadline before the answer
    # comes; then the commit lands. The trail says the file was stored, so it must be stored.
    app = build_app(
        postgres_url, REQUEST_DEADLINE_SECONDS="1", DATABASE_STATEMENT_TIMEOUT_MS="5000"
    )
    session_uuid = new_session(app)

    # The COMMIT sleeps on the server: the client may give up and lose the answer while the
    # server goes on and commits, which is how a lost connection looks from both ends.
    with at_commit(app, "file_uploaded", "PERFORM pg_sleep(2)"):
        response = upload_answer(app, session_uuid)
        assert response.status_code == 503
        assert eventually(lambda: audit_rows(app, "file_uploaded") != [], timeout=5)

    assert [key.rpartition("/")[2] for key in stored(app)] == ["cv.pdf"]


def test_readiness_checks_once_per_interval_and_within_its_bound(
    database_url: str, s3_endpoint: str, proxy: tuple[S3Proxy, str]
) -> None:
    app = build_app(
        database_url,
        **{**s3_env(s3_endpoint), "S3_ENDPOINT_URL": proxy[1]},
        READY_CACHE_SECONDS="2",
        READY_TIMEOUT_SECONDS="1",
        S3_READ_TIMEOUT_SECONDS="10",
    )
    client = app.test_client()

    answers = [client.get("/ready").status_code for _ in range(20)]
    assert answers == [200] * 20
    assert proxy[0].counts["HeadBucket"] == 1

    time.sleep(2.1)
    proxy[0].slow["HeadBucket"] = Slow("hold")
    started = time.monotonic()
    stalled = client.get("/ready")
    assert time.monotonic() - started < 2.0
    assert stalled.status_code == 503
    assert stalled.get_json()["reasons"]["storage"].startswith("unreachable")
    assert proxy[0].counts["HeadBucket"] == 2
