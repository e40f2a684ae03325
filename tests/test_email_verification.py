"""E-mail verification over real SMTP (aiosmtpd), on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import requests
import time_machine
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from app import create_app
from app.clock import utcnow
from app.extensions import db
from app.models import ChatSession, EmailSend, SessionState
from app.services import email_verification
from tests.conftest import (
    JSON_HEADERS,
    Inbox,
    audit_rows,
    base_env,
    build_app,
    code_in,
    session_row,
    set_session_columns,
    smtp_env,
    smtp_server,
)
from tests.servers import app_process, free_port, hung_server
from tests.test_faults import row_locked_elsewhere

ADDRESS = "Jane.Doe@Example.com"
STORED_ADDRESS = "Jane.Doe@example.com"


@pytest.fixture
def app(database_url: str, mail_server: tuple[int, Inbox]) -> Flask:
    return build_app(database_url, **smtp_env(mail_server[0]))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def new_session(client: FlaskClient) -> str:
    return str(client.post("/api/v1/generate-uuid", headers=JSON_HEADERS).get_json()["uuid"])


def call(client: FlaskClient, step: str, session_uuid: str | None, body: dict[str, str]):
    headers = dict(JSON_HEADERS)
    if session_uuid is not None:
        headers["X-Session-ID"] = session_uuid
    return client.post(f"/api/v1/email-verification/{step}", json=body, headers=headers)


def outcome(response) -> tuple[str, str | None, str]:
    """Status, machine code and next screen; an error's `error` is the sentence for the user."""
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    if body["status"] == "error":
        assert body["error"] == body["message"]
        assert " " in body["error"], "the user reads this: a sentence, not a code"
    else:
        assert "code" not in body
        assert "error" not in body
    return body["status"], body.get("code"), body["nextTransition"]


def rewind_sends(app: Flask, session_uuid: str, seconds: int) -> None:
    """Move this session's send history into the past, as the clock would."""
    with app.app_context():
        sends = db.session.query(EmailSend).filter_by(session_uuid=uuid.UUID(session_uuid))
        for send in sends:
            send.sent_at -= timedelta(seconds=seconds)
        db.session.commit()


def test_the_code_from_the_mail_completes_the_session(
    app: Flask, client: FlaskClient, inbox: Inbox
) -> None:
    session_uuid = new_session(client)

    sent = call(client, "verify-email", session_uuid, {"email": ADDRESS})

    assert outcome(sent) == ("success", None, "CODE_INPUT")
    assert "J***@e***.com" in sent.get_json()["message"]
    [message] = inbox.messages
    assert message["To"] == STORED_ADDRESS
    assert "Chat Assistant" in message["Subject"]
    plain = message.get_body(preferencelist=("plain",)).get_content()
    html = message.get_body(preferencelist=("html",)).get_content()
    assert "10 minutes" in plain
    assert "10 minutes" in html
    assert message["From"] == "verify@chat.example"
    assert message["Subject"] == "Your Chat Assistant verification code"
    assert "Chat Assistant" in plain
    assert "Chat Assistant" in html
    code = code_in(message)
    assert code in html

    verified = call(client, "verify-code", session_uuid, {"code": code})

    assert outcome(verified) == ("success", None, "CHAT_READY")
    row = session_row(app, session_uuid)
    assert row is not None
    assert (row.state, row.email, row.email_verified) == (
        SessionState.VERIFIED,
        STORED_ADDRESS,
        True,
    )
    assert row.completed_at is not None
    assert row.verification_code_hash is None
    assert [e.event_type for e in audit_rows(app)][1:] == [
        "verification_code_issued",
        "verification_code_sent",
        "email_verified",
    ]
    again = call(client, "verify-code", session_uuid, {"code": "000000"})
    assert outcome(again) == ("success", None, "CHAT_READY")
    state = client.get(f"/api/v1/session/{session_uuid}").get_json()
    assert (state["state"], state["email_verified"]) == ("verified", True)


def test_a_wrong_code_leaves_attempts(app: Flask, client: FlaskClient, inbox: Inbox) -> None:
    session_uuid = new_session(client)
    call(client, "verify-email", session_uuid, {"email": ADDRESS})
    wrong = "000000" if code_in(inbox.messages[0]) != "000000" else "111111"

    response = call(client, "verify-code", session_uuid, {"code": wrong})

    assert outcome(response) == ("error", "invalid_code", "CODE_INPUT")
    assert "2 attempt" in response.get_json()["message"]
    [event] = audit_rows(app, "verification_code_rejected")
    assert event.details == {"attempts_left": 2}


def test_three_wrong_guesses_void_the_code_and_a_fresh_one_works(
    app: Flask, client: FlaskClient, inbox: Inbox
) -> None:
    session_uuid = new_session(client)
    call(client, "verify-email", session_uuid, {"email": ADDRESS})
    first_code = code_in(inbox.messages[0])
    wrong = "000000" if first_code != "000000" else "111111"

    results = [
        outcome(call(client, "verify-code", session_uuid, {"code": wrong})) for _ in range(3)
    ]
    late_right = call(client, "verify-code", session_uuid, {"code": first_code})

    assert [error for _, error, _ in results] == [
        "invalid_code",
        "invalid_code",
        "too_many_attempts",
    ]
    assert outcome(late_right) == ("error", "no_code", "CODE_INPUT")
    rewind_sends(app, session_uuid, 31)
    assert outcome(call(client, "resend-code", session_uuid, {}))[0] == "success"
    fresh = code_in(inbox.messages[1])
    assert outcome(call(client, "verify-code", session_uuid, {"code": fresh}))[2] == "CHAT_READY"


def test_an_expired_code_is_refused(app: Flask, client: FlaskClient, inbox: Inbox) -> None:
    session_uuid = new_session(client)
    call(client, "verify-email", session_uuid, {"email": ADDRESS})
    expired = utcnow() - timedelta(seconds=1)
    set_session_columns(app, session_uuid, verification_code_expires_at=expired)

    response = call(client, "verify-code", session_uuid, {"code": code_in(inbox.messages[0])})

    assert outcome(response) == ("error", "code_expired", "CODE_INPUT")
    assert session_row(app, session_uuid).email_verified is False


def test_resend_waits_for_the_cooldown_and_replaces_the_code(
    app: Flask, client: FlaskClient, inbox: Inbox
) -> None:
    session_uuid = new_session(client)
    call(client, "verify-email", session_uuid, {"email": ADDRESS})

    too_soon = call(client, "resend-code", session_uuid, {})
    rewind_sends(app, session_uuid, 31)
    resent = call(client, "resend-code", session_uuid, {})

    assert outcome(too_soon) == ("error", "cooldown", "CODE_INPUT")
    assert outcome(resent) == ("success", None, "CODE_INPUT")
    old, new = (code_in(message) for message in inbox.messages)
    assert old != new  # two draws from a CSPRNG: equal once in a million runs
    assert outcome(call(client, "verify-code", session_uuid, {"code": old}))[1] == "invalid_code"
    assert outcome(call(client, "verify-code", session_uuid, {"code": new}))[2] == "CHAT_READY"
    [limit] = audit_rows(app, "verification_limit_hit")
    assert limit.details == {"limit": "cooldown"}


def test_a_session_gets_three_sends_an_hour(app: Flask, client: FlaskClient, inbox: Inbox) -> None:
    session_uuid = new_session(client)
    call(client, "verify-email", session_uuid, {"email": ADDRESS})
    for _ in range(2):
        rewind_sends(app, session_uuid, 31)
        assert outcome(call(client, "resend-code", session_uuid, {}))[0] == "success"
    rewind_sends(app, session_uuid, 31)

    fourth = call(client, "resend-code", session_uuid, {})

    assert outcome(fourth) == ("error", "hourly_limit", "CODE_INPUT")
    assert len(inbox.messages) == 3


def test_an_address_has_a_daily_cap_across_sessions(
    database_url: str, mail_server: tuple[int, Inbox]
) -> None:
    port, inbox = mail_server
    client = build_app(
        database_url, EMAIL_SENDS_PER_ADDRESS_PER_DAY="2", **smtp_env(port)
    ).test_client()

    results = [
        outcome(call(client, "verify-email", new_session(client), {"email": ADDRESS}))
        for _ in range(3)
    ]
    other_address = outcome(
        call(client, "verify-email", new_session(client), {"email": "someone@example.org"})
    )

    assert [error for _, error, _ in results] == [None, None, "address_daily_limit"]
    assert other_address[0] == "success"
    assert len(inbox.messages) == 3


def test_a_repeated_verify_email_inside_the_cooldown_sends_one_mail(
    client: FlaskClient, inbox: Inbox
) -> None:
    session_uuid = new_session(client)

    first = call(client, "verify-email", session_uuid, {"email": ADDRESS})
    retry = call(client, "verify-email", session_uuid, {"email": ADDRESS})

    assert outcome(first) == outcome(retry) == ("success", None, "CODE_INPUT")
    assert len(inbox.messages) == 1


def test_smtp_down_is_an_error_and_a_later_code_still_comes(database_url: str) -> None:
    port = free_port()
    app = build_app(database_url, **smtp_env(port))
    client = app.test_client()
    session_uuid = new_session(client)

    down = call(client, "verify-email", session_uuid, {"email": ADDRESS})

    assert outcome(down) == ("error", "mail_unavailable", "EMAIL_INPUT")
    row = session_row(app, session_uuid)
    assert row is not None
    assert row.verification_code_hash is None
    assert row.email is None
    assert [e.event_type for e in audit_rows(app)][1:] == [
        "verification_code_issued",
        "verification_send_failed",
    ]
    with smtp_server(port) as (_, inbox):
        up = call(client, "verify-email", session_uuid, {"email": ADDRESS})
        assert outcome(up) == ("success", None, "CODE_INPUT")
        code = code_in(inbox.messages[0])
    assert outcome(call(client, "verify-code", session_uuid, {"code": code}))[2] == "CHAT_READY"


def test_an_unknown_session_is_told_to_reset(client: FlaskClient) -> None:
    for step, body in [
        ("verify-email", {"email": ADDRESS}),
        ("verify-email", {"email": "not-an-address"}),
        ("verify-code", {"code": "123456"}),
    ]:
        response = call(client, step, str(uuid.uuid4()), body)

        assert outcome(response) == ("error", "session_not_found", "SESSION_RESET")


@pytest.mark.parametrize("header", [None, "not-a-uuid", "6ba7b810-9dad-11d1-80b4-00c04fd430c8"])
def test_a_missing_or_malformed_header_is_a_400(client: FlaskClient, header: str | None) -> None:
    response = call(client, "verify-email", header, {"email": ADDRESS})

    assert response.status_code == 400
    body = response.get_json()
    assert (body["status"], body["code"], body["nextTransition"]) == (
        "error",
        "invalid_request",
        "SESSION_RESET",
    )
    assert body["error"] == body["message"] == "The request is malformed."
    assert "X-Session-ID" in body["details"]


@pytest.mark.parametrize(
    ("step", "body", "screen"),
    [
        ("verify-email", {}, "EMAIL_INPUT"),
        ("verify-email", {"email": 7}, "EMAIL_INPUT"),
        ("verify-code", {"code": "1", "extra": "x"}, "CODE_INPUT"),
        ("resend-code", {"email": "x@y.org"}, "CODE_INPUT"),
    ],
)
def test_malformed_bodies_are_a_400_that_keeps_the_screen(
    client: FlaskClient, step: str, body: dict[str, object], screen: str
) -> None:
    response = call(client, step, new_session(client), body)  # type: ignore[arg-type]

    assert response.status_code == 400
    assert response.get_json()["nextTransition"] == screen


def test_an_invalid_address_is_an_outcome(client: FlaskClient, inbox: Inbox) -> None:
    response = call(client, "verify-email", new_session(client), {"email": "not-an-address"})

    assert outcome(response) == ("error", "invalid_email", "EMAIL_INPUT")
    assert inbox.messages == []


def test_codes_and_addresses_stay_out_of_storage_logs_and_audit(
    app: Flask, client: FlaskClient, inbox: Inbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    session_uuid = new_session(client)
    call(client, "verify-email", session_uuid, {"email": ADDRESS})
    code = code_in(inbox.messages[0])

    # While the code is live, the row holds a keyed hash of it: not the code, not a plain digest.
    row = session_row(app, session_uuid)
    assert row is not None
    stored = [str(getattr(row, column.key)) for column in ChatSession.__table__.columns]
    assert all(code not in value for value in stored)
    plain_digests = {
        hashlib.sha256(text.encode()).hexdigest() for text in (code, f"{session_uuid}:{code}")
    }
    assert row.verification_code_hash is not None
    assert len(row.verification_code_hash) == 64
    assert row.verification_code_hash not in plain_digests
    with app.app_context():
        [send] = db.session.query(EmailSend).all()
    address_digests = {
        hashlib.sha256(a.encode()).hexdigest() for a in (STORED_ADDRESS, STORED_ADDRESS.lower())
    }
    assert len(send.address_hash) == 64
    assert send.address_hash not in address_digests

    call(client, "verify-code", session_uuid, {"code": "000000" if code != "000000" else "1"})
    call(client, "verify-code", session_uuid, {"code": code})
    secrets = (code, STORED_ADDRESS.lower(), "jane.doe")
    for event in audit_rows(app):
        text = f"{event.details} {event.client_ip} {event.correlation_id}".lower()
        assert not any(secret.lower() in text for secret in secrets)
    # mail.log is the test's own SMTP server, which logs what it receives.
    for record in (r for r in caplog.records if not r.name.startswith("mail.log")):
        text = f"{record.getMessage()} {record.__dict__}".lower()
        assert not any(secret.lower() in text for secret in secrets), record


def test_the_console_transport_prints_the_message(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client = build_app(database_url, MAIL_BACKEND="console").test_client()
    session_uuid = new_session(client)

    response = call(client, "verify-email", session_uuid, {"email": ADDRESS})

    assert outcome(response)[0] == "success"
    printed = capsys.readouterr().out
    assert f"To: {STORED_ADDRESS}" in printed
    assert re.search(r"\b\d{6}\b", printed)


def test_a_retry_during_a_slow_send_sends_nothing_and_waits_for_nothing(
    database_url: str,
) -> None:
    with smtp_server(delay=1.0) as (port, inbox):
        app = build_app(database_url, **smtp_env(port))
        session_uuid = new_session(app.test_client())
        with ThreadPoolExecutor(max_workers=1) as pool:
            first = pool.submit(
                call, app.test_client(), "verify-email", session_uuid, {"email": ADDRESS}
            )
            time.sleep(0.3)  # the first request has claimed its send and is talking to SMTP
            started = time.monotonic()
            retry = call(app.test_client(), "verify-email", session_uuid, {"email": ADDRESS})
            resumed = app.test_client().post(
                "/api/v1/validate-uuid", json={"uuid": session_uuid}, headers=JSON_HEADERS
            )
            waited = time.monotonic() - started
            assert not first.done(), "the slow send should still be in progress"
            sent = first.result()

    assert outcome(retry) == outcome(sent) == ("success", None, "CODE_INPUT")
    assert resumed.get_json()["status"] == "success"
    assert waited < 0.5, "a call on the session waited for the mail server"
    assert len(inbox.messages) == 1


def test_a_failed_send_keeps_the_code_already_sent_and_counts_for_nothing(
    database_url: str,
) -> None:
    port = free_port()
    app = build_app(database_url, EMAIL_SEND_COOLDOWN_SECONDS="0", **smtp_env(port))
    client = app.test_client()
    session_uuid = new_session(client)
    with smtp_server(port) as (_, inbox):
        assert outcome(call(client, "verify-email", session_uuid, {"email": ADDRESS}))[0] == (
            "success"
        )
        code = code_in(inbox.messages[0])

    failed = call(client, "resend-code", session_uuid, {})

    assert outcome(failed) == ("error", "mail_unavailable", "CODE_INPUT")
    with app.app_context():
        assert db.session.query(EmailSend).count() == 1
    assert outcome(call(client, "verify-code", session_uuid, {"code": code}))[2] == "CHAT_READY"


def verification_fields(app: Flask, session_uuid: str) -> tuple[object, ...]:
    row = session_row(app, session_uuid)
    assert row is not None
    return (
        row.email,
        row.email_verified,
        row.state,
        row.completed_at,
        row.verification_code_hash,
        row.verification_code_expires_at,
        row.verification_attempts_left,
    )


def test_a_failed_send_to_a_new_address_leaves_the_session_as_it_was(database_url: str) -> None:
    port = free_port()
    app = build_app(database_url, EMAIL_SEND_COOLDOWN_SECONDS="0", **smtp_env(port))
    client = app.test_client()
    session_uuid = new_session(client)
    with smtp_server(port) as (_, inbox):
        call(client, "verify-email", session_uuid, {"email": ADDRESS})
        code = code_in(inbox.messages[0])
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    call(client, "verify-code", session_uuid, {"code": wrong})
    with_a_code = verification_fields(app, session_uuid)

    to_new_address = call(client, "verify-email", session_uuid, {"email": "other@example.org"})

    assert outcome(to_new_address) == ("error", "mail_unavailable", "EMAIL_INPUT")
    assert verification_fields(app, session_uuid) == with_a_code
    assert call(client, "verify-code", session_uuid, {"code": wrong}).get_json()["error"] == (
        "That code is not right. 1 attempt left."
    )
    assert outcome(call(client, "verify-code", session_uuid, {"code": code}))[2] == "CHAT_READY"
    verified = verification_fields(app, session_uuid)

    again = call(client, "verify-email", session_uuid, {"email": "other@example.org"})

    assert outcome(again) == ("error", "mail_unavailable", "EMAIL_INPUT")
    assert verification_fields(app, session_uuid) == verified
    assert verified[:3] == (STORED_ADDRESS, True, SessionState.VERIFIED)


def test_a_refused_send_is_undone_without_waiting_for_a_held_session(postgres_url: str) -> None:
    # PostgreSQL only: row locks. SQLite holds one write lock for the whole database.
    database_url = postgres_url
    with smtp_server(delay=1.0, refuse=1) as (port, inbox):
        app = build_app(database_url, **smtp_env(port))
        session_uuid = new_session(app.test_client())
        with ThreadPoolExecutor(max_workers=1) as pool:
            first = pool.submit(
                call, app.test_client(), "verify-email", session_uuid, {"email": ADDRESS}
            )
            time.sleep(0.3)  # the send is claimed; the mail server will refuse it
            with row_locked_elsewhere(database_url, session_uuid):
                started = time.monotonic()
                refused = first.result()
                waited = time.monotonic() - started
        retried = call(app.test_client(), "verify-email", session_uuid, {"email": ADDRESS})

    assert outcome(refused) == ("error", "mail_unavailable", "EMAIL_INPUT")
    assert waited < 1.5, "the undo waited for the session's row"
    # The refused send counts for nothing, so the frontend's retry sends a code at once.
    assert outcome(retried) == ("success", None, "CODE_INPUT")
    [message] = inbox.to(STORED_ADDRESS)
    code = code_in(message)
    assert outcome(call(app.test_client(), "verify-code", session_uuid, {"code": code}))[2] == (
        "CHAT_READY"
    )


def test_a_code_left_behind_by_a_failed_send_on_a_held_session_gives_no_guesses(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The finding: the send fails while another request holds the session's row, so the undo
    # cannot put the previous code back (SKIP LOCKED) and deletes only the send record. The code
    # nobody received must not stay usable with fresh attempts that no limit counted.
    database_url = postgres_url  # PostgreSQL only: row locks.
    with smtp_server() as (port, inbox):
        app = build_app(database_url, EMAIL_SEND_COOLDOWN_SECONDS="0", **smtp_env(port))
        client = app.test_client()
        session_uuid = new_session(client)
        assert outcome(call(client, "verify-email", session_uuid, {"email": ADDRESS}))[0] == (
            "success"
        )
        received = code_in(inbox.messages[0])
        # The next code is known to the test, so it can show what that code would open.
        unreceived = "424242" if received != "424242" else "242424"
        monkeypatch.setattr(email_verification.secrets, "randbelow", lambda _: int(unreceived))
        inbox.delay, inbox.refuse = 1.0, 1
        with ThreadPoolExecutor(max_workers=1) as pool:
            resend = pool.submit(call, app.test_client(), "resend-code", session_uuid, {})
            time.sleep(0.3)  # the send is claimed; the mail server will refuse it
            with row_locked_elsewhere(database_url, session_uuid):
                refused = resend.result()
        monkeypatch.undo()
        inbox.delay = 0.0

        assert outcome(refused) == ("error", "mail_unavailable", "CODE_INPUT")
        assert len(inbox.messages) == 1
        guessed = call(client, "verify-code", session_uuid, {"code": unreceived})
        # The user is asked for a new code, and gets one at once: the failed send counts for
        # no limit.
        assert outcome(guessed) == ("error", "no_code", "CODE_INPUT")
        assert session_row(app, session_uuid).email_verified is False
        assert outcome(call(client, "resend-code", session_uuid, {}))[0] == "success"
        fresh = code_in(inbox.messages[1])
    assert outcome(call(client, "verify-code", session_uuid, {"code": fresh}))[2] == "CHAT_READY"
    assert [e.event_type for e in audit_rows(app)][1:] == [
        "verification_code_issued",
        "verification_code_sent",
        "verification_code_issued",
        "verification_send_failed",
        "verification_code_issued",
        "verification_code_sent",
        "email_verified",
    ]


def test_a_process_killed_while_sending_leaves_a_send_that_stops_counting(
    database_url: str,
) -> None:
    app = build_app(database_url, **smtp_env(free_port()))
    session_uuid = new_session(app.test_client())
    with hung_server() as hung_port:
        env = base_env(database_url, **{**smtp_env(hung_port), "SMTP_TIMEOUT_SECONDS": "10"})
        with app_process(env) as served, ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(
                requests.post,
                f"{served.url}/api/v1/email-verification/verify-email",
                json={"email": ADDRESS},
                headers={**JSON_HEADERS, "X-Session-ID": session_uuid},
                timeout=30,
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not _sends(app):
                time.sleep(0.05)
            served.process.kill()  # mid-send: the claim is committed, the mail never went
            served.process.wait()

    with smtp_server() as (port, inbox):
        app = create_app(base_env(database_url, **smtp_env(port)))  # the same data, mail back
        while_in_flight = call(app.test_client(), "verify-email", session_uuid, {"email": ADDRESS})
        rewind_sends(app, session_uuid, 10)  # past the mail deadline and one statement
        later = call(app.test_client(), "verify-email", session_uuid, {"email": ADDRESS})

    assert _sends(app) == [False, True]
    assert outcome(while_in_flight) == outcome(later) == ("success", None, "CODE_INPUT")
    assert len(inbox.messages) == 1, "sent once: not while the first might still arrive"


def _sends(app: Flask) -> list[bool]:
    with app.app_context():
        return [send.delivered for send in db.session.query(EmailSend).order_by(EmailSend.id)]


def test_every_outcome_tells_the_user_in_the_documented_words(
    database_url: str, mail_server: tuple[int, Inbox]
) -> None:
    """The sentences docs/frontend.md lists, word for word: the frontend shows them as they are."""
    port, inbox = mail_server
    client = build_app(database_url, **smtp_env(port)).test_client()
    mail_down = build_app(database_url, **smtp_env(free_port())).test_client()
    said: list[tuple[str, str | None, str, str]] = []

    def say(step: str, session_uuid: str, body: dict[str, str], via: FlaskClient = client) -> None:
        answer = call(via, step, session_uuid, body)
        status, code, screen = outcome(answer)
        said.append((status, code, answer.get_json()["message"], screen))

    first, second, third, fourth = (new_session(client) for _ in range(4))
    start = utcnow()
    with time_machine.travel(start, tick=False):
        say("resend-code", first, {})
        say("verify-code", first, {"code": "123456"})
        say("verify-email", first, {"email": "not an address"})
        say("verify-email", first, {"email": "jane@example.org"}, via=mail_down)
        say("verify-email", first, {"email": "jane@example.org"})
        say("resend-code", first, {})
        code = code_in(inbox.to("jane@example.org")[0])
        wrong = f"{(int(code) + 1) % 10**6:06d}"
        for malformed in ("12345", "1234567", "12345a"):
            say("verify-code", first, {"code": malformed})
        for _ in range(3):
            say("verify-code", first, {"code": wrong})
        say("verify-code", first, {"code": code})
    for minutes in (1, 2, 3):
        with time_machine.travel(start + timedelta(minutes=minutes), tick=False):
            say("resend-code", first, {})
    with time_machine.travel(start + timedelta(minutes=4), tick=False):
        say("verify-email", second, {"email": "jane@Example.org"})
        say("verify-code", second, {"code": code_in(inbox.to("jane@example.org")[-1])})
        say("verify-email", second, {"email": "jane@Example.org"})
        say("verify-email", third, {"email": "jane@EXAMPLE.ORG"})
        say("verify-email", fourth, {"email": "jane@EXAMPLE.org"})
    with time_machine.travel(start + timedelta(minutes=14), tick=False):
        say("verify-code", third, {"code": code_in(inbox.to("jane@example.org")[-1])})

    sent = ("success", None, "We sent a 6-digit code to j***@e***.org.", "CODE_INPUT")
    not_right = "That code is not right. {} left."
    new_code = "Please request a new one."
    assert said == [
        ("error", "no_email", "Please enter your e-mail address first.", "EMAIL_INPUT"),
        ("error", "no_code", "Please enter your e-mail address first.", "EMAIL_INPUT"),
        ("error", "invalid_email", "Please enter a valid e-mail address.", "EMAIL_INPUT"),
        (
            "error",
            "mail_unavailable",
            "We could not send the e-mail just now. Please try again in a few minutes.",
            "EMAIL_INPUT",
        ),
        sent,
        (
            "error",
            "cooldown",
            "A code was sent moments ago. Please wait 30 seconds before asking again.",
            "CODE_INPUT",
        ),
        *[("error", "invalid_code", "Please enter the 6-digit code.", "CODE_INPUT")] * 3,
        ("error", "invalid_code", not_right.format("2 attempts"), "CODE_INPUT"),
        ("error", "invalid_code", not_right.format("1 attempt"), "CODE_INPUT"),
        (
            "error",
            "too_many_attempts",
            "Too many wrong codes. Please request a new code.",
            "CODE_INPUT",
        ),
        ("error", "no_code", f"There is no valid code. {new_code}", "CODE_INPUT"),
        sent,
        sent,
        (
            "error",
            "hourly_limit",
            "Too many codes were requested for this session. Please try again in an hour.",
            "CODE_INPUT",
        ),
        sent,
        ("success", None, "Your e-mail address is verified.", "CHAT_READY"),
        ("success", None, "Your e-mail address is verified.", "CHAT_READY"),
        sent,
        (
            "error",
            "address_daily_limit",
            "Too many codes were sent to this address today. Please try again tomorrow.",
            "EMAIL_INPUT",
        ),
        ("error", "code_expired", f"This code has expired. {new_code}", "CODE_INPUT"),
    ]


def test_codes_are_drawn_from_all_six_digit_numbers(database_url: str) -> None:
    with smtp_server() as (port, inbox):
        client = build_app(
            database_url,
            EMAIL_SEND_COOLDOWN_SECONDS="0",
            EMAIL_SENDS_PER_SESSION_PER_HOUR="30",
            EMAIL_SENDS_PER_ADDRESS_PER_DAY="30",
            EMAIL_SENDS_PER_ADDRESS_PER_NETWORK_PER_DAY="30",
            **smtp_env(port),
        ).test_client()
        session_uuid = new_session(client)
        call(client, "verify-email", session_uuid, {"email": ADDRESS})
        for _ in range(19):
            assert outcome(call(client, "resend-code", session_uuid, {}))[0] == "success"
        codes = [int(code_in(message)) for message in inbox.messages]

    # Uniform over a million values, twenty draws all below 100000 happen once in 10**20.
    assert len(codes) == 20
    assert max(codes) >= 100_000
    assert len(set(codes)) >= 18


@pytest.mark.parametrize("secret_key", ["k" * 40, "a different key, as another deployment has"])
def test_codes_and_addresses_are_kept_only_as_hmacs_under_the_secret_key(
    database_url: str, mail_server: tuple[int, Inbox], secret_key: str
) -> None:
    port, inbox = mail_server
    app = build_app(database_url, SECRET_KEY=secret_key, **smtp_env(port))
    client = app.test_client()
    session_uuid = new_session(client)
    call(client, "verify-email", session_uuid, {"email": ADDRESS})
    code = code_in(inbox.messages[0])

    def keyed(message: str) -> str:
        return hmac.new(secret_key.encode(), message.encode(), hashlib.sha256).hexdigest()

    row = session_row(app, session_uuid)
    assert row is not None
    # Bound to the session, so one code's hash says nothing about another session's.
    assert row.verification_code_hash == keyed(f"code:{session_uuid}:{code}")
    with app.app_context():
        [address_hash] = db.session.scalars(select(EmailSend.address_hash))
    # Letter case folded, as the daily cap counts an address.
    assert address_hash == keyed(f"address:{ADDRESS.lower()}")


def test_sends_that_died_unannounced_do_not_count_towards_the_hourly_limit(
    app: Flask, client: FlaskClient, inbox: Inbox
) -> None:
    session_uuid = new_session(client)
    with app.app_context():
        # Three claims from processes that died mid-send, twenty minutes ago: well past the mail
        # deadline, well inside the hour.
        twenty_minutes_ago = utcnow() - timedelta(minutes=20)
        for _ in range(3):
            db.session.add(
                EmailSend(
                    session_uuid=uuid.UUID(session_uuid),
                    address_hash="0" * 64,
                    sent_at=twenty_minutes_ago,
                    delivered=False,
                )
            )
        db.session.commit()

    sent = call(client, "verify-email", session_uuid, {"email": ADDRESS})

    assert outcome(sent) == ("success", None, "CODE_INPUT")
    assert len(inbox.messages) == 1


def test_the_trail_says_whether_a_code_went_to_a_new_address(
    app: Flask, client: FlaskClient
) -> None:
    session_uuid = new_session(client)
    start = utcnow()

    for minutes, address in enumerate((ADDRESS, ADDRESS, "other@example.org")):
        with time_machine.travel(start + timedelta(minutes=minutes), tick=False):
            assert outcome(call(client, "verify-email", session_uuid, {"email": address}))[0] == (
                "success"
            )

    issued = audit_rows(app, "verification_code_issued")
    assert [row.details for row in issued] == [
        {"address_changed": True},
        {"address_changed": False},
        {"address_changed": True},
    ]
