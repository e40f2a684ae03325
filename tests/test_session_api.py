"""generate-uuid, validate-uuid, persist_session and the session resource, on both databases."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import event as sqlalchemy_events
from sqlalchemy import text, update

from app.clock import utcnow
from app.extensions import db
from app.models import ChatSession, RetiredSessionUUID, RetirementReason, SessionState
from app.services import chat_sessions
from tests.conftest import (
    GENERAL_ERROR,
    JSON_HEADERS,
    SESSION_RESET,
    audit_rows,
    build_app,
    session_row,
)


def post(client: FlaskClient, path: str, body: object | None = None, **headers: str):
    return client.post(f"/api/v1/{path}", json=body, headers={**JSON_HEADERS, **headers})


def register(client: FlaskClient) -> str:
    response = post(client, "generate-uuid")
    assert response.status_code == 200
    return str(response.get_json()["uuid"])


def retire(app: Flask, session_uuid: str) -> None:
    with app.app_context():
        db.session.delete(db.session.get(ChatSession, uuid.UUID(session_uuid)))
        db.session.add(
            RetiredSessionUUID(
                uuid=uuid.UUID(session_uuid), retired_at=utcnow(), reason=RetirementReason.DELETED
            )
        )
        db.session.commit()


# generate-uuid


def test_generate_issues_a_registered_pending_v4_uuid(app: Flask, client: FlaskClient) -> None:
    response = post(client, "generate-uuid")

    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "success"
    assert body["message"]
    issued = uuid.UUID(body["uuid"])
    assert issued.version == 4
    assert body["uuid"] == str(issued)
    row = session_row(app, issued)
    assert row is not None
    assert row.state is SessionState.PENDING
    assert row.created_at.tzinfo is not None
    [event] = audit_rows(app)
    assert (event.event_type, event.session_uuid, event.details) == (
        "uuid_generated",
        issued,
        {"attempt": 1},
    )
    assert event.client_ip == "127.0.0.0"
    assert event.correlation_id == response.headers["X-Correlation-ID"]


def test_generate_retries_after_a_collision(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = uuid.UUID(register(client))
    fresh = uuid.uuid4()
    candidates = iter([taken, fresh])
    monkeypatch.setattr(chat_sessions, "uuid4", lambda: next(candidates))

    response = post(client, "generate-uuid")

    assert response.status_code == 200
    assert response.get_json()["uuid"] == str(fresh)
    events = [(e.event_type, e.details) for e in audit_rows(app)][1:]
    assert events == [
        ("uuid_generation_collision", {"attempt": 1}),
        ("uuid_generated", {"attempt": 2}),
    ]


def test_generate_gives_up_after_three_collisions(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = uuid.UUID(register(client))
    retired = uuid.UUID(register(client))
    retire(app, str(retired))
    candidates = iter([live, retired, live])
    monkeypatch.setattr(chat_sessions, "uuid4", lambda: next(candidates))

    response = post(client, "generate-uuid")

    assert response.status_code == 500
    body = response.get_json()
    assert body["status"] == "error"
    assert body["message"] == GENERAL_ERROR
    assert body["error"] == "uuid_generation_failed"
    assert body["correlation_id"] == response.headers["X-Correlation-ID"]
    events = [(e.event_type, e.details) for e in audit_rows(app)][2:]
    assert events == [
        ("uuid_generation_collision", {"attempt": 1}),
        ("uuid_generation_collision", {"attempt": 2}),
        ("uuid_generation_collision", {"attempt": 3}),
        ("uuid_generation_failed", {"attempts": 3}),
    ]
    with app.app_context():
        assert db.session.query(ChatSession).count() == 1  # the retired one left no row behind


# validate-uuid


def test_validate_resumes_a_live_session(app: Flask, client: FlaskClient) -> None:
    issued = register(client)
    idle_since = utcnow() - timedelta(hours=1)
    with app.app_context():
        db.session.execute(
            update(ChatSession)
            .where(ChatSession.uuid == uuid.UUID(issued))
            .values(last_seen_at=idle_since)
        )
        db.session.commit()

    response = post(client, "validate-uuid", {"uuid": issued.upper()})

    assert response.status_code == 200
    assert response.get_json() == {
        "status": "success",
        "uuid": issued,
        "message": "Session validated.",
    }
    after = session_row(app, issued)
    assert after is not None
    assert after.last_seen_at > idle_since + timedelta(minutes=59)
    assert audit_rows(app)[-1].event_type == "uuid_validated"


def row_version(app: Flask, session_uuid: str) -> tuple[object, ...]:
    """What changes whenever the row is written: its PostgreSQL xmin, or its stored values."""
    with app.app_context():
        if db.engine.dialect.name == "postgresql":
            query = text("SELECT xmin::text FROM chat_sessions WHERE uuid = :u")
            return tuple(db.session.execute(query, {"u": uuid.UUID(session_uuid)}).one())
        row = db.session.get(ChatSession, uuid.UUID(session_uuid))
        assert row is not None
        return (row.last_seen_at,)


def test_a_session_seen_again_within_minutes_is_not_rewritten(
    app: Flask, client: FlaskClient
) -> None:
    issued = register(client)
    before = row_version(app, issued)

    assert post(client, "validate-uuid", {"uuid": issued}).status_code == 200
    overview = client.get(f"/api/v1/session/{issued}", headers=JSON_HEADERS)

    assert overview.status_code == 200
    assert row_version(app, issued) == before
    reported = datetime.fromisoformat(overview.get_json()["last_seen_at"])
    assert abs(reported - datetime.now(UTC)) < timedelta(seconds=5), "this call is the sighting"


def test_a_new_session_and_a_resume_are_one_autocommitted_statement_each(
    postgres_url: str,
) -> None:
    """On PostgreSQL the commonest requests cost one round trip: no BEGIN, no COMMIT."""
    app = build_app(postgres_url)
    client = app.test_client()
    sent: list[tuple[str, bool]] = []

    def capture(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        sent.append((statement.split(" AS", 1)[0], cursor.connection.autocommit))

    with app.app_context():
        engines = list(db.engines.values())
    for engine in engines:
        sqlalchemy_events.listen(engine, "before_cursor_execute", capture)
    try:
        issued = register(client)
        generated, sent[:] = list(sent), []
        assert post(client, "validate-uuid", {"uuid": issued}).status_code == 200
    finally:
        for engine in engines:
            sqlalchemy_events.remove(engine, "before_cursor_execute", capture)

    assert generated == [("WITH claimed", True)]
    assert sent == [("WITH touched", True)]
    assert [row.event_type for row in audit_rows(app)] == ["uuid_generated", "uuid_validated"]


def test_validate_registers_an_unknown_v4_uuid(app: Flask, client: FlaskClient) -> None:
    client_made = str(uuid.uuid4())

    response = post(client, "validate-uuid", {"uuid": client_made})

    assert response.status_code == 200
    body = response.get_json()
    assert (body["status"], body["uuid"]) == ("success", client_made)
    row = session_row(app, client_made)
    assert row is not None
    assert row.state is SessionState.PENDING
    [event] = audit_rows(app)
    assert (event.event_type, str(event.session_uuid)) == ("uuid_registered", client_made)


def test_validate_replaces_an_ended_session(app: Flask, client: FlaskClient) -> None:
    ended = register(client)
    retire(app, ended)

    response = post(client, "validate-uuid", {"uuid": ended})

    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "collision"
    assert body["message"] == SESSION_RESET
    replacement = body["uuid"]
    assert replacement != ended
    assert uuid.UUID(replacement).version == 4
    assert session_row(app, replacement) is not None
    assert session_row(app, ended) is None
    collision = audit_rows(app, "uuid_collision")
    assert [(str(e.session_uuid), e.details) for e in collision] == [
        (ended, {"replacement": replacement})
    ]


@pytest.mark.parametrize(
    "candidate",
    [
        "not-a-uuid",
        "",
        "6ba7b810-9dad-11d1-80b4-00c04fd430c8",  # a version 1 UUID
        "{1b4e28ba-2fa1-41d2-883f-0016d3cca427}",
        "1b4e28ba2fa141d2883f0016d3cca427",
        "00000000-0000-4000-0000-000000000000",  # version 4 nibble, wrong variant
    ],
)
def test_validate_calls_anything_but_a_v4_uuid_invalid(
    app: Flask, client: FlaskClient, candidate: str
) -> None:
    response = post(client, "validate-uuid", {"uuid": candidate})

    assert response.status_code == 200
    assert response.get_json() == {"status": "invalid", "uuid": None, "message": SESSION_RESET}
    [event] = audit_rows(app)
    assert (event.event_type, event.session_uuid) == ("uuid_invalid", None)
    assert event.details == {"reason": "not_uuid_v4"}
    with app.app_context():
        assert db.session.query(ChatSession).count() == 0


@pytest.mark.parametrize(
    "body",
    [[], ["1b4e28ba-2fa1-41d2-883f-0016d3cca427"], "text", {"uuid": 4}, {"uuid": None}],
    ids=["empty-list", "list", "string", "number", "null"],
)
def test_validate_refuses_a_body_that_names_no_uuid_as_a_400(
    client: FlaskClient, body: object
) -> None:
    response = post(client, "validate-uuid", body)

    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_request"


# persist_session


def test_persist_records_consent_name_and_email(app: Flask, client: FlaskClient) -> None:
    issued = register(client)

    response = post(
        client,
        "persist_session",
        {
            "uuid": issued,
            "consent_user_data": True,
            "name": " Ada  Lovelace ",
            "email": "Ada@Example.COM",
        },
    )

    assert response.status_code == 200
    assert response.get_json() == {
        "status": "success",
        "uuid": issued,
        "message": "Consent recorded.",
        "consent_user_data": True,
    }
    row = session_row(app, issued)
    assert row is not None
    assert (row.name, row.email, row.consent_user_data) == ("Ada Lovelace", "Ada@example.com", True)
    assert row.consent_at is not None
    assert not row.email_verified
    events = [(e.event_type, e.details) for e in audit_rows(app)][1:]
    assert events == [
        ("consent_granted", {}),
        ("personal_data_updated", {"fields": ["name", "email"]}),
    ]
    for event in audit_rows(app):
        assert "Ada" not in str(event.details)


def test_persist_accepts_session_uuid_as_the_key(app: Flask, client: FlaskClient) -> None:
    issued = register(client)

    response = post(client, "persist_session", {"session_uuid": issued, "consent_user_data": False})

    assert response.status_code == 200
    assert response.get_json()["consent_user_data"] is False
    assert audit_rows(app)[-1].event_type == "consent_declined"


def test_persist_refuses_personal_data_without_consent(app: Flask, client: FlaskClient) -> None:
    issued = register(client)

    response = post(
        client, "persist_session", {"uuid": issued, "consent_user_data": False, "email": "a@b.org"}
    )

    assert response.status_code == 400
    body = response.get_json()
    assert (body["status"], body["error"]) == ("error", "consent_required")
    row = session_row(app, issued)
    assert row is not None
    assert row.email is None


def test_persist_unknown_session_is_not_found(client: FlaskClient) -> None:
    response = post(
        client, "persist_session", {"uuid": str(uuid.uuid4()), "consent_user_data": True}
    )

    assert response.status_code == 404
    assert response.get_json()["error"] == "session_not_found"


def test_persist_new_email_requires_verification_again(app: Flask, client: FlaskClient) -> None:
    issued = register(client)
    with app.app_context():
        row = db.session.get(ChatSession, uuid.UUID(issued))
        assert row is not None
        row.consent_user_data, row.email, row.email_verified = True, "old@example.org", True
        row.state, row.completed_at = SessionState.VERIFIED, utcnow()
        db.session.commit()

    response = post(
        client,
        "persist_session",
        {"uuid": issued, "consent_user_data": True, "email": "new@example.org"},
    )

    assert response.status_code == 200
    row = session_row(app, issued)
    assert row is not None
    assert (row.email, row.email_verified, row.state, row.completed_at) == (
        "new@example.org",
        False,
        SessionState.PENDING,
        None,
    )


def test_persist_withdrawing_consent_erases_personal_data(app: Flask, client: FlaskClient) -> None:
    issued = register(client)
    post(client, "persist_session", {"uuid": issued, "consent_user_data": True, "name": "Ada"})

    response = post(client, "persist_session", {"uuid": issued, "consent_user_data": False})

    assert response.status_code == 200
    row = session_row(app, issued)
    assert row is not None
    assert (row.name, row.email, row.consent_user_data, row.consent_at) == (None, None, False, None)
    assert audit_rows(app)[-1].event_type == "consent_withdrawn"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"consent_user_data": True}, "uuid"),
        ({"uuid": "", "consent_user_data": True}, "uuid"),
        ({"uuid": None, "session_uuid": None, "consent_user_data": True}, "uuid"),
        ({"uuid": "x", "consent_user_data": "true"}, "consent_user_data"),
        ({"uuid": "x", "consent_user_data": 1}, "consent_user_data"),
        ({"uuid": "x"}, "consent_user_data"),
        ({"uuid": "x", "consent_user_data": True, "name": 5}, "name"),
        ({"uuid": "x", "consent_user_data": True, "name": "n" * 201}, "name"),
        ({"uuid": "x", "consent_user_data": True, "role": "admin"}, "role"),
        (
            {
                "uuid": str(uuid.uuid4()),
                "session_uuid": str(uuid.uuid4()),
                "consent_user_data": True,
            },
            "uuid",
        ),
    ],
)
def test_persist_malformed_requests_name_the_field(
    client: FlaskClient, body: dict[str, object], field: str
) -> None:
    response = post(client, "persist_session", body)

    assert response.status_code == 400
    payload = response.get_json()
    assert payload["error"] == "invalid_request"
    assert field in payload["details"]


def test_persist_rejects_an_invalid_email(client: FlaskClient) -> None:
    issued = register(client)

    response = post(
        client,
        "persist_session",
        {"uuid": issued, "consent_user_data": True, "email": "not-an-address"},
    )

    assert response.status_code == 400
    assert "email" in response.get_json()["details"]


def test_persist_rejects_a_non_v4_key(client: FlaskClient) -> None:
    response = post(
        client, "persist_session", {"uuid": str(uuid.uuid1()), "consent_user_data": True}
    )

    assert response.status_code == 400
    assert response.get_json()["details"] == {"uuid": ["Not a UUID version 4."]}


def test_persist_changes_only_the_fields_it_is_given(app: Flask, client: FlaskClient) -> None:
    issued = register(client)
    full = {"uuid": issued, "consent_user_data": True, "name": "Ada", "email": "ada@example.org"}
    assert post(client, "persist_session", full).status_code == 200

    only_email = {"uuid": issued, "consent_user_data": True, "email": "ada@example.net"}
    only_name = {"uuid": issued, "consent_user_data": True, "name": "Ada L."}
    assert post(client, "persist_session", only_email).status_code == 200
    assert post(client, "persist_session", only_name).status_code == 200
    assert post(client, "persist_session", only_name).status_code == 200

    row = session_row(app, issued)
    assert row is not None
    assert (row.name, row.email) == ("Ada L.", "ada@example.net")
    updates = [e.details for e in audit_rows(app, "personal_data_updated")]
    assert updates == [{"fields": ["name", "email"]}, {"fields": ["email"]}, {"fields": ["name"]}]


# GET /session/<uuid>


def test_get_session_describes_it_with_a_masked_email(app: Flask, client: FlaskClient) -> None:
    issued = register(client)
    post(
        client,
        "persist_session",
        {"uuid": issued, "consent_user_data": True, "email": "jane@example.com"},
    )

    response = client.get(f"/api/v1/session/{issued}", headers=JSON_HEADERS)

    assert response.status_code == 200
    body = response.get_json()
    assert body["uuid"] == issued
    assert body["state"] == "pending"
    assert body["email_masked"] == "j***@e***.com"
    assert body["email_verified"] is False
    assert body["consent_user_data"] is True
    assert body["completed_at"] is None
    created = datetime.fromisoformat(body["created_at"])
    assert created.tzinfo is not None
    assert abs(created - datetime.now(UTC)) < timedelta(minutes=1)
    assert "jane@example.com" not in response.get_data(as_text=True)


# Fixed values: test ids must be the same in every process that collects them.
@pytest.mark.parametrize(
    "path_uuid", ["1b4e28ba-2fa1-41d2-883f-0016d3cca427", "6ba7b810-9dad-11d1-80b4-00c04fd430c8"]
)
def test_get_session_unknown_or_not_v4_is_not_found(client: FlaskClient, path_uuid: str) -> None:
    response = client.get(f"/api/v1/session/{path_uuid}", headers=JSON_HEADERS)

    assert response.status_code == 404
    assert response.get_json()["error"] == "session_not_found"


def test_get_session_of_an_ended_session_is_not_found(app: Flask, client: FlaskClient) -> None:
    issued = register(client)
    retire(app, issued)

    response = client.get(f"/api/v1/session/{issued}", headers=JSON_HEADERS)

    assert response.status_code == 404


def test_every_call_naming_the_session_touches_it(app: Flask, client: FlaskClient) -> None:
    issued = register(client)
    calls = {
        "persist_session": lambda: post(
            client, "persist_session", {"uuid": issued, "consent_user_data": False}
        ),
        "upload": lambda: client.post(
            "/api/v1/upload",
            data={"session_uuid": issued, "file": (io.BytesIO(b"%PDF-1.7 x"), "a.pdf")},
            content_type="multipart/form-data",
        ),
        "files": lambda: client.get(f"/api/v1/session/{issued}/files"),
        "verify-email": lambda: post(
            client,
            "email-verification/verify-email",
            {"email": "a@example.org"},
            **{"X-Session-ID": issued},
        ),
        "session": lambda: client.get(f"/api/v1/session/{issued}"),
    }
    for name, make_call in calls.items():
        idle_since = utcnow() - timedelta(hours=1)
        with app.app_context():
            db.session.execute(
                update(ChatSession)
                .where(ChatSession.uuid == uuid.UUID(issued))
                .values(last_seen_at=idle_since)
            )
            db.session.commit()

        assert make_call().status_code == 200, name

        row = session_row(app, issued)
        assert row is not None
        assert row.last_seen_at > idle_since + timedelta(minutes=59), name


def test_an_address_given_for_verification_without_consent_is_used_for_that_and_erased(
    app: Flask, client: FlaskClient
) -> None:
    # The frontend never asks for consent before the e-mail step: the address is processed
    # because the person asked to verify it (docs/decisions.md, "Consent and the e-mail step").
    session_uuid = register(client)
    step = post(
        client,
        "email-verification/verify-email",
        {"email": "ann@example.org"},
        **{"X-Session-ID": session_uuid},
    )
    assert step.get_json()["status"] == "success"
    stored = session_row(app, session_uuid)
    assert stored is not None
    assert (stored.consent_user_data, stored.email) == (False, "ann@example.org")
    export = client.get(f"/api/v1/session/{session_uuid}/export").get_json()
    assert "ann@example.org" in str(export)

    # Declining the consent to keep personal data leaves the address its one purpose...
    declined = post(client, "persist_session", {"uuid": session_uuid, "consent_user_data": False})
    assert declined.status_code == 200
    assert session_row(app, session_uuid).email == "ann@example.org"  # type: ignore[union-attr]

    # ...and a withdrawal erases it like every other piece of personal data.
    withdrawn = post(client, f"session/{session_uuid}/consent", {"consent_user_data": False})
    assert withdrawn.status_code == 200
    erased = session_row(app, session_uuid)
    assert erased is not None
    assert (erased.email, erased.email_verified) == (None, False)
    assert "ann@example.org" not in str(
        client.get(f"/api/v1/session/{session_uuid}/export").get_json()
    )
