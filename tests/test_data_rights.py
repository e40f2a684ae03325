"""GDPR self-service: export, rectification, consent, erasure; and retention."""

from __future__ import annotations

import io
import json
import uuid
from datetime import timedelta

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import update

from app.clock import utcnow
from app.extensions import db
from app.models import AuditEvent, ChatSession, ConsentEvent, EmailSend, SessionState
from app.services.retention import apply_retention
from app.storage import current_storage, session_objects
from tests.conftest import JSON_HEADERS, audit_rows, build_app, session_row, unreachable_s3_env


@pytest.fixture
def app(database_url: str, storage_env: dict[str, str]) -> Flask:
    return build_app(database_url, CONSENT_WORDING_VERSION="2026-11", **storage_env)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def person(client: FlaskClient, name: str, email: str, filename: str = "cv.pdf") -> str:
    """A session with consent, a name, an e-mail and one file."""
    session_uuid = str(client.post("/api/v1/generate-uuid").get_json()["uuid"])
    saved = client.post(
        "/api/v1/persist_session",
        json={"uuid": session_uuid, "consent_user_data": True, "name": name, "email": email},
        headers=JSON_HEADERS,
    )
    assert saved.status_code == 200
    uploaded = client.post(
        "/api/v1/upload",
        data={
            "session_uuid": session_uuid,
            "file": (io.BytesIO(b"%PDF-1.7 " + name.encode()), filename),
        },
        content_type="multipart/form-data",
    )
    assert uploaded.status_code == 200
    return session_uuid


def files_of(app: Flask, session_uuid: str) -> list[str]:
    with app.app_context():
        return [o.key for o in session_objects(current_storage(), session_uuid)]


def set_row(app: Flask, session_uuid: str, **values: object) -> None:
    with app.app_context():
        db.session.execute(
            update(ChatSession).where(ChatSession.uuid == uuid.UUID(session_uuid)).values(**values)
        )
        db.session.commit()


def test_export_holds_exactly_this_sessions_data(app: Flask, client: FlaskClient) -> None:
    ada = person(client, "Ada Lovelace", "ada@example.org", "ada.pdf")
    bob = person(client, "Bob Other", "bob@example.org", "bob.pdf")

    response = client.get(f"/api/v1/session/{ada}/export")

    assert response.status_code == 200
    assert response.headers["Content-Disposition"] == f'attachment; filename="session-{ada}.json"'
    body = response.get_json()
    profile = body["profile"]
    assert (profile["uuid"], profile["name"], profile["email"]) == (
        ada,
        "Ada Lovelace",
        "ada@example.org",
    )
    assert [
        (c["granted"], c["wording_version"], c["client_ip"]) for c in body["consent_history"]
    ] == [(True, "2026-11", "127.0.0.0")]
    assert [f["filename"] for f in body["files"]] == ["ada.pdf"]
    assert body["files"][0]["url"]
    events = [event["event_type"] for event in body["audit_events"]]
    assert events[:3] == ["uuid_generated", "consent_granted", "personal_data_updated"]
    assert "file_uploaded" in events
    text = response.get_data(as_text=True)
    assert bob not in text
    assert "Bob" not in text
    assert "bob.pdf" not in text
    assert audit_rows(app)[-1].event_type == "data_exported"


def test_rectification_requires_verifying_a_new_email(app: Flask, client: FlaskClient) -> None:
    ada = person(client, "Ada", "ada@example.org")
    set_row(app, ada, email_verified=True, state=SessionState.VERIFIED, completed_at=utcnow())

    response = client.patch(
        f"/api/v1/session/{ada}",
        json={"email": "ada@new.example", "name": "Ada L."},
        headers=JSON_HEADERS,
    )

    assert response.status_code == 200
    body = response.get_json()
    assert (body["state"], body["email_verified"], body["completed_at"]) == ("pending", False, None)
    row = session_row(app, ada)
    assert row is not None
    assert (row.name, row.email) == ("Ada L.", "ada@new.example")
    assert audit_rows(app, "personal_data_rectified")[-1].details == {"fields": ["name", "email"]}


def test_rectifying_a_name_needs_consent(app: Flask, client: FlaskClient) -> None:
    anonymous = str(client.post("/api/v1/generate-uuid").get_json()["uuid"])

    response = client.patch(
        f"/api/v1/session/{anonymous}", json={"name": "X"}, headers=JSON_HEADERS
    )
    unknown = client.patch(
        f"/api/v1/session/{uuid.uuid4()}", json={"name": "X"}, headers=JSON_HEADERS
    )

    assert response.status_code == 400
    assert response.get_json()["error"] == "consent_required"
    assert unknown.status_code == 404


def test_withdrawing_consent_erases_personal_data_and_files_but_keeps_the_session(
    app: Flask, client: FlaskClient
) -> None:
    ada = person(client, "Ada", "ada@example.org")

    response = client.post(
        f"/api/v1/session/{ada}/consent", json={"consent_user_data": False}, headers=JSON_HEADERS
    )

    assert response.status_code == 200
    assert response.get_json()["consent_user_data"] is False
    row = session_row(app, ada)
    assert row is not None
    assert (row.name, row.email, row.email_verified, row.state) == (
        None,
        None,
        False,
        SessionState.PENDING,
    )
    assert files_of(app, ada) == []
    with app.app_context():
        history = db.session.query(ConsentEvent).order_by(ConsentEvent.id).all()
    assert [event.granted for event in history] == [True, False]
    assert audit_rows(app, "consent_withdrawn")[0].details == {"files": 1}
    again = client.post(
        f"/api/v1/session/{ada}/consent", json={"consent_user_data": True}, headers=JSON_HEADERS
    )
    assert again.get_json()["consent_user_data"] is True


def test_delete_erases_everything_and_is_safe_to_repeat(app: Flask, client: FlaskClient) -> None:
    ada = person(client, "Ada", "ada@example.org")
    sent = client.post(
        "/api/v1/email-verification/verify-email",
        json={"email": "ada@example.org"},
        headers={**JSON_HEADERS, "X-Session-ID": ada},
    )
    assert sent.get_json()["status"] == "success"

    first = client.delete(f"/api/v1/session/{ada}")
    second = client.delete(f"/api/v1/session/{ada}")

    assert (first.status_code, second.status_code) == (200, 200)
    assert second.get_json()["message"] == "Session was already erased."
    assert session_row(app, ada) is None
    assert files_of(app, ada) == []
    with app.app_context():
        assert db.session.query(ConsentEvent).count() == 0
        [send] = db.session.query(EmailSend).all()
    assert send.session_uuid is None  # kept for the address cap, no longer tied to the session
    [erased] = audit_rows(app, "session_erased")
    assert erased.details == {"reason": "deleted", "files": 1}
    verdict = client.post("/api/v1/validate-uuid", json={"uuid": ada}, headers=JSON_HEADERS)
    assert verdict.get_json()["status"] == "collision"
    assert client.delete(f"/api/v1/session/{uuid.uuid4()}").status_code == 404


def test_storage_down_during_delete_changes_nothing(database_url: str) -> None:
    app = build_app(
        database_url,
        **unreachable_s3_env(),
    )
    client = app.test_client()
    session_uuid = str(client.post("/api/v1/generate-uuid").get_json()["uuid"])

    response = client.delete(f"/api/v1/session/{session_uuid}")

    assert response.status_code == 503
    assert response.get_json()["error"] == "storage_unavailable"
    assert session_row(app, session_uuid) is not None
    assert audit_rows(app, "session_erased") == []


def test_retention_erases_exactly_what_is_past_its_age(app: Flask, client: FlaskClient) -> None:
    expired = person(client, "Old", "old@example.org")
    set_row(app, expired, state=SessionState.VERIFIED, last_seen_at=utcnow() - timedelta(days=181))
    recent = person(client, "New", "new@example.org")
    set_row(app, recent, state=SessionState.VERIFIED, last_seen_at=utcnow() - timedelta(days=179))
    idle_pending = person(client, "Pending", "p@example.org")
    set_row(app, idle_pending, last_seen_at=utcnow() - timedelta(days=400))
    with app.app_context():
        db.session.execute(
            update(AuditEvent)
            .where(AuditEvent.event_type == "uuid_generated")
            .values(occurred_at=utcnow() - timedelta(days=366))
        )
        db.session.commit()
    kept_audit = len(audit_rows(app)) - 3

    with app.app_context():
        dry = apply_retention(
            now=utcnow(),
            data_retention=timedelta(days=180),
            audit_retention=timedelta(days=365),
            dry_run=True,
        )
        report = apply_retention(
            now=utcnow(),
            data_retention=timedelta(days=180),
            audit_retention=timedelta(days=365),
            dry_run=False,
        )

    assert (dry.sessions_erased, dry.audit_rows_deleted) == (1, 3)
    assert (report.sessions_erased, report.files_deleted, report.audit_rows_deleted) == (1, 1, 3)
    assert session_row(app, expired) is None
    assert files_of(app, expired) == []
    assert session_row(app, recent) is not None
    assert session_row(app, idle_pending) is not None
    remaining = audit_rows(app)
    assert not any(event.event_type == "uuid_generated" for event in remaining)
    # What was kept, plus this run's erasure and summary rows.
    assert len(remaining) == kept_audit + 2


def test_retention_cli_and_audit_cli(app: Flask, client: FlaskClient) -> None:
    ada = person(client, "Ada", "ada@example.org")

    dry = app.test_cli_runner().invoke(args=["cleanup", "retention", "--dry-run"])
    shown = app.test_cli_runner().invoke(args=["audit", "show", ada])
    missing = app.test_cli_runner().invoke(args=["audit", "show", str(uuid.uuid4())])

    assert json.loads(dry.stdout)["dry_run"] is True
    assert shown.exit_code == 0
    lines = shown.stdout.strip().splitlines()
    assert "uuid_generated" in lines[0]
    assert "consent_granted" in lines[1]
    assert "ada@example.org" not in shown.output
    assert missing.exit_code != 0
