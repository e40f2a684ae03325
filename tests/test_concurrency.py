"""Races that only a real PostgreSQL server can stage."""

from __future__ import annotations

import threading
import uuid

from flask import Flask
from sqlalchemy import func, select

from app.extensions import db
from app.models import AuditEvent, ChatSession
from tests.conftest import JSON_HEADERS, audit_rows, build_app

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
