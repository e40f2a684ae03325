"""No file name outlives its file: not in the audit trail, an admin mail, a log line or CLI output.

File names are personal data (``Jane_Doe_HIV_test_result.pdf``) and audit rows live a year after
the erasure. Files with such names go through every path that stores, refuses, deletes or
erases them, on real S3 protocol (moto behind a fault-injecting proxy), a real SMTP server and
each database; then every place the service writes to is searched for the name and its stem.
"""

from __future__ import annotations

import io
import json
import logging
import traceback
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, update

from app import jobs
from app.clock import utcnow
from app.extensions import db
from app.models import AuditEvent, ChatSession, JobRun, SessionState
from app.storage import current_storage
from tests.conftest import (
    JSON_HEADERS,
    audit_rows,
    base_env,
    build_app,
    operator,
    s3_env,
    smtp_env,
    smtp_server,
)
from tests.s3_proxy import S3Proxy

NAME = "Jane_Doe_HIV_test_result.pdf"
# Compared case-insensitively, so an upper-cased or re-encoded copy of the stem is found too.
STEM = "jane_doe_hiv_test_result"
PDF = b"%PDF-1.7 lab report"
S3_ERROR = b"<Error><Code>InternalError</Code><Message>injected fault</Message></Error>"
ADMIN = "ops@chat.example"


class Everything(logging.Handler):
    """Every log record of the process, with its arguments, extra fields and traceback."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = json.dumps(record.__dict__, default=repr)
        if record.exc_info and record.exc_info[1] is not None:
            text += "".join(traceback.format_exception(record.exc_info[1]))
        self.texts.append(text + record.getMessage())


@pytest.fixture
def captured_logs() -> Iterator[Everything]:
    handler = Everything()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


class World:
    """An app on S3 through the fault proxy, mailing the admin, and what it did along the way."""

    def __init__(self, app: Flask, proxy: S3Proxy, env: dict[str, str]) -> None:
        self.app = app
        self.proxy = proxy
        self.env = env
        self.client: FlaskClient = app.test_client()
        self.cli_output: list[str] = []

    def new_session(self) -> str:
        return str(self.client.post("/api/v1/generate-uuid").get_json()["uuid"])

    def upload(self, session_uuid: str, name: str = NAME, body: bytes = PDF) -> int:
        answer = self.client.post(
            "/api/v1/upload",
            data={"session_uuid": session_uuid, "file": (io.BytesIO(body), name)},
            content_type="multipart/form-data",
        )
        return answer.status_code

    def delete(self, session_uuid: str, name: str = NAME) -> int:
        answer = self.client.delete(
            "/api/v1/delete",
            json={"session_uuid": session_uuid, "filename": name},
            headers=JSON_HEADERS,
        )
        return answer.status_code

    def fail_deletes(self, *session_uuids: str) -> None:
        """Refuse every DeleteObjects that names one of ``session_uuids`` (any, if none)."""

        def refuse(operation: str, path: str, body: bytes) -> tuple[int, bytes] | None:
            if operation != "DeleteObjects":
                return None
            if session_uuids and not any(s.encode() in body for s in session_uuids):
                return None
            return 500, S3_ERROR

        self.proxy.fault = refuse

    def fail(self, operation_name: str) -> None:
        self.proxy.fault = lambda name, path, body: (
            (500, S3_ERROR) if name == operation_name else None
        )

    def heal(self) -> None:
        self.proxy.fault = None

    def idle(self, session_uuid: str, age: timedelta, state: SessionState) -> None:
        with self.app.app_context():
            db.session.execute(
                update(ChatSession)
                .where(ChatSession.uuid == uuid.UUID(session_uuid))
                .values(last_seen_at=utcnow() - age, state=state)
            )
            db.session.commit()

    def flask(self, *command: str) -> str:
        """Run a ``flask`` command as an operator would; its output, kept for the search."""
        result = operator(self.env, "flask", "--app", "wsgi", *command)
        self.cli_output.append(result.stdout + result.stderr)
        return result.stdout

    def wait_for_alerts(self) -> None:
        """Let the admin-alert thread deliver everything queued so far."""
        # One worker delivers in order: once this no-op has run, every earlier alert has.
        self.app.extensions["admin_alerts"]._executor.submit(lambda: None).result(timeout=60)

    def stored(self) -> list[str]:
        with self.app.app_context():
            return [s.key for page in current_storage().list_pages("uploads/") for s in page]


@pytest.fixture
def world(
    database_url: str, s3_endpoint: str, proxy: tuple[S3Proxy, str]
) -> Iterator[tuple[World, Any]]:
    with smtp_server() as (port, inbox):
        settings = {
            **s3_env(s3_endpoint),
            "S3_ENDPOINT_URL": proxy[1],
            "S3_MAX_ATTEMPTS": "1",
            **smtp_env(port),
            "ADMIN_EMAIL": ADMIN,
            # Every alert goes out, so every mail that could carry a name is looked at.
            "ADMIN_NOTIFY_DEDUP_MINUTES": "0",
            "MAX_UPLOAD_MB": "1",
            "ORPHAN_MIN_AGE_MINUTES": "0",
            "LOG_LEVEL": "info",
        }
        app = build_app(database_url, **settings)
        yield World(app, proxy[0], base_env(database_url, **settings)), inbox


def test_no_file_name_is_kept_anywhere(
    world: tuple[World, Any], captured_logs: Everything, capsys: pytest.CaptureFixture[str]
) -> None:
    w, inbox = world
    other_names = ["Jane_Doe_HIV_test_result_2.pdf", "Jane_Doe_HIV_test_result_3.pdf"]

    # Uploads: the successful one and every refusal.
    kept = w.new_session()
    assert w.upload(kept) == 200
    assert w.upload(kept, body=b"not a pdf") == 415
    assert w.upload(kept, name="Jane_Doe_HIV_test_result.txt") == 415
    assert w.upload(kept, body=PDF + b"x" * (1024 * 1024)) == 413
    assert w.upload(kept, body=PDF + b"x" * (2 * 1024 * 1024)) == 413
    assert [w.upload(kept, name) for name in other_names] == [200, 200]
    assert w.upload(kept, "Jane_Doe_HIV_test_result_4.pdf") == 409
    # Replacing a stored file is within the limit, so these reach storage.
    w.fail("PutObject")
    assert w.upload(kept) == 503
    w.fail("ListObjectsV2")
    assert w.upload(kept) == 503
    w.heal()
    assert w.client.get(f"/api/v1/session/{kept}/files").status_code == 200

    # Deletes: refused by storage, then done, then of a file no longer there.
    w.fail_deletes()
    assert w.delete(kept) == 503
    w.heal()
    assert w.delete(kept) == 200
    assert w.delete(kept) == 404

    # Consent withdrawal, refused by storage and then done.
    withdrawn = w.new_session()
    granted = w.client.post(
        "/api/v1/persist_session",
        json={"uuid": withdrawn, "consent_user_data": True, "name": "Jane Doe"},
        headers=JSON_HEADERS,
    )
    assert granted.status_code == 200, granted.get_json()
    assert w.upload(withdrawn) == 200
    consent = f"/api/v1/session/{withdrawn}/consent"
    w.fail_deletes()
    refused = w.client.post(consent, json={"consent_user_data": False}, headers=JSON_HEADERS)
    assert refused.status_code == 503
    w.heal()
    done = w.client.post(consent, json={"consent_user_data": False}, headers=JSON_HEADERS)
    assert done.status_code == 200

    # DELETE /session: with storage working; with its delete failing, retried while it still
    # fails (the files are left for the sweep), and retried once it works.
    erased, left, retried = w.new_session(), w.new_session(), w.new_session()
    for session_uuid in (erased, left, retried):
        assert w.upload(session_uuid) == 200
    assert w.client.delete(f"/api/v1/session/{erased}").status_code == 200
    w.fail_deletes()
    assert w.client.delete(f"/api/v1/session/{left}").status_code == 503
    assert w.client.delete(f"/api/v1/session/{left}").status_code == 503
    assert w.client.delete(f"/api/v1/session/{retried}").status_code == 503
    w.heal()
    assert w.client.delete(f"/api/v1/session/{retried}").status_code == 200

    # The abandoned purge and retention, each erasing one session and failing on another.
    abandoned, abandoned_left = w.new_session(), w.new_session()
    expired, expired_left = w.new_session(), w.new_session()
    for session_uuid in (abandoned, abandoned_left, expired, expired_left):
        assert w.upload(session_uuid) == 200
    for session_uuid in (abandoned, abandoned_left):
        w.idle(session_uuid, timedelta(days=2), SessionState.PENDING)
    for session_uuid in (expired, expired_left):
        w.idle(session_uuid, timedelta(days=400), SessionState.VERIFIED)
    w.fail_deletes(abandoned_left, expired_left)
    with w.app.app_context():
        purged = jobs.run_abandoned_purge()
        retained = jobs.run_retention()
    assert purged is not None
    assert (purged.sessions_purged, purged.errors) == (2, 1)
    assert retained is not None
    assert (retained.sessions_erased, retained.errors) == (2, 1)
    w.heal()

    # The orphan sweep: a loose file beside the folders, a dry run from the command line, a
    # run whose delete fails for one folder, and one that deletes the rest.
    with w.app.app_context():
        current_storage().put(f"uploads/{NAME}", io.BytesIO(PDF), "application/pdf")
    dry = json.loads(w.flask("cleanup", "orphans", "--dry-run"))
    assert (dry["folders_deleted"], dry["loose_files"]) == (3, 1)
    w.fail_deletes(left)
    with w.app.app_context():
        failed_sweep = jobs.run_orphan_sweep()
    assert failed_sweep is not None
    assert (failed_sweep.folders_deleted, failed_sweep.errors) == (2, 1)
    w.heal()
    swept = json.loads(w.flask("cleanup", "orphans"))
    assert (swept["folders_deleted"], swept["errors"]) == (1, 0)
    # What is left: the live session's files, and the loose file the sweep never deletes.
    assert sorted(w.stored()) == sorted(
        [f"uploads/{NAME}", *(f"uploads/{kept}/{name}" for name in other_names)]
    )
    for session_uuid in (kept, withdrawn, left, abandoned_left, expired_left):
        w.flask("audit", "show", session_uuid)
    w.flask("cleanup", "abandoned", "--dry-run")
    w.flask("cleanup", "retention", "--dry-run")
    w.wait_for_alerts()

    captured = capsys.readouterr()
    places = {
        "audit rows": [_row_text(row) for row in audit_rows(w.app)],
        "job runs": _job_runs(w.app),
        "admin mails": [message.as_string() for message in inbox.messages],
        "log records": captured_logs.texts,
        "stderr and stdout": [captured.out, captured.err],
        "command output": w.cli_output,
    }
    assert all(places.values()), "a place to search captured nothing"
    leaks = {
        place: [text[:1000] for text in texts if STEM in text.lower()]
        for place, texts in places.items()
    }
    assert not any(leaks.values()), f"file names found: {leaks}"

    # What recovery needs is there: count, sizes, references and versions, per deleted folder.
    folders = audit_rows(w.app, "orphan_folder_deleted")
    assert {str(row.session_uuid) for row in folders} == {left, abandoned_left, expired_left}
    for row in folders:
        assert row.details["objects"] == 1
        [stored] = row.details["files"]
        assert stored["size"] == len(PDF)
        assert stored["version"]
        assert stored["file_ref"]
    [error] = audit_rows(w.app, "orphan_sweep_error")
    assert error.details["objects"] == 1
    assert error.details["error"]
    assert any("orphan_sweep" in str(message["Subject"]) for message in inbox.messages)


def _row_text(row: AuditEvent) -> str:
    columns = row.__table__.columns
    return json.dumps({column.key: getattr(row, column.key) for column in columns}, default=str)


def _job_runs(app: Flask) -> list[str]:
    with app.app_context():
        return [
            json.dumps(run.last_run_summary, default=str)
            for run in db.session.scalars(select(JobRun))
        ]
