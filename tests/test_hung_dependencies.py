"""Dependencies that hang instead of failing fast, met through gunicorn at the default timeouts.

S3 and SMTP point at a server that accepts connections and never answers; a session row is
held locked by another connection. Every request still gets a JSON answer well inside the
request deadline, the worker is never killed, and calls that do not need the hung dependency are
not held up by the ones that do.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import psycopg2
import requests
from sqlalchemy.engine import make_url

from tests.conftest import json_lines, operator
from tests.servers import gunicorn_process, hung_server

# The default request deadline is 30 s (config.py); each hung call must end well
# inside it: S3 gives up after 2 attempts x 5 s, SMTP after its 10 s deadline, a lock wait
# after 2 s.
WELL_INSIDE_DEADLINE = 15.0
HEADERS = {"Accept": "application/json; version=v1", "Content-Type": "application/json"}


def timed(call: object) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = call()  # type: ignore[operator]
    return response, time.monotonic() - started


def test_hung_storage_mail_and_a_locked_row_each_get_a_json_answer_in_time(
    fresh_database: str, tmp_path: Path
) -> None:
    with hung_server() as hung_port:
        env = {
            "APP_ENV": "production",
            "SECRET_KEY": "hung-dependency-test-" + uuid.uuid4().hex,
            "DATABASE_URL": fresh_database,
            "STORAGE_BACKEND": "s3",
            "S3_BUCKET": "never-answers",
            "S3_REGION": "us-east-1",
            "S3_ENDPOINT_URL": f"http://127.0.0.1:{hung_port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "MAIL_BACKEND": "smtp",
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(hung_port),
            "SMTP_STARTTLS": "false",
            "METRICS_TOKEN": "hung-dependency-scraper-" + uuid.uuid4().hex,
        }
        operator(env, "flask", "--app", "wsgi", "db", "upgrade")
        log = tmp_path / "gunicorn.log"
        with gunicorn_process(
            "wsgi:app", env, workers=4, probe_path="/health", output=log
        ) as served:
            api = f"{served.url}/api/v1"
            session_uuid = requests.post(f"{api}/generate-uuid", timeout=10).json()["uuid"]
            email_headers = {**HEADERS, "X-Session-ID": session_uuid}

            with ThreadPoolExecutor(max_workers=4) as pool:
                upload = pool.submit(
                    timed,
                    lambda: requests.post(
                        f"{api}/upload",
                        data={"session_uuid": session_uuid},
                        files={"file": ("cv.pdf", b"%PDF-1.4\n", "application/pdf")},
                        timeout=60,
                    ),
                )
                files = pool.submit(
                    timed, lambda: requests.get(f"{api}/session/{session_uuid}/files", timeout=60)
                )
                ready = pool.submit(timed, lambda: requests.get(f"{served.url}/ready", timeout=60))
                mail = pool.submit(
                    timed,
                    lambda: requests.post(
                        f"{api}/email-verification/verify-email",
                        json={"email": "someone@example.org"},
                        headers=email_headers,
                        timeout=60,
                    ),
                )
                time.sleep(1.0)
                # While its upload and its code's mail hang, the session's row is free.
                resumed, _ = timed(
                    lambda: requests.post(
                        f"{api}/validate-uuid",
                        json={"uuid": session_uuid},
                        headers=HEADERS,
                        timeout=60,
                    )
                )
                (upload_answer, upload_time) = upload.result()
                (files_answer, files_time) = files.result()
                (ready_answer, ready_time) = ready.result()
                (mail_answer, mail_time) = mail.result()

            busy, busy_time = _call_while_the_row_is_locked(fresh_database, api, session_uuid)

    assert (resumed.status_code, resumed.json()["status"]) == (200, "success")
    assert upload_answer.status_code == 503
    assert upload_answer.json()["error"] == "storage_unavailable"
    assert files_answer.status_code == 503
    assert files_answer.json()["error"] == "storage_unavailable"
    assert files_answer.headers["Retry-After"] == "5"
    assert ready_answer.status_code == 503
    assert ready_answer.json()["reasons"]["storage"].startswith("unreachable")
    assert (mail_answer.status_code, mail_answer.json()["code"]) == (200, "mail_unavailable")
    for elapsed in (upload_time, files_time, ready_time, mail_time):
        assert elapsed < WELL_INSIDE_DEADLINE
    assert busy.status_code == 503
    assert busy.json()["error"] == "session_busy"
    assert busy.headers["Retry-After"] == "1"
    assert 1.5 < busy_time < 5.0

    text = log.read_text()
    lines = json_lines(text)
    # Measured where it is served: the time a worker spent on it, queueing for a worker aside.
    [resume_line] = [
        line for line in lines if line.get("correlation_id") == resumed.headers["X-Correlation-ID"]
    ]
    assert float(str(resume_line["duration_ms"])) < 1000
    assert not [line for line in lines if "WORKER TIMEOUT" in str(line["message"])]
    assert session_uuid not in text
    assert "someone@example.org" not in text


def _call_while_the_row_is_locked(
    database_url: str, api: str, session_uuid: str
) -> tuple[requests.Response, float]:
    """persist_session while another connection holds the session's row lock."""
    dsn = make_url(database_url).render_as_string(hide_password=False)
    with closing(psycopg2.connect(dsn)) as holder:
        holder.cursor().execute(
            "SELECT uuid FROM chat_sessions WHERE uuid = %s FOR UPDATE", (session_uuid,)
        )
        return timed(
            lambda: requests.post(
                f"{api}/persist_session",
                json={"uuid": session_uuid, "consent_user_data": True},
                headers=HEADERS,
                timeout=60,
            )
        )
