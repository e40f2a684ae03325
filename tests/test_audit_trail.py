"""Every event a session causes lands on that session's trail, tagged with the request behind it.

One visitor walks through every kind of change the API offers. Each request carries its own
correlation id, so the trail shows not only that each event was written, but that it was
written for this session and for the request that caused it.
"""

from __future__ import annotations

import io
import uuid
from datetime import timedelta

import time_machine
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from app.clock import utcnow
from app.extensions import db
from app.models import AuditEvent
from tests.conftest import (
    JSON_HEADERS,
    build_app,
    code_in,
    smtp_env,
    smtp_server,
)
from tests.servers import free_port

ADDRESS = "ada@example.org"


class TaggedClient:
    """A test client that gives each request a fresh correlation id and remembers it per step."""

    def __init__(self, client: FlaskClient) -> None:
        self.client = client
        self.steps: list[tuple[str, str]] = []

    def call(self, step: str, method: str, path: str, **kwargs: object) -> dict[str, object]:
        correlation_id = str(uuid.uuid4())
        headers = {**JSON_HEADERS, "X-Correlation-ID": correlation_id}
        headers.update(kwargs.pop("headers", {}))  # type: ignore[arg-type]
        if "data" in kwargs:
            del headers["Content-Type"]
        response = self.client.open(path, method=method, headers=headers, **kwargs)  # type: ignore[arg-type]
        assert response.status_code < 500, response.get_data(as_text=True)
        self.steps.append((step, correlation_id))
        return dict(response.get_json())

    def correlation_of(self, step: str) -> str:
        return dict(self.steps)[step]


def trail(app: Flask, session_uuid: str) -> list[AuditEvent]:
    with app.app_context():
        return list(
            db.session.scalars(
                select(AuditEvent)
                .where(AuditEvent.session_uuid == uuid.UUID(session_uuid))
                .order_by(AuditEvent.id)
            )
        )


def test_each_change_is_audited_on_its_session_by_the_request_that_made_it(
    database_url: str,
) -> None:
    with smtp_server() as (port, inbox):
        app = build_app(database_url, **smtp_env(port))
        mail_down = build_app(database_url, **smtp_env(free_port()))
        visitor = TaggedClient(app.test_client())
        failing = TaggedClient(mail_down.test_client())

        session_uuid = str(visitor.call("generate", "POST", "/api/v1/generate-uuid")["uuid"])
        in_header = {"X-Session-ID": session_uuid}
        visitor.call("validate", "POST", "/api/v1/validate-uuid", json={"uuid": session_uuid})
        visitor.call(
            "decline",
            "POST",
            "/api/v1/persist_session",
            json={"uuid": session_uuid, "consent_user_data": False},
        )
        visitor.call(
            "grant",
            "POST",
            "/api/v1/persist_session",
            json={"uuid": session_uuid, "consent_user_data": True, "name": "Ada"},
        )
        visitor.call(
            "upload",
            "POST",
            "/api/v1/upload",
            data={"session_uuid": session_uuid, "file": (io.BytesIO(b"%PDF-1.7 x"), "cv.pdf")},
        )
        visitor.call(
            "reject",
            "POST",
            "/api/v1/upload",
            data={"session_uuid": session_uuid, "file": (io.BytesIO(b"plain"), "notes.pdf")},
        )
        visitor.call(
            "delete file",
            "DELETE",
            "/api/v1/delete",
            json={"session_uuid": session_uuid, "filename": "cv.pdf"},
        )
        failing.call(
            "send fails",
            "POST",
            "/api/v1/email-verification/verify-email",
            json={"email": ADDRESS},
            headers=in_header,
        )
        visitor.call(
            "send",
            "POST",
            "/api/v1/email-verification/verify-email",
            json={"email": ADDRESS},
            headers=in_header,
        )
        visitor.call(
            "cooldown",
            "POST",
            "/api/v1/email-verification/resend-code",
            json={},
            headers=in_header,
        )
        visitor.call(
            "wrong code",
            "POST",
            "/api/v1/email-verification/verify-code",
            json={"code": f"{(int(code_in(inbox.to(ADDRESS)[-1])) + 1) % 10**6:06d}"},
            headers=in_header,
        )
        with time_machine.travel(utcnow() + timedelta(minutes=11)):
            visitor.call(
                "expired",
                "POST",
                "/api/v1/email-verification/verify-code",
                json={"code": code_in(inbox.to(ADDRESS)[-1])},
                headers=in_header,
            )
            visitor.call(
                "resend",
                "POST",
                "/api/v1/email-verification/resend-code",
                json={},
                headers=in_header,
            )
            visitor.call(
                "verify",
                "POST",
                "/api/v1/email-verification/verify-code",
                json={"code": code_in(inbox.to(ADDRESS)[-1])},
                headers=in_header,
            )
            visitor.call(
                "rectify",
                "PATCH",
                f"/api/v1/session/{session_uuid}",
                json={"name": "Ada Lovelace"},
            )
            visitor.call(
                "change by consent",
                "POST",
                "/api/v1/persist_session",
                json={"uuid": session_uuid, "consent_user_data": True, "name": "Ada K."},
            )
            visitor.call("export", "GET", f"/api/v1/session/{session_uuid}/export")
            visitor.call(
                "withdraw",
                "POST",
                f"/api/v1/session/{session_uuid}/consent",
                json={"consent_user_data": False},
            )
            visitor.call("erase", "DELETE", f"/api/v1/session/{session_uuid}")

    expected = [
        ("generate", "uuid_generated"),
        ("validate", "uuid_validated"),
        ("decline", "consent_declined"),
        ("grant", "consent_granted"),
        ("grant", "personal_data_updated"),
        ("upload", "file_uploaded"),
        ("reject", "file_upload_rejected"),
        ("delete file", "file_deleted"),
        ("send fails", "verification_code_issued"),
        ("send fails", "verification_send_failed"),
        ("send", "verification_code_issued"),
        ("send", "verification_code_sent"),
        ("cooldown", "verification_limit_hit"),
        ("wrong code", "verification_code_rejected"),
        ("expired", "verification_code_expired"),
        ("resend", "verification_code_issued"),
        ("resend", "verification_code_sent"),
        ("verify", "email_verified"),
        ("rectify", "personal_data_rectified"),
        ("change by consent", "personal_data_updated"),
        ("export", "data_exported"),
        ("withdraw", "consent_withdrawn"),
        ("erase", "session_erased"),
    ]
    correlations = {**dict(visitor.steps), **dict(failing.steps)}
    events = trail(app, session_uuid)
    assert [(event.event_type, event.correlation_id) for event in events] == [
        (event_type, correlations[step]) for step, event_type in expected
    ]
    assert {event.client_ip for event in events} == {"127.0.0.0"}
    assert events[5].details["file_ref"] == events[7].details["file_ref"]
    assert events[22].details == {"reason": "deleted", "files": 0}
