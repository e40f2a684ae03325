"""Every configured quantity at its boundary, through the public path.

Time moves with time-machine, which moves the system clock the app reads (and the in-process
S3 server with it); nothing is written into the database to fake an age. Each quantity is
tried just inside and just outside its limit, so a limit read in the wrong unit, or compared
with < where <= was meant, fails here.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import pytest
import time_machine
from flask import Flask
from flask.testing import FlaskClient

from app import jobs
from app.services.chat_sessions import TOUCH_EVERY
from app.storage import current_storage
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

T0 = datetime(2030, 1, 7, 9, 0, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)
MIB = 1024 * 1024


def pdf_of(size: int) -> bytes:
    head = b"%PDF-1.7\n"
    return head + b"0" * (size - len(head))


def upload(client: FlaskClient, session_uuid: str, data: bytes, name: str = "cv.pdf"):  # type: ignore[no-untyped-def]
    return client.post(
        "/api/v1/upload",
        data={"session_uuid": session_uuid, "file": (io.BytesIO(data), name)},
        content_type="multipart/form-data",
    )


def new_session(client: FlaskClient) -> str:
    return str(client.post("/api/v1/generate-uuid").get_json()["uuid"])


def test_a_file_of_exactly_the_limit_is_taken_and_one_byte_more_is_not(
    database_url: str, storage_env: dict[str, str]
) -> None:
    client = build_app(database_url, MAX_UPLOAD_MB="1", **storage_env).test_client()
    session_uuid = new_session(client)

    at_limit = upload(client, session_uuid, pdf_of(MIB), "at-limit.pdf")
    over_limit = upload(client, session_uuid, pdf_of(MIB + 1), "over-limit.pdf")

    assert (at_limit.status_code, at_limit.get_json()["size"]) == (200, MIB)
    assert (over_limit.status_code, over_limit.get_json()["error"]) == (413, "file_too_large")


def test_the_file_count_limit_admits_exactly_its_number(database_url: str) -> None:
    client = build_app(database_url, MAX_FILES_PER_SESSION="2").test_client()
    session_uuid = new_session(client)

    statuses = [upload(client, session_uuid, pdf_of(100), f"{n}.pdf").status_code for n in "abc"]

    assert statuses == [200, 200, 409]


@pytest.fixture
def mail() -> Iterator[tuple[int, Inbox]]:
    with smtp_server() as server:
        yield server


def call(client: FlaskClient, step: str, session_uuid: str, body: dict[str, str]) -> dict:  # type: ignore[type-arg]
    headers = {**JSON_HEADERS, "X-Session-ID": session_uuid}
    response = client.post(f"/api/v1/email-verification/{step}", json=body, headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    return dict(response.get_json())


def test_a_code_works_until_the_last_second_of_its_ten_minutes(
    database_url: str, mail: tuple[int, Inbox]
) -> None:
    port, inbox = mail
    client = build_app(database_url, **smtp_env(port)).test_client()
    sessions = [new_session(client) for _ in range(2)]
    codes = []
    with time_machine.travel(T0, tick=False):
        for n, session_uuid in enumerate(sessions):
            call(client, "verify-email", session_uuid, {"email": f"user{n}@example.org"})
            codes.append(code_in(inbox.to(f"user{n}@example.org")[0]))

    with time_machine.travel(T0 + timedelta(minutes=10) - SECOND, tick=False):
        in_time = call(client, "verify-code", sessions[0], {"code": codes[0]})
    with time_machine.travel(T0 + timedelta(minutes=10), tick=False):
        too_late = call(client, "verify-code", sessions[1], {"code": codes[1]})

    assert in_time["nextTransition"] == "CHAT_READY"
    assert too_late.get("code") == "code_expired"


def test_a_repeated_request_is_a_retry_only_while_its_code_lives(
    database_url: str, mail: tuple[int, Inbox]
) -> None:
    port, inbox = mail
    settings = {"EMAIL_CODE_TTL_MINUTES": "1", "EMAIL_SEND_COOLDOWN_SECONDS": "120"}
    client = build_app(database_url, **settings, **smtp_env(port)).test_client()
    session_uuid = new_session(client)
    address = {"email": "user@example.org"}
    with time_machine.travel(T0, tick=False):
        call(client, "verify-email", session_uuid, address)
    with time_machine.travel(T0 + timedelta(minutes=1) - SECOND, tick=False):
        retried = call(client, "verify-email", session_uuid, address)
    with time_machine.travel(T0 + timedelta(minutes=1), tick=False):
        expired = call(client, "verify-email", session_uuid, address)

    # A retry of a request whose code still lives answers as the first did and sends nothing;
    # once the code has expired, asking again is a new send, which the cooldown still holds.
    assert (retried["status"], retried["message"]) == (
        "success",
        "We sent a 6-digit code to u***@e***.org.",
    )
    assert (expired["code"], expired["message"]) == (
        "cooldown",
        "A code was sent moments ago. Please wait 60 seconds before asking again.",
    )
    assert len(inbox.messages) == 1


def test_the_cooldown_is_thirty_seconds(database_url: str, mail: tuple[int, Inbox]) -> None:
    port, inbox = mail
    client = build_app(database_url, **smtp_env(port)).test_client()
    session_uuid = new_session(client)
    with time_machine.travel(T0, tick=False):
        call(client, "verify-email", session_uuid, {"email": "user@example.org"})
    with time_machine.travel(T0 + timedelta(seconds=30) - SECOND, tick=False):
        too_soon = call(client, "resend-code", session_uuid, {})
    with time_machine.travel(T0 + timedelta(seconds=30), tick=False):
        in_time = call(client, "resend-code", session_uuid, {})

    assert too_soon["code"] == "cooldown"
    assert (
        too_soon["error"]
        == "A code was sent moments ago. Please wait 1 second before asking again."
    )
    assert in_time["status"] == "success"
    assert len(inbox.messages) == 2


def test_a_session_gets_three_codes_in_any_rolling_hour(
    database_url: str, mail: tuple[int, Inbox]
) -> None:
    port, _ = mail
    client = build_app(database_url, **smtp_env(port)).test_client()
    session_uuid = new_session(client)
    for n in range(3):
        with time_machine.travel(T0 + n * timedelta(minutes=1), tick=False):
            step = "verify-email" if n == 0 else "resend-code"
            body = {"email": "user@example.org"} if n == 0 else {}
            assert call(client, step, session_uuid, body)["status"] == "success"

    # A send exactly an hour old has left the window.
    with time_machine.travel(T0 + timedelta(hours=1) - SECOND, tick=False):
        fourth_too_soon = call(client, "resend-code", session_uuid, {})
    with time_machine.travel(T0 + timedelta(hours=1), tick=False):
        fourth_in_time = call(client, "resend-code", session_uuid, {})

    assert fourth_too_soon["code"] == "hourly_limit"
    assert fourth_in_time["status"] == "success"


def test_an_address_gets_five_codes_in_any_rolling_day_in_any_letter_case(
    database_url: str, mail: tuple[int, Inbox]
) -> None:
    port, inbox = mail
    client = build_app(database_url, **smtp_env(port)).test_client()
    spellings = ["Jane@Example.org", "jane@example.org", "JANE@EXAMPLE.ORG", "jAnE@example.ORG"]
    for n in range(5):
        with time_machine.travel(T0 + n * timedelta(minutes=1), tick=False):
            address = {"email": spellings[n % len(spellings)]}
            assert call(client, "verify-email", new_session(client), address)["status"] == "success"

    with time_machine.travel(T0 + timedelta(days=1) - SECOND, tick=False):
        sixth_too_soon = call(client, "verify-email", new_session(client), {"email": spellings[1]})
    with time_machine.travel(T0 + timedelta(days=1), tick=False):
        sixth_in_time = call(client, "verify-email", new_session(client), {"email": spellings[2]})

    assert sixth_too_soon["code"] == "address_daily_limit"
    assert sixth_in_time["status"] == "success"
    assert len(inbox.messages) == 6


def test_a_download_link_lives_its_lifetime_and_not_a_second_more(database_url: str) -> None:
    client = build_app(database_url).test_client()
    session_uuid = new_session(client)
    with time_machine.travel(T0, tick=False):
        path = urlsplit(upload(client, session_uuid, pdf_of(200)).get_json()["url"]).path

    with time_machine.travel(T0 + timedelta(seconds=900), tick=False):
        last_second = client.get(path)
    with time_machine.travel(T0 + timedelta(seconds=901), tick=False):
        expired = client.get(path)

    assert last_second.status_code == 200
    assert expired.status_code == 404


def _newest_object_time(app: Flask, folder: str) -> datetime:
    with app.app_context():
        [page] = current_storage().list_pages(f"uploads/{folder}/")
    return max(stored.last_modified for stored in page)


def test_the_sweep_deletes_a_folder_older_than_the_minimum_age_not_one_exactly_that_old(
    database_url: str, storage_env: dict[str, str]
) -> None:
    app = build_app(database_url, **storage_env)
    older, younger = str(uuid.uuid4()), str(uuid.uuid4())
    with app.app_context():
        current_storage().put(f"uploads/{older}/a.pdf", io.BytesIO(pdf_of(100)), "application/pdf")
    time.sleep(2.1)  # storage stamps objects with its own clock, to the second
    with app.app_context():
        current_storage().put(
            f"uploads/{younger}/a.pdf", io.BytesIO(pdf_of(100)), "application/pdf"
        )
    # The younger folder is exactly the minimum age (not older), the older one two seconds more.
    exactly_old_enough = _newest_object_time(app, younger) + timedelta(minutes=30)
    assert _newest_object_time(app, older) + timedelta(minutes=30) < exactly_old_enough - SECOND

    with time_machine.travel(exactly_old_enough, tick=False), app.app_context():
        report = jobs.run_orphan_sweep(scheduled=True)

    assert report is not None
    assert report.folders_deleted == 1
    with app.app_context():
        left = [o.key for page in current_storage().list_pages("uploads/") for o in page]
    assert left == [f"uploads/{younger}/a.pdf"]


def test_a_session_idle_longer_than_a_day_is_purged_and_one_idle_exactly_a_day_is_not(
    database_url: str,
) -> None:
    app = build_app(database_url)
    client = app.test_client()
    with time_machine.travel(T0, tick=False):
        idle_longer = new_session(client)
    with time_machine.travel(T0 + SECOND, tick=False):
        idle_exactly = new_session(client)

    # The stored last-seen time may lag the last request by up to TOUCH_EVERY, so that much
    # more is waited for. One is idle a second longer, the other exactly that long: only the
    # first is purged.
    purge_at = T0 + timedelta(days=1) + TOUCH_EVERY + SECOND
    with time_machine.travel(purge_at, tick=False), app.app_context():
        report = jobs.run_abandoned_purge(scheduled=True)

    assert report is not None
    assert report.sessions_purged == 1
    assert session_row(app, idle_longer) is None
    assert session_row(app, idle_exactly) is not None


def test_retention_erases_just_past_its_days_and_keeps_just_within(
    database_url: str, mail: tuple[int, Inbox]
) -> None:
    port, inbox = mail
    app = build_app(database_url, **smtp_env(port))
    client = app.test_client()
    verified = []
    for n in range(2):
        with time_machine.travel(T0 + n * SECOND, tick=False):
            session_uuid = new_session(client)
            address = f"user{n}@example.org"
            call(client, "verify-email", session_uuid, {"email": address})
            code = code_in(inbox.to(address)[0])
            assert call(client, "verify-code", session_uuid, {"code": code})["status"] == "success"
            verified.append(session_uuid)
    audit_before = len(audit_rows(app))

    moment = T0 + timedelta(days=180) + SECOND
    with time_machine.travel(moment, tick=False), app.app_context():
        report = jobs.run_retention(scheduled=True)

    assert report is not None
    assert report.sessions_erased == 1
    assert session_row(app, verified[0]) is None
    assert session_row(app, verified[1]) is not None
    assert report.audit_rows_deleted == 0
    assert len(audit_rows(app)) > audit_before


def test_audit_rows_are_kept_a_year_to_the_second(database_url: str) -> None:
    app = build_app(database_url)
    client = app.test_client()
    with time_machine.travel(T0, tick=False):
        new_session(client)
    with time_machine.travel(T0 + SECOND, tick=False):
        new_session(client)

    # One row is a second older than a year, the other exactly a year old and kept.
    moment = T0 + timedelta(days=365) + SECOND
    with time_machine.travel(moment, tick=False), app.app_context():
        report = jobs.run_retention(scheduled=True)

    assert report is not None
    assert report.audit_rows_deleted == 1
    remaining = [row.occurred_at for row in audit_rows(app, "uuid_generated")]
    assert remaining == [T0 + SECOND]
