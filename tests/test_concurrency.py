"""Races that only a real PostgreSQL server can stage."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta

from flask import Flask
from sqlalchemy import func, select

from app.clock import utcnow
from app.extensions import db
from app.models import AuditEvent, ChatSession, JobRun
from app.services.orphan_sweep import sweep_orphans
from app.storage import current_storage
from tests.conftest import JSON_HEADERS, audit_rows, build_app, smtp_env, smtp_server
from tests.servers import PROJECT_ROOT

THREADS = 16


def _race(
    app: Flask, path: str, body: dict[str, str] | None
) -> list[tuple[int, dict[str, object]]]:
    """Send the same request from many threads released at the same instant."""
    start = threading.Barrier(THREADS)
    results: list[tuple[int, dict[str, object]]] = []
    lock = threading.Lock()

    def worker() -> None:
        client = app.test_client()
        start.wait()
        response = client.post(path, json=body, headers=JSON_HEADERS)
        with lock:
            results.append((response.status_code, response.get_json()))

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def test_concurrent_validation_of_one_new_uuid_creates_one_row(postgres_url: str) -> None:
    app = build_app(postgres_url)
    client_made = str(uuid.uuid4())

    results = _race(app, "/api/v1/validate-uuid", {"uuid": client_made})

    assert len(results) == THREADS
    assert all(status == 200 and body["status"] == "success" for status, body in results)
    assert all(body["uuid"] == client_made for _, body in results)
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(ChatSession)) == 1
        counts = dict(
            db.session.execute(
                select(AuditEvent.event_type, func.count()).group_by(AuditEvent.event_type)
            ).all()
        )
    assert counts == {"uuid_registered": 1, "uuid_validated": THREADS - 1}
    assert len(audit_rows(app)) == THREADS


def test_concurrent_generation_issues_distinct_sessions(postgres_url: str) -> None:
    app = build_app(postgres_url)

    results = _race(app, "/api/v1/generate-uuid", None)

    issued = {body["uuid"] for status, body in results if status == 200}
    assert len(issued) == THREADS
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(ChatSession)) == THREADS


def test_a_sweep_racing_uploads_and_new_sessions_only_deletes_orphans(
    postgres_url: str, tmp_path
) -> None:
    app = build_app(postgres_url, STORAGE_LOCAL_ROOT=str(tmp_path))
    orphans = [str(uuid.uuid4()) for _ in range(300)]
    for orphan in orphans:
        path = tmp_path / "uploads" / orphan / "a.pdf"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"%PDF-1.7 orphan")
    uploaded: list[str] = []
    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(5)

    def sweeper() -> None:
        start.wait()
        for _ in range(3):
            with app.app_context():
                # Seen from an hour ahead, every object is old enough: only the database stands
                # between the sweep and a live session's files.
                sweep_orphans(
                    current_storage(),
                    now=utcnow() + timedelta(hours=1),
                    min_age=timedelta(minutes=30),
                    dry_run=False,
                )

    def user() -> None:
        client = app.test_client()
        start.wait()
        for _ in range(10):
            session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]
            response = client.post(
                "/api/v1/upload",
                data={
                    "session_uuid": session_uuid,
                    "file": (io.BytesIO(b"%PDF-1.7 live"), "cv.pdf"),
                },
                content_type="multipart/form-data",
            )
            with lock:
                statuses.append(response.status_code)
                uploaded.append(f"uploads/{session_uuid}/cv.pdf")

    threads = [threading.Thread(target=sweeper)] + [threading.Thread(target=user) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    with app.app_context():
        remaining = {o.key for page in current_storage().list_pages("uploads/") for o in page}
    assert statuses == [200] * 40
    assert remaining == set(uploaded)


SCHEDULED_SWEEP = """
import sys, time
from app import create_app
from app import jobs
from tests.conftest import base_env
app = create_app(base_env(sys.argv[1], STORAGE_LOCAL_ROOT=sys.argv[2]))
while time.time() < float(sys.argv[3]):
    time.sleep(0.001)
with app.app_context():
    print("ran" if jobs.run_orphan_sweep(scheduled=True) else "skipped")
"""


def test_two_scheduler_processes_sweep_once_per_interval(postgres_url: str, tmp_path) -> None:
    app = build_app(postgres_url, STORAGE_LOCAL_ROOT=str(tmp_path))

    def round_of_two() -> list[str]:
        start_at = str(time.time() + 3)
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", SCHEDULED_SWEEP, postgres_url, str(tmp_path), start_at],
                cwd=PROJECT_ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for _ in range(2)
        ]
        return sorted(process.communicate(timeout=60)[0].strip() for process in processes)

    first = round_of_two()
    same_interval = round_of_two()
    with app.app_context():
        job_run = db.session.get(JobRun, "orphan_sweep")
        assert job_run is not None
        assert job_run.last_run_started_at is not None
        job_run.last_run_started_at -= timedelta(minutes=31)  # as if the interval had passed
        db.session.commit()
    next_interval = round_of_two()

    assert first == ["ran", "skipped"]
    assert same_interval == ["skipped", "skipped"]
    assert next_interval == ["ran", "skipped"]
    assert len(audit_rows(app, "orphan_sweep_completed")) == 2


def test_concurrent_sends_to_one_address_respect_its_daily_cap(postgres_url: str) -> None:
    with smtp_server() as (port, inbox):
        app = build_app(postgres_url, EMAIL_SENDS_PER_ADDRESS_PER_DAY="2", **smtp_env(port))
        sessions = [
            app.test_client().post("/api/v1/generate-uuid").get_json()["uuid"] for _ in range(8)
        ]
        start = threading.Barrier(len(sessions))
        outcomes: list[str] = []

        def ask(session_uuid: str) -> None:
            client = app.test_client()
            start.wait()
            response = client.post(
                "/api/v1/email-verification/verify-email",
                json={"email": "victim@example.org"},
                headers={**JSON_HEADERS, "X-Session-ID": session_uuid},
            )
            outcomes.append(response.get_json().get("code") or "sent")

        threads = [threading.Thread(target=ask, args=(s,)) for s in sessions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

    assert sorted(outcomes) == ["address_daily_limit"] * 6 + ["sent"] * 2
    assert len(inbox.messages) == 2
