"""An audit row is written in the same transaction as the change it records.

For each kind of change, the database is told to refuse that change's audit row (a trigger
that raises, on PostgreSQL and SQLite alike). If the app committed the change and its audit
row separately, the change would survive the refusal; here it must not.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, text

from app.extensions import db
from app.models import ChatSession, ConsentEvent, EmailSend, RetiredSessionUUID
from tests.conftest import (
    GENERAL_ERROR,
    JSON_HEADERS,
    Inbox,
    build_app,
    code_in,
    session_row,
    smtp_env,
    smtp_server,
)

ADDRESS = "user@example.org"


# A trigger on the partitioned audit_events is made and dropped on every partition, one after
# another; locking the whole table first takes the locks in the order a reader does (the table,
# then its partitions), so the app's requests and alert threads wait instead of deadlocking.
LOCK_AUDIT_EVENTS = "LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE"


@contextmanager
def audit_refused(app: Flask, event_type: str) -> Iterator[None]:
    """The database refuses audit rows of ``event_type`` until the block ends."""
    with app.app_context():
        postgresql = db.engine.dialect.name == "postgresql"
    if postgresql:
        statements = [
            "CREATE OR REPLACE FUNCTION refuse_audit() RETURNS trigger AS $$ BEGIN "
            "IF NEW.event_type = TG_ARGV[0] THEN RAISE EXCEPTION 'audit refused'; END IF; "
            "RETURN NEW; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events FOR EACH ROW "
            f"EXECUTE FUNCTION refuse_audit('{event_type}')",
        ]
        removal = "DROP TRIGGER refuse_audit ON audit_events"
    else:
        statements = [
            "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events "
            f"WHEN NEW.event_type = '{event_type}' "
            "BEGIN SELECT RAISE(ABORT, 'audit refused'); END"
        ]
        removal = "DROP TRIGGER refuse_audit"
    with audit_trigger(app, statements, removal):
        yield


@contextmanager
def audit_trigger(app: Flask, statements: list[str], removal: str) -> Iterator[None]:
    """A trigger on ``audit_events``, made by ``statements`` and dropped by ``removal``.

    On PostgreSQL both take the table's lock first (LOCK_AUDIT_EVENTS says why).
    """
    with app.app_context():
        postgresql = db.engine.dialect.name == "postgresql"
        for statement in [LOCK_AUDIT_EVENTS, *statements] if postgresql else statements:
            db.session.execute(text(statement))
        db.session.commit()
    try:
        yield
    finally:
        with app.app_context():
            for statement in [LOCK_AUDIT_EVENTS, removal] if postgresql else [removal]:
                db.session.execute(text(statement))
            db.session.commit()


def scalar(app: Flask, query):  # type: ignore[no-untyped-def]
    with app.app_context():
        return db.session.scalar(query)


@dataclass
class World:
    """An app with a mail server, and the session a change is made to."""

    app: Flask
    client: FlaskClient
    inbox: Inbox
    session_uuid: str

    def email(self, step: str, body: dict[str, str]):  # type: ignore[no-untyped-def]
        headers = {**JSON_HEADERS, "X-Session-ID": self.session_uuid}
        return self.client.post(f"/api/v1/email-verification/{step}", json=body, headers=headers)

    def with_consent(self) -> World:
        body = {"uuid": self.session_uuid, "consent_user_data": True, "name": "Ada"}
        assert self.client.post("/api/v1/persist_session", json=body).status_code == 200
        return self

    def with_code_sent(self) -> str:
        assert self.email("verify-email", {"email": ADDRESS}).status_code == 200
        return code_in(self.inbox.to(ADDRESS)[-1])


@pytest.fixture
def world(database_url: str) -> Iterator[World]:
    with smtp_server() as (port, inbox):
        app = build_app(database_url, **smtp_env(port))
        client = app.test_client()
        session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]
        yield World(app, client, inbox, session_uuid)


def wrong_code(world: World) -> str:
    right = code_in(world.inbox.to(ADDRESS)[-1])
    return "000000" if right != "000000" else "111111"


def sessions(app: Flask) -> int:
    return int(scalar(app, select(func.count()).select_from(ChatSession)))


# (refused audit event, the change attempted, a check that nothing of it was kept); the
# preparation, when there is one, happens before the refusal.
Case = tuple[str, Callable[[World], object], Callable[[World], bool]]
PREPARATION: dict[str, Callable[[World], object]] = {
    "a name is stored": World.with_consent,
    "a name is rectified": World.with_consent,
    "consent is withdrawn": World.with_consent,
    "an e-mail address is verified": World.with_code_sent,
    "a wrong code uses up an attempt": World.with_code_sent,
}
CASES: dict[str, Case] = {
    "a session is issued": (
        "uuid_generated",
        lambda w: w.client.post("/api/v1/generate-uuid"),
        lambda w: sessions(w.app) == 1,
    ),
    "an unknown UUID is registered": (
        "uuid_registered",
        lambda w: w.client.post("/api/v1/validate-uuid", json={"uuid": str(UNKNOWN)}),
        lambda w: session_row(w.app, UNKNOWN) is None,
    ),
    "an ended session is replaced": (
        "uuid_collision",
        lambda w: (
            w.client.delete(f"/api/v1/session/{w.session_uuid}"),
            w.client.post("/api/v1/validate-uuid", json={"uuid": w.session_uuid}),
        )[1],
        lambda w: sessions(w.app) == 0,
    ),
    "consent is granted": (
        "consent_granted",
        lambda w: w.client.post(
            "/api/v1/persist_session", json={"uuid": w.session_uuid, "consent_user_data": True}
        ),
        lambda w: (
            not session_row(w.app, w.session_uuid).consent_user_data  # type: ignore[union-attr]
            and scalar(w.app, select(func.count()).select_from(ConsentEvent)) == 0
        ),
    ),
    "a name is stored": (
        "personal_data_updated",
        lambda w: w.client.post(
            "/api/v1/persist_session",
            json={"uuid": w.session_uuid, "consent_user_data": True, "name": "Grace"},
        ),
        lambda w: session_row(w.app, w.session_uuid).name == "Ada",  # type: ignore[union-attr]
    ),
    "a name is rectified": (
        "personal_data_rectified",
        lambda w: w.client.patch(f"/api/v1/session/{w.session_uuid}", json={"name": "Grace"}),
        lambda w: session_row(w.app, w.session_uuid).name == "Ada",  # type: ignore[union-attr]
    ),
    "consent is withdrawn": (
        "consent_withdrawn",
        lambda w: w.client.post(
            f"/api/v1/session/{w.session_uuid}/consent", json={"consent_user_data": False}
        ),
        lambda w: session_row(w.app, w.session_uuid).name == "Ada",  # type: ignore[union-attr]
    ),
    "a code is issued": (
        "verification_code_issued",
        lambda w: w.email("verify-email", {"email": ADDRESS}),
        lambda w: (
            session_row(w.app, w.session_uuid).verification_code_hash is None  # type: ignore[union-attr]
            and scalar(w.app, select(func.count()).select_from(EmailSend)) == 0
            and not w.inbox.messages
        ),
    ),
    "an e-mail address is verified": (
        "email_verified",
        lambda w: w.email("verify-code", {"code": code_in(w.inbox.to(ADDRESS)[-1])}),
        lambda w: not session_row(w.app, w.session_uuid).email_verified,  # type: ignore[union-attr]
    ),
    "a wrong code uses up an attempt": (
        "verification_code_rejected",
        lambda w: w.email("verify-code", {"code": wrong_code(w)}),
        lambda w: session_row(w.app, w.session_uuid).verification_attempts_left == 3,  # type: ignore[union-attr]
    ),
    "a session is erased": (
        "session_erased",
        lambda w: w.client.delete(f"/api/v1/session/{w.session_uuid}"),
        lambda w: (
            session_row(w.app, w.session_uuid) is not None
            and scalar(w.app, select(func.count()).select_from(RetiredSessionUUID)) == 0
        ),
    ),
}
UNKNOWN = uuid.UUID("0f8fad5b-d9cb-469f-a165-70867728950e")


@pytest.mark.parametrize("change", list(CASES))
def test_a_change_whose_audit_row_is_refused_does_not_happen(world: World, change: str) -> None:
    event_type, attempt, nothing_kept = CASES[change]
    if change in PREPARATION:
        PREPARATION[change](world)

    with audit_refused(world.app, event_type):
        response = attempt(world)

    assert response.status_code == 500, response.get_data(as_text=True)  # type: ignore[attr-defined]
    assert response.get_json()["message"] == GENERAL_ERROR  # type: ignore[attr-defined]
    assert nothing_kept(world)
