"""No personal data in logs or audit rows when things go wrong.

Every failure path a visitor can meet (mail server down, a limit hit, invalid input, storage
down, the database gone, wrong and expired codes) is walked with a name, an address and a file
name that must appear nowhere: not in any log record as the app emits it, not in any line as
it is written, and not in any audit row.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from app.logging_setup import RedactingJsonFormatter
from tests.conftest import (
    JSON_HEADERS,
    audit_rows,
    base_env,
    build_app,
    code_in,
    smtp_env,
    smtp_server,
    unreachable_s3_env,
)
from tests.servers import free_port

NAME = "Philippa Quinterosa"
ADDRESS = "philippa.quinterosa@example.org"
FILE_NAME = "Philippa_Quinterosa_passport.pdf"
SECRETS = [NAME.lower(), "quinterosa", ADDRESS.lower(), FILE_NAME.lower()]


STANDARD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None)))


class Recorder(logging.Handler):
    """Every record of the run, raw and as the app's formatter writes it."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.raw: list[str] = []
        self.written: list[str] = []
        self.json_formatter = RedactingJsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        extras = {k: v for k, v in vars(record).items() if k not in STANDARD_FIELDS}
        self.written.append(self.json_formatter.format(record))
        self.raw.append(f"{record.getMessage()} {record.exc_text or ''} {extras}")


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    handler = Recorder()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def assert_nothing_personal(app: Flask, recorder: Recorder, codes: list[str]) -> None:
    written = "\n".join(recorder.written).lower()
    raw = "\n".join(recorder.raw).lower()
    audit = json.dumps([[row.event_type, row.details] for row in audit_rows(app)]).lower()
    for secret in SECRETS:
        assert secret not in written, secret
        assert secret not in audit, secret
    # Names and file names must not even be handed to a logger; addresses are redacted too.
    for secret in (NAME.lower(), FILE_NAME.lower()):
        assert secret not in raw, secret
    for code in codes:
        assert code not in audit
        assert code not in written


def session_with_consent(client: FlaskClient) -> str:
    session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]
    body = {"uuid": session_uuid, "consent_user_data": True, "name": NAME}
    assert client.post("/api/v1/persist_session", json=body).status_code == 200
    return str(session_uuid)


def email(client: FlaskClient, session_uuid: str, step: str, body: dict[str, str]):  # type: ignore[no-untyped-def]
    headers = {**JSON_HEADERS, "X-Session-ID": session_uuid}
    return client.post(f"/api/v1/email-verification/{step}", json=body, headers=headers)


def test_mail_server_down(database_url: str, recorder: Recorder) -> None:
    app = build_app(database_url, ADMIN_EMAIL="ops@chat.example", **smtp_env(free_port()))
    client = app.test_client()
    session_uuid = session_with_consent(client)

    down = email(client, session_uuid, "verify-email", {"email": ADDRESS})

    assert down.get_json()["code"] == "mail_unavailable"
    assert_nothing_personal(app, recorder, [])


def test_limits_hit(database_url: str, recorder: Recorder) -> None:
    with smtp_server() as (port, inbox):
        app = build_app(
            database_url,
            EMAIL_RATE_LIMIT="1/minute",
            SUSPICIOUS_RATE_LIMIT_HITS="1",
            ADMIN_EMAIL="ops@chat.example",
            **smtp_env(port),
        )
        client = app.test_client()
        session_uuid = session_with_consent(client)

        sent = email(client, session_uuid, "verify-email", {"email": ADDRESS})
        refused = email(client, session_uuid, "verify-email", {"email": ADDRESS})
        code = code_in(inbox.to(ADDRESS)[0])

    assert sent.status_code == 200
    assert refused.status_code == 429
    assert_nothing_personal(app, recorder, [code])


def test_wrong_and_expired_codes_and_the_cooldown(database_url: str, recorder: Recorder) -> None:
    with smtp_server() as (port, inbox):
        app = build_app(database_url, SUSPICIOUS_FAILED_CODES="1", **smtp_env(port))
        client = app.test_client()
        session_uuid = session_with_consent(client)
        email(client, session_uuid, "verify-email", {"email": ADDRESS})
        code = code_in(inbox.to(ADDRESS)[0])
        wrong = "000000" if code != "000000" else "111111"

        answers = [
            email(client, session_uuid, "verify-code", {"code": wrong}),
            email(client, session_uuid, "resend-code", {}),
            email(client, session_uuid, "verify-code", {"code": wrong + "9"}),
        ]

    assert [answer.get_json().get("code") for answer in answers] == [
        "invalid_code",
        "cooldown",
        "invalid_code",
    ]
    assert_nothing_personal(app, recorder, [code, wrong])


@pytest.mark.parametrize(
    "body",
    [
        {"consent_user_data": True, "name": NAME, "email": "philippa.quinterosa@"},
        {"consent_user_data": False, "name": NAME, "email": ADDRESS},
        {"consent_user_data": True, "name": NAME + "\x00", "email": ADDRESS},
    ],
    ids=["invalid-address", "no-consent", "control-character"],
)
def test_invalid_input(database_url: str, recorder: Recorder, body: dict[str, object]) -> None:
    app = build_app(database_url)
    client = app.test_client()
    session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]

    refused = client.post("/api/v1/persist_session", json={"uuid": session_uuid, **body})

    assert refused.status_code == 400
    assert_nothing_personal(app, recorder, [])


def test_storage_down(database_url: str, recorder: Recorder) -> None:
    app = build_app(database_url, ADMIN_EMAIL="ops@chat.example", **unreachable_s3_env())
    client = app.test_client()
    session_uuid = session_with_consent(client)

    answers = [
        client.post(
            "/api/v1/upload",
            data={"session_uuid": session_uuid, "file": (io.BytesIO(b"%PDF-1.7 x"), FILE_NAME)},
            content_type="multipart/form-data",
        ),
        client.delete("/api/v1/delete", json={"filename": FILE_NAME, "session_uuid": session_uuid}),
        client.post(f"/api/v1/session/{session_uuid}/consent", json={"consent_user_data": False}),
        client.get(f"/api/v1/session/{session_uuid}/export"),
    ]

    assert [answer.status_code for answer in answers] == [503] * 4
    assert_nothing_personal(app, recorder, [])


def test_database_down(recorder: Recorder) -> None:
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    app = create_app(base_env(unreachable, DATABASE_CONNECT_TIMEOUT_SECONDS="1"))
    client = app.test_client()
    body = {
        "uuid": "0f8fad5b-d9cb-469f-a165-70867728950e",
        "consent_user_data": True,
        "name": NAME,
        "email": ADDRESS,
    }

    down = client.post("/api/v1/persist_session", json=body)

    assert down.status_code == 503
    written = "\n".join(recorder.written).lower()
    raw = "\n".join(recorder.raw).lower()
    for secret in SECRETS:
        assert secret not in written
    assert NAME.lower() not in raw
