"""Every transition from every state it can start in.

A session can be pending without an address, pending with a code sent to its address, or
verified (complete). Withdrawing consent, correcting the address and erasing must each end in
the state the contract names, whichever of those it starts from.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from app.extensions import db
from app.models import ConsentEvent, EmailSend, SessionState
from app.storage import current_storage, session_objects
from tests.conftest import (
    JSON_HEADERS,
    Inbox,
    audit_rows,
    build_app,
    code_in,
    session_row,
    smtp_env,
    smtp_server,
)

ADDRESS = "ada@example.org"
STATES = ["pending", "code_sent", "verified"]


@dataclass
class Visitor:
    app: Flask
    client: FlaskClient
    inbox: Inbox
    session_uuid: str
    code: str | None = None

    def email(self, step: str, body: dict[str, str]) -> dict[str, str]:
        headers = {**JSON_HEADERS, "X-Session-ID": self.session_uuid}
        response = self.client.post(
            f"/api/v1/email-verification/{step}", json=body, headers=headers
        )
        assert response.status_code == 200, response.get_data(as_text=True)
        return dict(response.get_json())

    def files(self) -> int:
        with self.app.app_context():
            return len(session_objects(current_storage(), self.session_uuid))


@pytest.fixture(params=STATES)
def visitor(request: pytest.FixtureRequest, database_url: str) -> Iterator[Visitor]:
    """A session with consent, a name and a file, brought into one of the three states."""
    with smtp_server() as (port, inbox):
        app = build_app(database_url, **smtp_env(port))
        client = app.test_client()
        session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]
        consent = {"uuid": session_uuid, "consent_user_data": True, "name": "Ada"}
        assert client.post("/api/v1/persist_session", json=consent).status_code == 200
        uploaded = client.post(
            "/api/v1/upload",
            data={"session_uuid": session_uuid, "file": (io.BytesIO(b"%PDF-1.7 x"), "cv.pdf")},
            content_type="multipart/form-data",
        )
        assert uploaded.status_code == 200
        visitor = Visitor(app, client, inbox, session_uuid)
        if request.param in ("code_sent", "verified"):
            visitor.email("verify-email", {"email": ADDRESS})
            visitor.code = code_in(inbox.to(ADDRESS)[0])
        if request.param == "verified":
            assert visitor.email("verify-code", {"code": visitor.code})["status"] == "success"
            row = session_row(app, session_uuid)
            assert row is not None
            assert row.state is SessionState.VERIFIED
        yield visitor


def assert_anonymous_and_pending(visitor: Visitor) -> None:
    row = session_row(visitor.app, visitor.session_uuid)
    assert row is not None
    assert (row.consent_user_data, row.consent_at, row.name, row.email) == (
        False,
        None,
        None,
        None,
    )
    assert (row.email_verified, row.state, row.completed_at) == (
        False,
        SessionState.PENDING,
        None,
    )
    assert row.verification_code_hash is None
    assert row.verification_code_expires_at is None
    assert visitor.files() == 0


@pytest.mark.parametrize("route", ["consent", "persist_session"])
def test_withdrawing_consent_erases_everything_from_any_state(visitor: Visitor, route: str) -> None:
    if route == "consent":
        response = visitor.client.post(
            f"/api/v1/session/{visitor.session_uuid}/consent", json={"consent_user_data": False}
        )
    else:
        response = visitor.client.post(
            "/api/v1/persist_session",
            json={"uuid": visitor.session_uuid, "consent_user_data": False},
        )

    assert response.status_code == 200
    assert response.get_json()["message"] == (
        "Consent withdrawn: your name, e-mail address and 1 uploaded file(s) were erased."
    )
    assert_anonymous_and_pending(visitor)
    with visitor.app.app_context():
        decisions = [
            event.granted
            for event in db.session.scalars(select(ConsentEvent).order_by(ConsentEvent.id))
        ]
    assert decisions == [True, False]
    with visitor.app.app_context():
        # The sends still count against the address's daily cap, but name no session.
        sends = [send.session_uuid for send in db.session.scalars(select(EmailSend))]
    assert sends == ([] if visitor.code is None else [None])
    [withdrawn] = audit_rows(visitor.app, "consent_withdrawn")
    assert withdrawn.details == {"files": 1}
    if visitor.code is not None:
        # A code sent before the withdrawal is void with the address it was sent to.
        voided = visitor.email("verify-code", {"code": visitor.code})
        assert (voided["status"], voided.get("code")) in (
            ("error", "no_code"),
            ("error", "session_not_found"),
        )


def test_correcting_the_address_requires_verifying_it_again_from_any_state(
    visitor: Visitor,
) -> None:
    response = visitor.client.patch(
        f"/api/v1/session/{visitor.session_uuid}", json={"email": "grace@example.org"}
    )

    assert response.status_code == 200
    body = response.get_json()
    assert (body["state"], body["email_verified"], body["completed_at"]) == (
        "pending",
        False,
        None,
    )
    assert body["email_masked"] == "g***@e***.org"
    row = session_row(visitor.app, visitor.session_uuid)
    assert row is not None
    assert row.verification_code_hash is None
    if visitor.code is not None:
        voided = visitor.email("verify-code", {"code": visitor.code})
        assert voided.get("code") == "no_code"


def test_erasing_ends_the_session_from_any_state(visitor: Visitor) -> None:
    response = visitor.client.delete(f"/api/v1/session/{visitor.session_uuid}")

    assert response.status_code == 200
    assert session_row(visitor.app, visitor.session_uuid) is None
    assert visitor.files() == 0
    replaced = visitor.client.post(
        "/api/v1/validate-uuid", json={"uuid": visitor.session_uuid}
    ).get_json()
    assert replaced["status"] == "collision"
    assert replaced["uuid"] != visitor.session_uuid


def test_a_new_address_through_verify_email_from_any_state(visitor: Visitor) -> None:
    # Past the 30 s between two codes of one session.
    with time_machine.travel(datetime.now(UTC) + timedelta(seconds=31)):
        sent = visitor.email("verify-email", {"email": "grace@example.org"})

    assert sent["status"] == "success"
    row = session_row(visitor.app, visitor.session_uuid)
    assert row is not None
    assert (row.email, row.email_verified, row.state) == (
        "grace@example.org",
        False,
        SessionState.PENDING,
    )
    new_code = code_in(visitor.inbox.to("grace@example.org")[0])
    if visitor.code is not None:
        assert visitor.email("verify-code", {"code": visitor.code}).get("code") == "invalid_code"
    assert visitor.email("verify-code", {"code": new_code})["nextTransition"] == "CHAT_READY"
