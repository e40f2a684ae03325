"""One deadline per request, met through gunicorn: S3 that stalls, trickles or drops mid-answer.

Per-read timeouts are set far above the deadline, so only the deadline can end these waits.
Every answer is JSON (or a download cut short of its announced length), arrives within the
deadline, and no worker is killed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from app.deadline import RESERVE_SHARE
from tests.conftest import json_lines, operator, s3_env
from tests.s3_proxy import S3Proxy, Slow
from tests.servers import gunicorn_process

DEADLINE = 4
# Time for the answer to travel once the deadline has passed.
SLACK = 2.0
FILE_SIZE = 100_000


@dataclass
class Served:
    url: str
    proxy: S3Proxy
    log: Path


@pytest.fixture(scope="module")
def served(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """gunicorn on SQLite, its S3 behind a proxy that can misbehave."""
    folder = tmp_path_factory.mktemp("deadline")
    proxy = S3Proxy(s3_endpoint)
    with proxy.serving() as proxy_url:
        env = {
            "DATABASE_URL": f"sqlite:///{folder / 'sessions.sqlite3'}",
            "SECRET_KEY": "deadline-test-secret",
            **s3_env(proxy_url),
            "S3_READ_TIMEOUT_SECONDS": "10",
            "S3_MAX_ATTEMPTS": "1",
            "GUNICORN_TIMEOUT": "20",
            "REQUEST_DEADLINE_SECONDS": str(DEADLINE),
            "SCHEDULER_ENABLED": "false",
            "SESSION_RATE_LIMIT": "1000/minute",
            "SESSION_RESOURCE_RATE_LIMIT": "1000/minute",
        }
        operator(env, "flask", "--app", "wsgi", "db", "upgrade")
        log = folder / "gunicorn.log"
        with gunicorn_process("wsgi:app", env, workers=2, probe_path="/health", output=log) as app:
            yield Served(f"{app.url}/api/v1", proxy, log)


@pytest.fixture
def uploaded(served: Served) -> Iterator[tuple[str, str, bytes]]:
    """A session with one stored file: (session UUID, download URL, content)."""
    served.proxy.slow.clear()
    session_uuid = requests.post(f"{served.url}/generate-uuid", timeout=10).json()["uuid"]
    content = b"%PDF-1.4\n" + bytes(range(256)) * ((FILE_SIZE - 9) // 256 + 1)
    content = content[:FILE_SIZE]
    answer = requests.post(
        f"{served.url}/upload",
        data={"session_uuid": session_uuid},
        files={"file": ("report.pdf", content, "application/pdf")},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    yield session_uuid, answer.json()["url"], content
    served.proxy.slow.clear()


def timed_get(url: str) -> tuple[requests.Response, bytes, bool, float]:
    """GET ``url`` and read the whole body: (response, bytes read, whether it broke, seconds)."""
    started = time.monotonic()
    response = requests.get(url, stream=True, timeout=30)
    received = bytearray()
    broken = False
    try:
        for piece in response.iter_content(8192):
            received += piece
    except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError):
        broken = True
    return response, bytes(received), broken, time.monotonic() - started


def test_a_download_announces_its_length_and_offers_no_ranges(
    uploaded: tuple[str, str, bytes],
) -> None:
    _, url, content = uploaded

    response, received, broken, _ = timed_get(url)

    assert response.status_code == 200
    assert response.headers["Content-Length"] == str(FILE_SIZE)
    assert "Accept-Ranges" not in response.headers
    assert response.headers["Content-Disposition"] == "attachment; filename=report.pdf"
    assert (received, broken) == (content, False)


def test_storage_that_stalls_before_the_first_byte_costs_a_json_503_in_time(
    served: Served, uploaded: tuple[str, str, bytes]
) -> None:
    _, url, _ = uploaded
    served.proxy.slow["GetObject"] = Slow("stall")

    response, received, _, elapsed = timed_get(url)

    assert response.status_code == 503
    assert json.loads(received)["error"] == "storage_unavailable"
    assert response.headers["Retry-After"] == "5"
    # Storage gives up when only the reserve the database keeps is left.
    assert DEADLINE * (1 - RESERVE_SHARE) - 0.5 < elapsed < DEADLINE + SLACK


@pytest.mark.parametrize("how", ["stall", "trickle"])
def test_storage_that_stops_mid_file_ends_the_download_short_within_the_deadline(
    served: Served, uploaded: tuple[str, str, bytes], how: str
) -> None:
    _, url, content = uploaded
    served.proxy.slow["GetObject"] = Slow(how, after=100, interval=0.2)

    response, received, broken, elapsed = timed_get(url)

    assert response.status_code == 200
    assert response.headers["Content-Length"] == str(FILE_SIZE)
    # The client can tell: fewer bytes than announced, and the connection broke.
    assert broken
    assert len(received) < FILE_SIZE
    assert content.startswith(received)
    assert elapsed < DEADLINE + SLACK


def test_a_connection_dropped_mid_file_is_never_a_whole_looking_file(
    served: Served, uploaded: tuple[str, str, bytes]
) -> None:
    _, url, _ = uploaded
    served.proxy.slow["GetObject"] = Slow("close", after=100)

    response, received, broken, _ = timed_get(url)

    assert response.status_code == 200
    assert broken
    assert len(received) < FILE_SIZE


def test_a_trickling_listing_answers_a_json_503_within_the_deadline(
    served: Served, uploaded: tuple[str, str, bytes]
) -> None:
    session_uuid, _, _ = uploaded
    served.proxy.slow["ListObjectsV2"] = Slow("trickle", interval=0.2)

    started = time.monotonic()
    response = requests.get(f"{served.url}/session/{session_uuid}/files", timeout=30)
    elapsed = time.monotonic() - started

    assert response.status_code == 503
    assert response.json()["error"] == "storage_unavailable"
    assert elapsed < DEADLINE + SLACK

    served.proxy.slow.clear()
    assert requests.get(f"{served.url}/session/{session_uuid}/files", timeout=10).ok


def test_no_worker_was_killed_and_no_link_reached_the_log(
    served: Served, uploaded: tuple[str, str, bytes]
) -> None:
    session_uuid, url, _ = uploaded
    served.proxy.slow["GetObject"] = Slow("stall", after=100)
    timed_get(url)

    text = served.log.read_text()
    lines = json_lines(text)
    assert not [line for line in lines if "WORKER TIMEOUT" in str(line["message"])]
    assert not [line for line in lines if "SIGKILL" in str(line["message"])]
    assert url.rpartition("/")[2] not in text
    # gunicorn did quote the cut download's path, link token and all, and it was redacted.
    assert "<token>" in text
    assert session_uuid not in text


def test_an_overlong_link_is_answered_in_json_by_the_app(served: Served) -> None:
    response = requests.get(f"{served.url}/files/" + "A" * 5000, timeout=10)

    assert response.status_code == 404
    assert response.json()["error"] == "file_not_found"


def test_an_upload_whose_answer_never_comes_leaves_no_file(served: Served) -> None:
    # S3 stores the object, then its answer stalls: the client is told 503, so the file must go.
    served.proxy.slow.clear()
    session_uuid = requests.post(f"{served.url}/generate-uuid", timeout=10).json()["uuid"]
    served.proxy.slow["PutObject"] = Slow("hold")
    try:
        answer = requests.post(
            f"{served.url}/upload",
            data={"session_uuid": session_uuid},
            files={"file": ("stalled.pdf", b"%PDF-1.4\n", "application/pdf")},
            timeout=30,
        )
    finally:
        served.proxy.slow.clear()

    assert answer.status_code == 503
    assert answer.json()["error"] == "storage_unavailable"
    listed = requests.get(f"{served.url}/session/{session_uuid}/files", timeout=10).json()
    assert listed["files"] == []
