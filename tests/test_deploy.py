"""The README's "Running in production" section, taken literally.

A fresh PostgreSQL database named by a plain URL, the migrations applied with
``flask --app wsgi db upgrade``, the bucket created with ``flask --app wsgi storage create``,
``gunicorn wsgi:app`` started from the project directory (so it reads ``gunicorn.conf.py``),
production settings, Redis counters, S3 over a moto server, SMTP to aiosmtpd and ADMIN_EMAIL
set. Then a whole visit as the frontend makes it, and every command the README names.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import RUN_ID, Inbox, code_in, json_lines, operator, smtp_server
from tests.servers import gunicorn_process

ADMIN = "ops@chat.example"
VISITOR = "Visitor.Name@Example.org"
ORIGIN = "http://localhost:3000"
FRONTEND_HEADERS = {"Accept": "application/json; version=v1", "Origin": ORIGIN}
METRICS_TOKEN = "scraper-" + uuid.uuid4().hex
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


@pytest.fixture
def production_env(
    fresh_database: str, redis_url: str, s3_endpoint: str
) -> Iterator[tuple[dict[str, str], Inbox]]:
    """The variables the README tells an operator to set, and the admin's and users' inbox."""
    with smtp_server() as (port, inbox):
        yield (
            {
                "APP_ENV": "production",
                "SECRET_KEY": "deploy-test-secret-" + uuid.uuid4().hex,
                "DATABASE_URL": fresh_database,
                "RATELIMIT_STORAGE_URI": redis_url,
                "RATELIMIT_KEY_PREFIX": f"deploy-{RUN_ID}-{uuid.uuid4().hex[:6]}",
                "CORS_ORIGINS": ORIGIN,
                "STORAGE_BACKEND": "s3",
                "S3_BUCKET": f"deploy-{uuid.uuid4().hex[:12]}",
                "S3_REGION": "us-east-1",
                "S3_ENDPOINT_URL": s3_endpoint,
                "MAIL_BACKEND": "smtp",
                "SMTP_HOST": "127.0.0.1",
                "SMTP_PORT": str(port),
                "SMTP_STARTTLS": "false",
                "MAIL_FROM": "verify@chat.example",
                "ADMIN_EMAIL": ADMIN,
                "METRICS_TOKEN": METRICS_TOKEN,
            },
            inbox,
        )


def test_the_production_section_of_the_readme_works_as_written(
    production_env: tuple[dict[str, str], Inbox], tmp_path: Path
) -> None:
    env, inbox = production_env
    migrated = operator(env, "flask", "--app", "wsgi", "db", "upgrade")
    assert any("Running upgrade" in str(r["message"]) for r in json_lines(migrated.stderr))
    created = operator(env, "flask", "--app", "wsgi", "storage", "create")
    assert created.stdout.strip() == "created"

    log = tmp_path / "gunicorn.log"
    with gunicorn_process("wsgi:app", env, probe_path="/health", output=log) as served:
        ready = requests.get(f"{served.url}/ready", timeout=30)
        assert ready.status_code == 200, ready.text
        session_uuid = _a_whole_visit(served.url, inbox)
        unscraped = requests.get(f"{served.url}/metrics", timeout=30)
        scraped = requests.get(
            f"{served.url}/metrics",
            headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
            timeout=30,
        )
        docs = requests.get(f"{served.url}/api/v1/docs/", timeout=30)

    assert unscraped.status_code == 401
    assert scraped.status_code == 200
    assert 'route="/api/v1/email-verification/verify-code",status="200"' in scraped.text
    assert 'sessions{state="verified"} 1.0' in scraped.text
    assert session_uuid not in scraped.text
    assert docs.status_code == 404, "the API docs are off in production unless switched on"

    server_lines = json_lines(log.read_text())
    assert any(line["logger"] == "gunicorn.error" for line in server_lines)
    assert any(line["logger"] == "app.access" for line in server_lines)
    _no_personal_data(log.read_text(), session_uuid)

    for job in ("orphans", "abandoned", "retention"):
        for flags in (["--dry-run"], []):
            ran = operator(env, "flask", "--app", "wsgi", "cleanup", job, *flags)
            summary = json.loads(ran.stdout)
            assert summary["dry_run"] is bool(flags)
            assert ran.stdout.count('"dry_run"') == 1, "the summary is printed once"
            assert all("summary" not in line for line in json_lines(ran.stderr))
    trail = operator(env, "flask", "--app", "wsgi", "audit", "show", session_uuid)
    events = [line.split()[1] for line in trail.stdout.splitlines()]
    assert events[0] == "uuid_generated"
    assert "email_verified" in events
    notified = operator(env, "flask", "--app", "wsgi", "notify-admin", "Deploy check")
    assert notified.returncode == 0
    [admin_mail] = inbox.to(ADMIN)
    assert "Deploy check" in admin_mail["Subject"]


def _a_whole_visit(base: str, inbox: Inbox) -> str:
    """The frontend's calls for one visit, through e-mail verification; the session's UUID."""
    api = f"{base}/api/v1"
    post_headers = {**FRONTEND_HEADERS, "Content-Type": "application/json"}
    issued = requests.post(f"{api}/generate-uuid", headers=post_headers, timeout=30)
    assert issued.status_code == 200
    assert issued.headers["Access-Control-Allow-Origin"] == ORIGIN
    session_uuid = issued.json()["uuid"]

    validated = requests.post(
        f"{api}/validate-uuid", json={"uuid": session_uuid}, headers=post_headers, timeout=30
    )
    assert validated.json()["status"] == "success"
    consent = requests.post(
        f"{api}/persist_session",
        json={"uuid": session_uuid, "consent_user_data": True, "name": "Visitor"},
        headers=post_headers,
        timeout=30,
    )
    assert consent.status_code == 200
    uploaded = requests.post(
        f"{api}/upload",
        data={"session_uuid": session_uuid},
        files={"file": ("cv.pdf", PDF, "application/pdf")},
        headers=FRONTEND_HEADERS,
        timeout=30,
    )
    assert uploaded.status_code == 200, uploaded.text
    assert requests.get(uploaded.json()["url"], timeout=30).content == PDF

    email_headers = {**post_headers, "X-Session-ID": session_uuid}
    sent = requests.post(
        f"{api}/email-verification/verify-email",
        json={"email": VISITOR},
        headers=email_headers,
        timeout=30,
    )
    assert sent.json()["nextTransition"] == "CODE_INPUT", sent.text
    [message] = inbox.to("Visitor.Name@example.org")
    verified = requests.post(
        f"{api}/email-verification/verify-code",
        json={"code": code_in(message)},
        headers=email_headers,
        timeout=30,
    )
    assert verified.json()["nextTransition"] == "CHAT_READY", verified.text
    state = requests.get(f"{api}/session/{session_uuid}", headers=FRONTEND_HEADERS, timeout=30)
    assert (state.json()["state"], state.json()["file_count"]) == ("verified", 1)
    return session_uuid


def _no_personal_data(text: str, session_uuid: str) -> None:
    assert session_uuid not in text
    assert not re.search(r"visitor\.name@", text, re.IGNORECASE)
