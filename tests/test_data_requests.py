"""Data rights without the session (contract, section 8): a code mailed to a verified address
buys a short-lived bearer token with which to export or erase every session of that address.

Real SMTP (aiosmtpd), SQLite and PostgreSQL, real S3 protocol (moto, behind the fault proxy);
nothing of the app is mocked. Data-request codes are mailed from the app's outbox thread, so
the tests wait for that thread to drain before they look at the inbox.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import cast

import psycopg2
import pytest
import time_machine
from cryptography.fernet import Fernet
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import delete, select
from sqlalchemy.engine import make_url
from werkzeug.test import TestResponse

from app.extensions import db, lock_key
from app.models import (
    ConsentEvent,
    DataRequest,
    EmailSend,
    RetiredSessionUUID,
    RetirementReason,
)
from app.services.erasure import files_lock_name
from app.storage import current_storage, session_objects
from tests.conftest import (
    JSON_HEADERS,
    Inbox,
    audit_rows,
    build_app,
    code_in,
    new_session,
    s3_env,
    session_row,
    smtp_env,
)
from tests.s3_proxy import FaultRule, S3Proxy
from tests.test_faults import fail

ANN = "ann@example.org"
BOB = "bob@example.org"
PDF = b"%PDF-1.7 data request test"
REQUESTS = "/api/v1/data-requests"
# The times a session's summary gives.
TIMES = ("created_at", "last_seen_at", "completed_at")
UUID_SHAPED = re.compile(
    r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}", re.IGNORECASE
)
# Room for every send a test makes; the tests of the caps set their own.
GENEROUS = {
    "EMAIL_SEND_COOLDOWN_SECONDS": "0",
    "EMAIL_SENDS_PER_SESSION_PER_HOUR": "100",
    "EMAIL_SENDS_PER_ADDRESS_PER_NETWORK_PER_DAY": "100",
    "EMAIL_SENDS_PER_ADDRESS_PER_DAY": "100",
    "DATA_REQUEST_RATE_LIMIT": "1000/minute",
}


def make_app(database_url: str, smtp_port: int, **overrides: str) -> Flask:
    """An app mailing through the test SMTP server, with no data request left from other tests."""
    app = build_app(database_url, **{**smtp_env(smtp_port), **GENEROUS, **overrides})
    with app.app_context():
        db.session.execute(delete(DataRequest))
        db.session.commit()
    return app


@pytest.fixture
def app(database_url: str, mail_server: tuple[int, Inbox]) -> Flask:
    return make_app(database_url, mail_server[0])


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


# --- the person's side: sessions verified through the real API, codes read from the inbox ---


def mails_to(inbox: Inbox, address: str, *, data_request: bool = True) -> list[EmailMessage]:
    """Data-request mails (or, with ``data_request=False``, verification mails) to ``address``."""
    return [
        message
        for message in inbox.messages
        if message["To"].lower() == address.lower()
        and ("see or delete" in message["Subject"]) == data_request
    ]


def data_request_mails(inbox: Inbox) -> list[str]:
    return [m["To"].lower() for m in inbox.messages if "see or delete" in m["Subject"]]


def verified_session(client: FlaskClient, inbox: Inbox, address: str) -> str:
    """A session that verified ``address`` the way the frontend does it."""
    session_uuid = new_session(client)
    headers = {**JSON_HEADERS, "X-Session-ID": session_uuid}
    sent = client.post(
        "/api/v1/email-verification/verify-email", json={"email": address}, headers=headers
    )
    assert sent.get_json()["status"] == "success", sent.get_json()
    code = code_in(mails_to(inbox, address, data_request=False)[-1])
    done = client.post(
        "/api/v1/email-verification/verify-code", json={"code": code}, headers=headers
    )
    assert done.get_json()["nextTransition"] == "CHAT_READY", done.get_json()
    return session_uuid


def upload(client: FlaskClient, session_uuid: str, filename: str = "cv.pdf") -> None:
    response = client.post(
        "/api/v1/upload",
        data={"session_uuid": session_uuid, "file": (io.BytesIO(PDF), filename)},
        content_type="multipart/form-data",
    )
    assert response.status_code == 200, response.get_json()


def drain_outbox(app: Flask) -> None:
    """Wait until every code the app has queued for mailing has been handed to SMTP."""
    app.extensions["data_request_outbox"].submit(lambda: None).result(timeout=10)


def ask(app: Flask, client: FlaskClient, address: str) -> TestResponse:
    response = client.post(REQUESTS, json={"email": address}, headers=JSON_HEADERS)
    drain_outbox(app)
    return response


def ask_code(app: Flask, client: FlaskClient, inbox: Inbox, address: str) -> str:
    """Ask for a code for ``address`` and read it from the one new mail."""
    before = len(mails_to(inbox, address))
    response = ask(app, client, address)
    assert response.status_code == 202, response.get_json()
    received = mails_to(inbox, address)
    assert len(received) == before + 1, "exactly one new data-request mail"
    return code_in(received[-1])


def verify(client: FlaskClient, address: str, code: str) -> TestResponse:
    return client.post(
        f"{REQUESTS}/verify", json={"email": address, "code": code}, headers=JSON_HEADERS
    )


def token_for(app: Flask, client: FlaskClient, inbox: Inbox, address: str) -> str:
    verified = verify(client, address, ask_code(app, client, inbox, address))
    assert verified.status_code == 200, verified.get_json()
    return str(verified.get_json()["token"])


def bearer(token: str) -> dict[str, str]:
    return {"Accept": JSON_HEADERS["Accept"], "Authorization": f"Bearer {token}"}


def export(client: FlaskClient, token: str) -> TestResponse:
    return client.get(f"{REQUESTS}/export", headers=bearer(token))


def erase(client: FlaskClient, token: str) -> TestResponse:
    return client.delete(f"{REQUESTS}/sessions", headers=bearer(token))


def another_code(code: str) -> str:
    return f"{(int(code) + 1) % 10**6:06d}"


def files_of(app: Flask, session_uuid: str) -> list[str]:
    with app.app_context():
        return [o.key for o in session_objects(current_storage(), uuid.UUID(session_uuid))]


def stored(app: Flask) -> list[str]:
    with app.app_context():
        return [o.key for page in current_storage().list_pages("uploads/") for o in page]


def tombstone(app: Flask, session_uuid: str) -> RetiredSessionUUID | None:
    with app.app_context():
        return db.session.get(RetiredSessionUUID, uuid.UUID(session_uuid))


def refused(response: TestResponse, error: str) -> None:
    """A 4xx JSON refusal with the machine code in ``error`` and a sentence in ``message``."""
    body = response.get_json()
    assert 400 <= response.status_code < 500, body
    assert (body["status"], body["error"]) == ("error", error), body
    assert " " in body["message"], "a sentence for a person, not a code"
    assert body["message"].endswith("."), body["message"]
    assert body["correlation_id"] == response.headers["X-Correlation-ID"]
    assert "token" not in body


# --- 1. every session of the address, and nothing else -------------------------------------


def two_of_ann_and_one_of_bob(client: FlaskClient, inbox: Inbox) -> tuple[str, str, str]:
    """Ann's two verified sessions (the first holds cv.pdf) and Bob's (bob-private.pdf)."""
    first = verified_session(client, inbox, ANN)
    upload(client, first)
    second = verified_session(client, inbox, ANN)
    bob = verified_session(client, inbox, BOB)
    upload(client, bob, "bob-private.pdf")
    return first, second, bob


def test_verify_finds_every_session_of_the_address_in_any_letter_case(
    app: Flask, client: FlaskClient, inbox: Inbox
) -> None:
    first, second, bob = two_of_ann_and_one_of_bob(client, inbox)

    code = ask_code(app, client, inbox, "Ann@Example.org")
    verified = verify(client, "ANN@example.ORG", code)

    assert verified.status_code == 200, verified.get_json()
    body = verified.get_json()
    assert body["status"] == "success"
    assert body["expires_in"] == 15 * 60
    summaries = body["sessions"]
    assert [(s["state"], s["file_count"]) for s in summaries] == [("verified", 1), ("verified", 0)]
    rows = [session_row(app, first), session_row(app, second)]
    for summary, row in zip(summaries, rows, strict=True):
        assert row is not None
        times = [datetime.fromisoformat(summary[name]) for name in TIMES]
        assert times == [row.created_at, row.last_seen_at, row.completed_at]
    # No session UUID in the answer, in any spelling, nor in the token.
    assert UUID_SHAPED.search(verified.get_data(as_text=True)) is None
    token = body["token"]
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    for session_uuid in (first, second, bob):
        as_uuid = uuid.UUID(session_uuid)
        assert session_uuid not in token
        assert as_uuid.hex not in token.lower()
        assert as_uuid.bytes not in raw
        assert session_uuid.encode() not in raw
    assert b"ann@" not in raw.lower(), "the token does not carry the address in the clear"


def test_export_holds_exactly_the_sessions_of_the_address(
    app: Flask, client: FlaskClient, inbox: Inbox
) -> None:
    first, second, bob = two_of_ann_and_one_of_bob(client, inbox)
    token = token_for(app, client, inbox, "Ann@Example.org")

    exported = export(client, token)

    assert exported.status_code == 200, exported.get_json()
    assert exported.headers["Content-Disposition"].startswith("attachment;")
    body = exported.get_json()
    assert body["status"] == "success"
    assert body["message"] == "Everything this service holds under this address."
    assert abs(datetime.fromisoformat(body["exported_at"]) - datetime.now(UTC)) < timedelta(
        minutes=1
    )
    assert [len(entry["consent_history"]) for entry in body["sessions"]] == [0, 0]
    profiles = [entry["profile"] for entry in body["sessions"]]
    assert [(p["uuid"], p["email"], p["email_verified"]) for p in profiles] == [
        (first, ANN, True),
        (second, ANN, True),
    ]
    assert [[f["filename"] for f in entry["files"]] for entry in body["sessions"]] == [
        ["cv.pdf"],
        [],
    ]
    # Each session's own audit trail comes with it, and nobody else's.
    uploads = [
        [e["event_type"] for e in entry["audit_events"]].count("file_uploaded")
        for entry in body["sessions"]
    ]
    assert uploads == [1, 0]
    text = exported.get_data(as_text=True)
    assert bob not in text
    assert BOB not in text
    assert "bob-private.pdf" not in text


# --- 2. nobody learns who used the service ---------------------------------------------------


def test_every_address_gets_the_same_answer_and_only_a_verified_one_gets_mail(
    app: Flask, client: FlaskClient, inbox: Inbox
) -> None:
    verified_session(client, inbox, ANN)
    carl = verified_session(client, inbox, "carl@example.org")
    dora = verified_session(client, inbox, "dora@example.org")
    rectified = client.patch(
        f"/api/v1/session/{carl}", json={"email": "carl.new@example.org"}, headers=JSON_HEADERS
    )
    assert rectified.status_code == 200, rectified.get_json()
    withdrawn = client.post(
        f"/api/v1/session/{dora}/consent", json={"consent_user_data": False}, headers=JSON_HEADERS
    )
    assert withdrawn.status_code == 200, withdrawn.get_json()
    addresses = [
        ANN,
        "nobody@example.org",
        "carl@example.org",  # rectified away
        "carl.new@example.org",  # not verified
        "dora@example.org",  # erased with the consent
    ]

    answers = [ask(app, client, address) for address in addresses]

    assert {(a.status_code, a.get_data()) for a in answers} == {
        (answers[0].status_code, answers[0].get_data())
    }
    assert answers[0].status_code == 202
    assert set(answers[0].get_json()) == {"status", "message"}
    assert data_request_mails(inbox) == [ANN]
    outcomes = [row.details["outcome"] for row in audit_rows(app, "data_request_received")]
    assert outcomes == ["sent", "unknown", "unknown", "unknown", "unknown"]


def test_a_repeat_inside_the_cooldown_sends_nothing_and_keeps_the_first_code(
    database_url: str, mail_server: tuple[int, Inbox]
) -> None:
    port, inbox = mail_server
    app = make_app(database_url, port, EMAIL_SEND_COOLDOWN_SECONDS="30")
    client = app.test_client()
    T0 = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    with time_machine.travel(T0, tick=False):
        verified_session(client, inbox, ANN)
        code = ask_code(app, client, inbox, ANN)
    with time_machine.travel(T0 + timedelta(seconds=29), tick=False):
        repeated = ask(app, client, ANN)
        assert repeated.status_code == 202
        assert len(mails_to(inbox, ANN)) == 1
        assert verify(client, ANN, code).status_code == 200
    with time_machine.travel(T0 + timedelta(seconds=30), tick=False):
        ask_code(app, client, inbox, ANN)


def test_the_mailbox_cap_is_shared_with_verification_sends(
    database_url: str, mail_server: tuple[int, Inbox]
) -> None:
    port, inbox = mail_server
    app = make_app(database_url, port, EMAIL_SENDS_PER_ADDRESS_PER_NETWORK_PER_DAY="3")
    client = app.test_client()
    verified_session(client, inbox, ANN)  # the first send of the day

    ask_code(app, client, inbox, ANN)
    ask_code(app, client, inbox, ANN)
    capped = ask(app, client, ANN)

    assert capped.status_code == 202
    assert len(mails_to(inbox, ANN)) == 2
    assert [r.details["outcome"] for r in audit_rows(app, "data_request_received")] == [
        "sent",
        "sent",
        "address_network_daily_limit",
    ]


# --- 3. guessing the code ---------------------------------------------------------------------


def test_three_wrong_codes_kill_the_code(app: Flask, client: FlaskClient, inbox: Inbox) -> None:
    verified_session(client, inbox, ANN)
    code = ask_code(app, client, inbox, ANN)

    guesses = [verify(client, ANN, another_code(code)) for _ in range(3)]
    late = verify(client, ANN, code)

    for guess, error in zip(
        guesses, ["invalid_code", "invalid_code", "too_many_attempts"], strict=True
    ):
        assert guess.status_code == 400
        refused(guess, error)
    assert "2 attempts left" in guesses[0].get_json()["message"]
    assert "1 attempt left" in guesses[1].get_json()["message"]
    refused(late, "no_code")
    assert [r.details["reason"] for r in audit_rows(app, "data_request_code_refused")] == [
        "invalid_code",
        "invalid_code",
        "too_many_attempts",
        "no_code",
    ]
    assert audit_rows(app, "data_request_verified") == []


def test_a_code_dies_ten_minutes_after_it_was_sent(
    app: Flask, client: FlaskClient, inbox: Inbox
) -> None:
    verified_session(client, inbox, ANN)
    T0 = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    with time_machine.travel(T0, tick=False):
        code = ask_code(app, client, inbox, ANN)

    with time_machine.travel(T0 + timedelta(minutes=10) - timedelta(seconds=1), tick=False):
        still_alive = verify(client, ANN, another_code(code))
    with time_machine.travel(T0 + timedelta(minutes=10), tick=False):
        expired = verify(client, ANN, code)
        dead = verify(client, ANN, code)

    refused(still_alive, "invalid_code")
    refused(expired, "code_expired")
    refused(dead, "no_code")


def test_a_new_code_voids_the_previous_one(app: Flask, client: FlaskClient, inbox: Inbox) -> None:
    verified_session(client, inbox, ANN)
    first = ask_code(app, client, inbox, ANN)
    second = ask_code(app, client, inbox, ANN)
    while second == first:  # one chance in a million
        second = ask_code(app, client, inbox, ANN)

    stale = verify(client, ANN, first)
    fresh = verify(client, ANN, second)

    refused(stale, "invalid_code")
    assert fresh.status_code == 200, fresh.get_json()
    refused(verify(client, ANN, second), "no_code")  # single use


def test_a_code_asked_for_after_a_used_one_works(
    app: Flask, client: FlaskClient, inbox: Inbox
) -> None:
    verified_session(client, inbox, ANN)
    token_for(app, client, inbox, ANN)  # the first code is used up

    again = verify(client, ANN, ask_code(app, client, inbox, ANN))

    assert again.status_code == 200, again.get_json()


def test_codes_are_drawn_from_all_six_digits(app: Flask, client: FlaskClient, inbox: Inbox) -> None:
    verified_session(client, inbox, ANN)

    codes = [ask_code(app, client, inbox, ANN) for _ in range(8)]

    assert all(re.fullmatch(r"\d{6}", code) for code in codes), codes
    # Eight codes all under 1,000 would happen once in 10^24 draws from a million.
    assert max(int(code) for code in codes) >= 1000, codes


def test_a_mailed_code_is_recorded_as_delivered(
    app: Flask, client: FlaskClient, inbox: Inbox
) -> None:
    verified_session(client, inbox, ANN)
    with app.app_context():
        before = set(db.session.scalars(select(EmailSend.id)))

    ask_code(app, client, inbox, ANN)

    with app.app_context():
        [send] = db.session.scalars(select(EmailSend).where(EmailSend.id.not_in(before)))
        assert (send.delivered, send.failed, send.session_uuid) == (True, False, None)


def test_a_code_is_for_its_own_address_only(app: Flask, client: FlaskClient, inbox: Inbox) -> None:
    verified_session(client, inbox, ANN)
    verified_session(client, inbox, BOB)
    code = ask_code(app, client, inbox, ANN)

    refused(verify(client, BOB, code), "no_code")
    refused(verify(client, "nobody@example.org", code), "no_code")
    assert verify(client, ANN, code).status_code == 200


def test_a_new_code_for_one_address_leaves_another_address_s_code_alive(
    app: Flask, client: FlaskClient, inbox: Inbox
) -> None:
    verified_session(client, inbox, ANN)
    verified_session(client, inbox, BOB)
    bobs = ask_code(app, client, inbox, BOB)
    ask_code(app, client, inbox, ANN)

    assert verify(client, BOB, bobs).status_code == 200


# --- 4. the token: scope and life ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_no_valid_token_no_data(app: Flask, client: FlaskClient, method: str) -> None:
    path = f"{REQUESTS}/export" if method == "GET" else f"{REQUESTS}/sessions"
    forged = Fernet(Fernet.generate_key()).encrypt(json.dumps({"a": ANN, "g": "0" * 32}).encode())
    cases = {
        None: "unauthorized",
        "Basic YW5uOnNlY3JldA==": "unauthorized",
        "Bearer ": "unauthorized",
        "Bearer not-a-token": "invalid_token",
        f"Bearer {forged.decode()}": "invalid_token",
    }
    for authorization, error in cases.items():
        headers = {"Accept": JSON_HEADERS["Accept"]}
        if authorization is not None:
            headers["Authorization"] = authorization
        response = client.open(path, method=method, headers=headers)
        assert response.status_code == 401, (authorization, response.get_json())
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert "Retry-After" not in response.headers
        refused(response, error)


def test_the_token_lives_data_request_token_minutes(
    database_url: str, mail_server: tuple[int, Inbox]
) -> None:
    port, inbox = mail_server
    app = make_app(database_url, port, DATA_REQUEST_TOKEN_MINUTES="5")
    client = app.test_client()
    verified_session(client, inbox, ANN)
    T0 = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    with time_machine.travel(T0, tick=False):
        granted = verify(client, ANN, ask_code(app, client, inbox, ANN)).get_json()

    with time_machine.travel(T0 + timedelta(minutes=5), tick=False):
        in_time = export(client, granted["token"])
    with time_machine.travel(T0 + timedelta(minutes=5, seconds=1), tick=False):
        too_late = export(client, granted["token"])
        too_late_erase = erase(client, granted["token"])

    assert granted["expires_in"] == 300
    assert in_time.status_code == 200
    refused(too_late, "invalid_token")
    refused(too_late_erase, "invalid_token")
    assert session_row(app, str(in_time.get_json()["sessions"][0]["profile"]["uuid"])) is not None


def test_erasure_by_address_ends_every_session_like_delete_session(
    database_url: str, mail_server: tuple[int, Inbox], storage_env: dict[str, str]
) -> None:
    port, inbox = mail_server
    app = make_app(database_url, port, **storage_env)
    client = app.test_client()
    first = verified_session(client, inbox, ANN)
    upload(client, first)
    second = verified_session(client, inbox, ANN)
    upload(client, second, "other.pdf")
    bob = verified_session(client, inbox, BOB)
    upload(client, bob)
    code = ask_code(app, client, inbox, ANN)
    token = verify(client, ANN, code).get_json()["token"]
    bob_token = token_for(app, client, inbox, BOB)

    erased = erase(client, token)

    assert erased.status_code == 200, erased.get_json()
    body = erased.get_json()
    assert (body["status"], body["erased"], len(body["sessions"])) == ("success", 2, 2)
    assert UUID_SHAPED.search(erased.get_data(as_text=True)) is None
    for session_uuid in (first, second):
        assert session_row(app, session_uuid) is None
        retired = tombstone(app, session_uuid)
        assert retired is not None
        assert retired.reason == RetirementReason.DELETED
        assert files_of(app, session_uuid) == []
        verdict = client.post(
            "/api/v1/validate-uuid", json={"uuid": session_uuid}, headers=JSON_HEADERS
        ).get_json()
        assert verdict["status"] == "collision"
        assert verdict["uuid"] != session_uuid
    with app.app_context():
        gone = [uuid.UUID(first), uuid.UUID(second)]
        assert (
            db.session.scalars(
                select(ConsentEvent).where(ConsentEvent.session_uuid.in_(gone))
            ).all()
            == []
        )
        assert (
            db.session.scalars(select(EmailSend).where(EmailSend.session_uuid.in_(gone))).all()
            == []
        )
    assert sorted(
        (str(row.session_uuid), row.details["reason"], row.details["files"])
        for row in audit_rows(app, "session_erased")
    ) == sorted([(first, "deleted", 1), (second, "deleted", 1)])
    # The token dies with the erasure, and so does the code behind it.
    refused(export(client, token), "invalid_token")
    refused(erase(client, token), "invalid_token")
    refused(verify(client, ANN, code), "no_code")
    # Ann's token never reached Bob: his session, his file and his own token live on.
    assert session_row(app, bob) is not None
    assert files_of(app, bob) == [f"uploads/{bob}/cv.pdf"]
    bob_export = export(client, bob_token)
    assert [e["profile"]["uuid"] for e in bob_export.get_json()["sessions"]] == [bob]


# --- 5. storage failing in the middle of an erasure -------------------------------------------


@pytest.fixture
def faulty_app(
    database_url: str,
    s3_endpoint: str,
    proxy: tuple[S3Proxy, str],
    mail_server: tuple[int, Inbox],
) -> Flask:
    """S3 through the fault proxy, each call tried once so that a fault is not retried away."""
    settings = {**s3_env(s3_endpoint), "S3_ENDPOINT_URL": proxy[1]}
    return make_app(database_url, mail_server[0], S3_MAX_ATTEMPTS="1", **settings)


def refuse_deletes() -> FaultRule:
    """Every S3 DeleteObjects answered with 500 (tests/test_faults.py's rule)."""
    return cast(FaultRule, fail("DeleteObjects"))


def two_sessions_with_files_and_a_token(app: Flask, inbox: Inbox) -> tuple[str, str, str]:
    client = app.test_client()
    first = verified_session(client, inbox, ANN)
    upload(client, first)
    second = verified_session(client, inbox, ANN)
    upload(client, second)
    return first, second, token_for(app, client, inbox, ANN)


def test_an_erasure_storage_refuses_answers_503_and_the_token_finishes_it(
    faulty_app: Flask, proxy: tuple[S3Proxy, str], inbox: Inbox
) -> None:
    first, second, token = two_sessions_with_files_and_a_token(faulty_app, inbox)
    client = faulty_app.test_client()
    proxy[0].fault = refuse_deletes()

    failed = erase(client, token)

    assert failed.status_code == 503, failed.get_json()
    assert failed.get_json()["error"] == "storage_unavailable"
    assert int(failed.headers["Retry-After"]) > 0
    proxy[0].fault = None
    # Per session, all or nothing in the database: the first is ended (its row gone, its UUID
    # retired; only its file is left in storage); the second is untouched, file and all.
    assert session_row(faulty_app, first) is None
    assert tombstone(faulty_app, first) is not None
    untouched = session_row(faulty_app, second)
    assert untouched is not None
    assert (untouched.email, untouched.email_verified) == (ANN, True)
    assert files_of(faulty_app, second) == [f"uploads/{second}/cv.pdf"]
    assert audit_rows(faulty_app, "data_request_erased") == []
    # The token survives the failure; the retry finishes the erasure, then the token dies.
    still = export(client, token)
    assert [e["profile"]["uuid"] for e in still.get_json()["sessions"]] == [second]
    retried = erase(client, token)
    assert retried.status_code == 200, retried.get_json()
    assert retried.get_json()["erased"] == 1
    assert session_row(faulty_app, second) is None
    assert tombstone(faulty_app, second) is not None
    assert files_of(faulty_app, second) == []
    refused(export(client, token), "invalid_token")
    # The retry also deleted what the first attempt left, as a repeated DELETE /session does.
    assert stored(faulty_app) == []


def test_the_retry_deletes_the_files_a_failed_erasure_left(
    faulty_app: Flask, proxy: tuple[S3Proxy, str], inbox: Inbox
) -> None:
    first, _second, token = two_sessions_with_files_and_a_token(faulty_app, inbox)
    client = faulty_app.test_client()
    proxy[0].fault = refuse_deletes()
    assert erase(client, token).status_code == 503
    proxy[0].fault = None

    retried = erase(client, token)

    assert retried.status_code == 200
    assert files_of(faulty_app, first) == []


# --- 6. concurrency (PostgreSQL) -----------------------------------------------------------------


def admin_dsn(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def held_elsewhere(
    database_url: str, statement: str, parameters: tuple[object, ...]
) -> Iterator[None]:
    """Another connection runs ``statement`` and keeps its locks until the block ends."""
    with closing(psycopg2.connect(admin_dsn(database_url))) as holder:
        holder.cursor().execute(statement, parameters)
        try:
            yield
        finally:
            holder.rollback()


def wait_for_lock_waiters(database_url: str, count: int, timeout: float = 3.0) -> None:
    """Return once ``count`` connections of this database are waiting for a lock."""
    deadline = time.monotonic() + timeout
    with closing(psycopg2.connect(admin_dsn(database_url))) as watcher:
        watcher.autocommit = True
        cursor = watcher.cursor()
        while True:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            row = cursor.fetchone()
            if row is not None and row[0] >= count:
                return
            assert time.monotonic() < deadline, f"fewer than {count} requests reached the lock"
            time.sleep(0.01)


def in_thread(pool: ThreadPoolExecutor, call: Callable[[], TestResponse]) -> Future[TestResponse]:
    return pool.submit(call)


def test_one_code_verified_twice_at_once_gives_one_token(
    postgres_url: str, mail_server: tuple[int, Inbox]
) -> None:
    port, inbox = mail_server
    app = make_app(postgres_url, port, DATABASE_LOCK_TIMEOUT_MS="4000")
    client = app.test_client()
    verified_session(client, inbox, ANN)
    code = ask_code(app, client, inbox, ANN)

    # Both requests are made to wait for the code's row, then let go at the same moment.
    with (
        ThreadPoolExecutor(max_workers=2) as pool,
        held_elsewhere(postgres_url, "SELECT id FROM data_requests FOR UPDATE", ()),
    ):
        racing = [in_thread(pool, lambda: verify(app.test_client(), ANN, code)) for _ in range(2)]
        wait_for_lock_waiters(postgres_url, 2)
    answers = sorted((f.result() for f in racing), key=lambda r: r.status_code)

    assert [a.status_code for a in answers] == [200, 400]
    refused(answers[1], "no_code")
    assert len(audit_rows(app, "data_request_verified")) == 1
    with app.app_context():
        grants = db.session.scalars(select(DataRequest.grant_id)).all()
    assert len([g for g in grants if g is not None]) == 1


def test_an_erasure_by_address_meets_its_sessions_erased_meanwhile(
    postgres_url: str, mail_server: tuple[int, Inbox]
) -> None:
    """The person deletes both sessions from open tabs while the erasure by address waits."""
    port, inbox = mail_server
    app = make_app(postgres_url, port, DATABASE_LOCK_TIMEOUT_MS="4000")
    client = app.test_client()
    first, second, token = two_sessions_with_files_and_a_token(app, inbox)
    first_files = (
        "SELECT pg_advisory_xact_lock(%s)",
        (lock_key(files_lock_name(uuid.UUID(first))),),
    )

    with ThreadPoolExecutor(max_workers=2) as pool, held_elsewhere(postgres_url, *first_files):
        tab = in_thread(pool, lambda: app.test_client().delete(f"/api/v1/session/{first}"))
        wait_for_lock_waiters(postgres_url, 1)
        by_address = in_thread(pool, lambda: erase(app.test_client(), token))
        wait_for_lock_waiters(postgres_url, 2)
        other_tab = client.delete(f"/api/v1/session/{second}")

    assert other_tab.status_code == 200
    assert tab.result().status_code == 200
    answer = by_address.result()
    assert answer.status_code == 200, answer.get_json()
    assert session_row(app, first) is None
    assert session_row(app, second) is None
    assert stored(app) == []
    refused(export(client, token), "invalid_token")


# --- 7. audit ---------------------------------------------------------------------------------


def test_every_step_is_audited_without_the_address(
    app: Flask, client: FlaskClient, inbox: Inbox
) -> None:
    session_uuid = verified_session(client, inbox, ANN)
    ask(app, client, "Nobody@Example.org")
    code = ask_code(app, client, inbox, "Ann@Example.org")
    verify(client, ANN, another_code(code))
    token = verify(client, ANN, code).get_json()["token"]
    assert export(client, token).status_code == 200
    assert erase(client, token).status_code == 200

    received = audit_rows(app, "data_request_received")
    [code_refused] = audit_rows(app, "data_request_code_refused")
    [verified] = audit_rows(app, "data_request_verified")
    [exported] = audit_rows(app, "data_request_exported")
    [erased] = audit_rows(app, "data_request_erased")
    assert [r.details["outcome"] for r in received] == ["unknown", "sent"]
    assert code_refused.details["reason"] == "invalid_code"
    assert (exported.details["sessions"], erased.details["sessions"]) == (1, 1)
    # One keyed reference per address, the same in every letter case, not a plain hash.
    ann_ref = received[1].details["address_ref"]
    assert received[0].details["address_ref"] != ann_ref
    for row in (code_refused, verified, exported, erased):
        assert row.details["address_ref"] == ann_ref
    assert ann_ref not in hashlib.sha256(ANN.encode()).hexdigest()
    # Every row carries the request's context; none the address, the code or the token.
    for row in (*received, code_refused, verified, exported, erased):
        assert row.correlation_id is not None
        assert row.client_ip is not None
    assert [r.session_uuid for r in audit_rows(app, "session_erased")] == [uuid.UUID(session_uuid)]
    for row in audit_rows(app):
        text = " ".join(
            str(value)
            for value in (row.event_type, row.session_uuid, row.client_ip, row.correlation_id)
        )
        text = f"{text} {json.dumps(row.details)}".lower()
        for secret in ("ann@", "nobody@", "example.org", code, token.lower()):
            assert secret not in text, (row.event_type, secret)


# --- 8. rate limit -------------------------------------------------------------------------------


def test_the_fourth_request_in_a_minute_from_one_ip_is_refused(
    database_url: str, mail_server: tuple[int, Inbox]
) -> None:
    app = make_app(database_url, mail_server[0], DATA_REQUEST_RATE_LIMIT="3/minute")
    client = app.test_client()

    answers = [ask(app, client, f"person{n}@example.org") for n in range(4)]

    assert [a.status_code for a in answers] == [202, 202, 202, 429]
    limited = answers[3]
    assert limited.is_json
    body = limited.get_json()
    assert (body["status"], body["error"]) == ("error", "rate_limited")
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert "Retry-After" not in answers[0].headers


# --- operators: flask gdpr find | export | erase -------------------------------------------------


def test_an_operator_finds_exports_and_erases_by_address_and_each_is_audited(
    app: Flask, client: FlaskClient, inbox: Inbox
) -> None:
    first = verified_session(client, inbox, ANN)
    upload(client, first)
    bob = verified_session(client, inbox, BOB)
    runner = app.test_cli_runner()

    found = runner.invoke(args=["gdpr", "find", "Ann@Example.org"])
    exported = runner.invoke(args=["gdpr", "export", ANN])
    refused = runner.invoke(args=["gdpr", "erase", ANN], input="n\n")
    erased = runner.invoke(args=["gdpr", "erase", ANN, "--yes"])
    typo = runner.invoke(args=["gdpr", "find", "ann.example.org"])

    assert found.exit_code == 0, found.output
    [summary] = json.loads(found.output)
    assert summary["file_count"] == 1
    assert first not in found.output
    [entry] = json.loads(exported.output)["sessions"]
    assert entry["profile"]["uuid"] == first
    assert entry["files"][0]["url"].startswith("http://localhost:5000/api/v1/files/")
    assert refused.exit_code != 0
    assert json.loads(erased.output) == {"erased": 1}
    assert session_row(app, first) is None
    assert session_row(app, bob) is not None
    assert typo.exit_code == 2
    assert "Invalid value for EMAIL" in typo.output
    operator_rows = [row for row in audit_rows(app) if row.event_type.startswith("data_request_")]
    assert {row.event_type for row in operator_rows} == {
        "data_request_found",
        "data_request_exported",
        "data_request_erased",
    }
    assert {row.correlation_id for row in operator_rows} == {"operator-cli"}
    assert all(row.details.get("by", "operator") == "operator" for row in operator_rows)
    assert ANN not in json.dumps([row.details for row in audit_rows(app)])
