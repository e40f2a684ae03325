"""The abandoned-session purge, with real storage and a moved clock."""

from __future__ import annotations

import io
import json
import uuid
from datetime import timedelta

import pytest
from flask import Flask
from sqlalchemy import event, update

from app.clock import utcnow
from app.extensions import db
from app.models import ChatSession, EmailSend, RetirementReason, SessionState
from app.services.abandoned_sessions import purge_abandoned
from app.services.chat_sessions import TOUCH_EVERY
from app.services.erasure import erase_all
from app.storage import current_storage, session_objects
from tests.conftest import JSON_HEADERS, audit_rows, build_app, session_row, unreachable_s3_env

IDLE = timedelta(hours=24)
# The stored last-seen time may lag the last request by up to TOUCH_EVERY.
PURGEABLE = IDLE + TOUCH_EVERY + timedelta(minutes=1)


@pytest.fixture
def app(database_url: str, storage_env: dict[str, str]) -> Flask:
    return build_app(database_url, **storage_env)


def session_with_file(app: Flask) -> str:
    client = app.test_client()
    session_uuid = str(client.post("/api/v1/generate-uuid").get_json()["uuid"])
    uploaded = client.post(
        "/api/v1/upload",
        data={"session_uuid": session_uuid, "file": (io.BytesIO(b"%PDF-1.7 x"), "cv.pdf")},
        content_type="multipart/form-data",
    )
    assert uploaded.status_code == 200
    return session_uuid


def idle_for(
    app: Flask, session_uuid: str, age: timedelta, state: SessionState | None = None
) -> None:
    with app.app_context():
        values: dict[str, object] = {"last_seen_at": utcnow() - age}
        if state is not None:
            values["state"] = state
        db.session.execute(
            update(ChatSession).where(ChatSession.uuid == uuid.UUID(session_uuid)).values(**values)
        )
        db.session.commit()


def files_of(app: Flask, session_uuid: str) -> int:
    with app.app_context():
        return len(session_objects(current_storage(), session_uuid))


def purge(app: Flask, *, dry_run: bool = False):
    with app.app_context():
        return purge_abandoned(now=utcnow(), idle=IDLE, dry_run=dry_run)


def test_an_idle_pending_session_is_purged_and_its_uuid_retired(app: Flask) -> None:
    idle = session_with_file(app)
    idle_for(app, idle, PURGEABLE)

    report = purge(app)

    assert (report.sessions_purged, report.files_deleted, report.errors) == (1, 1, 0)
    assert session_row(app, idle) is None
    assert files_of(app, idle) == 0
    [event] = audit_rows(app, "session_erased")
    assert (str(event.session_uuid), event.details) == (idle, {"reason": "abandoned", "files": 1})
    verdict = app.test_client().post(
        "/api/v1/validate-uuid", json={"uuid": idle}, headers=JSON_HEADERS
    )
    assert verdict.get_json()["status"] == "collision"


def test_verified_and_active_sessions_are_untouched(app: Flask) -> None:
    verified = session_with_file(app)
    idle_for(app, verified, IDLE * 3, SessionState.VERIFIED)
    active = session_with_file(app)
    idle_for(app, active, IDLE - timedelta(minutes=5))

    report = purge(app)

    assert report.sessions_purged == 0
    for kept in (verified, active):
        assert session_row(app, kept) is not None
        assert files_of(app, kept) == 1


def test_a_session_whose_last_sighting_was_not_written_is_not_purged_early(app: Flask) -> None:
    # Seen less than IDLE ago, but the stored time lags that sighting by most of TOUCH_EVERY.
    recent = session_with_file(app)
    idle_for(app, recent, IDLE + TOUCH_EVERY - timedelta(minutes=1))

    report = purge(app)

    assert report.sessions_purged == 0
    assert session_row(app, recent) is not None


def test_a_dry_run_changes_nothing(app: Flask) -> None:
    idle = session_with_file(app)
    idle_for(app, idle, IDLE * 2)
    before = len(audit_rows(app))

    report = purge(app, dry_run=True)

    assert (report.dry_run, report.sessions_purged, report.files_deleted) == (True, 1, 1)
    assert session_row(app, idle) is not None
    assert files_of(app, idle) == 1
    assert len(audit_rows(app)) == before


def test_storage_down_leaves_everything_for_the_next_run(database_url: str) -> None:
    app = build_app(
        database_url,
        **unreachable_s3_env(),
    )
    session_uuid = str(app.test_client().post("/api/v1/generate-uuid").get_json()["uuid"])
    idle_for(app, session_uuid, IDLE * 2)

    report = purge(app)

    assert (report.sessions_purged, report.errors) == (0, 1)
    assert session_row(app, session_uuid) is not None
    assert len(audit_rows(app, "abandoned_purge_error")) == 1
    assert audit_rows(app, "session_erased") == []


def test_old_send_records_are_pruned(app: Flask) -> None:
    with app.app_context():
        db.session.add_all(
            [
                EmailSend(address_hash="a" * 64, sent_at=utcnow() - timedelta(days=2)),
                EmailSend(address_hash="b" * 64, sent_at=utcnow() - timedelta(hours=2)),
            ]
        )
        db.session.commit()

    assert purge(app).send_records_pruned == 1
    with app.app_context():
        assert [send.address_hash[0] for send in db.session.query(EmailSend)] == ["b"]


def test_the_cli_and_the_schedule(database_url: str) -> None:
    app = build_app(database_url)
    idle = str(app.test_client().post("/api/v1/generate-uuid").get_json()["uuid"])
    idle_for(app, idle, IDLE * 2)

    dry = app.test_cli_runner().invoke(args=["cleanup", "abandoned", "--dry-run"])
    real = app.test_cli_runner().invoke(args=["cleanup", "abandoned"])

    assert json.loads(dry.stdout)["sessions_purged"] == 1
    assert json.loads(real.stdout)["sessions_purged"] == 1
    assert session_row(app, idle) is None
    scheduled = build_app(database_url, SCHEDULER_ENABLED="true")
    try:
        assert scheduled.extensions["scheduler"].get_job("abandoned_sessions") is not None
    finally:
        scheduled.extensions["scheduler"].shutdown(wait=False)


def test_erasure_pages_by_key_so_no_statement_grows_with_the_sessions_before_it(
    app: Flask,
) -> None:
    client = app.test_client()
    sessions = [client.post("/api/v1/generate-uuid").get_json()["uuid"] for _ in range(11)]
    with app.app_context():
        # All seen at the same instant: paging must break the tie by UUID.
        db.session.execute(update(ChatSession).values(last_seen_at=utcnow() - IDLE * 2))
        db.session.commit()
    page_sizes: list[int] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        if statement.startswith("SELECT") and "FROM chat_sessions" in statement:
            page_sizes.append(len(parameters))

    with app.app_context():
        event.listen(db.engine, "before_cursor_execute", count)
        try:
            totals = erase_all(
                ChatSession.last_seen_at < utcnow(), reason=RetirementReason.ABANDONED, batch_size=2
            )
        finally:
            event.remove(db.engine, "before_cursor_execute", count)

    assert totals.sessions == len(sessions)
    assert all(session_row(app, session) is None for session in sessions)
    # The cutoff, the last key seen (two values), the batch size and (SQLite) an offset of 0.
    assert len(page_sizes) == 6
    assert max(page_sizes) <= 5, "the query for a page does not grow with the pages before it"
