"""Rate limits by intent, at the default settings.

A real visit of the existing frontend (its call pattern is in the contract, section 0) never
meets a 429; minting sessions is cut off at 10 a minute per client, and a flood of resumes for
one session is cut off too.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import re
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
import requests
import time_machine
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import (
    JSON_HEADERS,
    RUN_ID,
    TEST_SECRET_KEY,
    Inbox,
    audit_rows,
    base_env,
    build_app,
    code_in,
    smtp_env,
    smtp_server,
)
from tests.servers import app_process, free_port, gunicorn_process, hung_server

ORIGIN = "http://localhost:3000"
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
LIMIT_VARIABLES = (
    "SESSION_RATE_LIMIT",
    "RESUME_RATE_LIMIT",
    "RESUME_IP_RATE_LIMIT",
    "SESSION_RESOURCE_RATE_LIMIT",
    "UPLOAD_RATE_LIMIT",
    "EMAIL_RATE_LIMIT",
)
# A blank variable counts as unset: these settings give the app its own default limits.
AT_DEFAULT_LIMITS = dict.fromkeys(LIMIT_VARIABLES, "")


class Frontend:
    """The existing React client's calls, as it makes them (contract, section 0)."""

    def __init__(self, base: str) -> None:
        self.api = f"{base}/api/v1"
        self.http = requests.Session()
        self.http.headers.update({"Accept": "application/json; version=v1", "Origin": ORIGIN})
        self.session_uuid = ""
        self.answers: list[requests.Response] = []

    def _call(self, method: str, path: str, **kwargs: object) -> requests.Response:
        if "json" in kwargs:
            kwargs["headers"] = {"Content-Type": "application/json", **kwargs.get("headers", {})}
        response = self.http.request(method, f"{self.api}/{path}", timeout=30, **kwargs)
        self.answers.append(response)
        return response

    def load(self) -> None:
        """A page load: a stored UUID is validated; without one, a fresh one is issued."""
        if not self.session_uuid:
            self.session_uuid = self._call("POST", "generate-uuid").json()["uuid"]
        self.validate()

    def validate(self) -> None:
        verdict = self._call("POST", "validate-uuid", json={"uuid": self.session_uuid})
        assert verdict.json()["status"] == "success", verdict.text

    def upload(self, name: str) -> None:
        self.validate()
        self.validate()
        self._call(
            "POST",
            "upload",
            data={"session_uuid": self.session_uuid},
            files={"file": (name, PDF, "application/pdf")},
        )

    def remove(self, name: str) -> None:
        self.validate()
        self.validate()
        self._call("DELETE", "delete", json={"filename": name, "session_uuid": self.session_uuid})

    def rejected_pick(self) -> None:
        """A file the client refuses itself (not a PDF, too big) after one validation."""
        self.validate()

    def email(self, step: str, body: dict[str, str]) -> dict[str, str]:
        headers = {"X-Session-ID": self.session_uuid}
        return self._call("POST", f"email-verification/{step}", json=body, headers=headers).json()


@pytest.fixture
def served_at_defaults(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> Iterator[tuple[str, Inbox]]:
    """gunicorn with two workers at the default limits, counters in Redis."""
    build_app(postgres_url)  # the schema the server will use, emptied
    with smtp_server() as (port, inbox):
        env = {
            "DATABASE_URL": postgres_url,
            "SECRET_KEY": "rate-limit-replay-" + uuid.uuid4().hex,
            "RATELIMIT_STORAGE_URI": redis_url,
            "RATELIMIT_KEY_PREFIX": f"visit-{RUN_ID}-{uuid.uuid4().hex[:6]}",
            "STORAGE_LOCAL_ROOT": str(tmp_path / "storage"),
            "SCHEDULER_ENABLED": "false",
            "LOG_LEVEL": "warning",
            **smtp_env(port),
        }
        with gunicorn_process("wsgi:app", env, workers=2, probe_path="/health") as served:
            yield served.url, inbox


def test_an_ordinary_visit_at_the_default_limits_meets_no_429(
    served_at_defaults: tuple[str, Inbox],
) -> None:
    base, inbox = served_at_defaults
    visitor = Frontend(base)

    visitor.load()
    for _ in range(3):
        visitor.load()  # reloads
    consent = {"uuid": visitor.session_uuid, "consent_user_data": True}
    visitor._call("POST", "persist_session", json=consent)
    for name in ("cv.pdf", "cover-letter.pdf", "references.pdf"):
        visitor.upload(name)
    visitor.rejected_pick()
    visitor.remove("cover-letter.pdf")
    visitor.upload("cover-letter.pdf")
    visitor.rejected_pick()
    visitor.load()
    assert visitor.email("verify-email", {"email": "visitor@example.org"})["status"] == "success"
    code = code_in(inbox.to("visitor@example.org")[0])
    wrong = visitor.email("verify-code", {"code": "000000" if code != "000000" else "111111"})
    assert wrong["code"] == "invalid_code"
    too_soon = visitor.email("resend-code", {})
    assert too_soon["code"] == "cooldown"
    assert visitor.email("verify-code", {"code": code})["nextTransition"] == "CHAT_READY"
    visitor._call("GET", f"session/{visitor.session_uuid}/export")

    statuses = [answer.status_code for answer in visitor.answers]
    validations = [answer for answer in visitor.answers if answer.url.endswith("validate-uuid")]
    assert len(validations) >= 17
    assert 429 not in statuses, statuses
    assert set(statuses) == {200}
    assert not [answer for answer in visitor.answers if "Retry-After" in answer.headers]
    assert len(inbox.to("visitor@example.org")) == 1


@pytest.fixture
def app_at_defaults(database_url: str) -> Flask:
    return build_app(database_url, **AT_DEFAULT_LIMITS)


def generate(client: FlaskClient) -> int:
    return client.post("/api/v1/generate-uuid", headers=JSON_HEADERS).status_code


def validate(client: FlaskClient, session_uuid: str) -> tuple[int, str | None]:
    response = client.post(
        "/api/v1/validate-uuid", json={"uuid": session_uuid}, headers=JSON_HEADERS
    )
    body = response.get_json()
    return response.status_code, body["status"] if response.status_code == 200 else body["error"]


def test_the_eleventh_new_session_in_a_minute_is_refused(app_at_defaults: Flask) -> None:
    client = app_at_defaults.test_client()

    statuses = [generate(client) for _ in range(11)]

    assert statuses == [200] * 10 + [429]
    refused = client.post("/api/v1/generate-uuid", headers=JSON_HEADERS)
    assert refused.get_json()["error"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert len(audit_rows(app_at_defaults, "uuid_generated")) == 10
    assert audit_rows(app_at_defaults, "rate_limited")[0].details == {"limit": "10/minute"}


def test_registering_unknown_uuids_spends_the_same_budget(app_at_defaults: Flask) -> None:
    client = app_at_defaults.test_client()

    generated = [generate(client) for _ in range(5)]
    registered = [validate(client, str(uuid.uuid4())) for _ in range(5)]

    assert generated == [200] * 5
    assert registered == [(200, "success")] * 5
    assert validate(client, str(uuid.uuid4())) == (429, "rate_limited")
    assert generate(client) == 429
    assert len(audit_rows(app_at_defaults, "uuid_registered")) == 5


def test_a_replacement_for_an_ended_session_spends_the_budget(app_at_defaults: Flask) -> None:
    client = app_at_defaults.test_client()
    ended = client.post("/api/v1/generate-uuid").get_json()["uuid"]
    assert client.delete(f"/api/v1/session/{ended}").status_code == 200

    assert validate(client, ended) == (200, "collision")
    assert [generate(client) for _ in range(9)] == [200] * 8 + [429]


def test_resuming_a_live_session_works_when_the_new_session_budget_is_spent(
    app_at_defaults: Flask,
) -> None:
    client = app_at_defaults.test_client()
    live = client.post("/api/v1/generate-uuid").get_json()["uuid"]
    while generate(client) == 200:
        pass

    assert [validate(client, live) for _ in range(5)] == [(200, "success")] * 5
    assert validate(client, "not-a-uuid") == (200, "invalid")


def test_a_flood_of_resumes_for_one_session_is_cut_off(app_at_defaults: Flask) -> None:
    client = app_at_defaults.test_client()
    flooded = client.post("/api/v1/generate-uuid").get_json()["uuid"]
    other = client.post("/api/v1/generate-uuid").get_json()["uuid"]

    verdicts = [validate(client, flooded) for _ in range(200)]

    assert verdicts[:60] == [(200, "success")] * 60
    assert set(verdicts[60:]) == {(429, "rate_limited")}
    assert validate(client, other) == (200, "success")


def test_one_client_resuming_many_sessions_meets_its_own_ceiling(database_url: str) -> None:
    app = build_app(database_url, RESUME_RATE_LIMIT="2/minute", RESUME_IP_RATE_LIMIT="5/minute")
    client = app.test_client()
    sessions = [client.post("/api/v1/generate-uuid").get_json()["uuid"] for _ in range(3)]

    first = [validate(client, sessions[0]) for _ in range(3)]
    others = [validate(client, session) for session in sessions[1:] for _ in range(2)]

    # The refused third resume of the first session did not count against the ceiling.
    assert first == [(200, "success")] * 2 + [(429, "rate_limited")]
    assert others == [(200, "success")] * 3 + [(429, "rate_limited")]
    assert len(audit_rows(app, "uuid_validated")) == 5


def test_retry_after_is_only_on_429_and_503(database_url: str) -> None:
    app = build_app(
        database_url,
        **{
            **AT_DEFAULT_LIMITS,
            "STORAGE_BACKEND": "s3",
            "S3_BUCKET": "unreachable",
            "S3_ENDPOINT_URL": "http://127.0.0.1:9",
            "S3_REGION": "us-east-1",
            "S3_CONNECT_TIMEOUT_SECONDS": "1",
            "S3_MAX_ATTEMPTS": "1",
        },
    )
    client = app.test_client()
    session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]

    answers = [
        client.post("/api/v1/validate-uuid", json={"uuid": session_uuid}),
        client.get(f"/api/v1/session/{session_uuid}/files"),
        client.post(
            "/api/v1/upload",
            data={"session_uuid": session_uuid, "file": (io.BytesIO(PDF), "a.pdf")},
            content_type="multipart/form-data",
        ),
    ]

    assert answers[0].status_code == 200
    assert "Retry-After" not in answers[0].headers
    header_names = [name.lower() for name, _ in answers[0].headers]
    assert not [name for name in header_names if name.startswith("x-ratelimit")]
    assert [answer.status_code for answer in answers[1:]] == [503, 503]
    assert [answer.headers["Retry-After"] for answer in answers[1:]] == ["5", "5"]


def test_withdrawing_through_persist_session_says_what_was_erased(database_url: str) -> None:
    app = build_app(database_url, STORAGE_LOCAL_ROOT=tempfile.mkdtemp(prefix="files-"))
    client = app.test_client()
    session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]
    consent = {"uuid": session_uuid, "consent_user_data": True, "name": "Ada"}
    assert client.post("/api/v1/persist_session", json=consent).status_code == 200
    client.post(
        "/api/v1/upload",
        data={"session_uuid": session_uuid, "file": (io.BytesIO(PDF), "cv.pdf")},
        content_type="multipart/form-data",
    )

    withdrawn = client.post(
        "/api/v1/persist_session", json={"uuid": session_uuid, "consent_user_data": False}
    ).get_json()
    declined = client.post(
        "/api/v1/persist_session", json={"uuid": session_uuid, "consent_user_data": False}
    ).get_json()

    assert re.fullmatch(
        r"Consent withdrawn: your name, e-mail address and 1 uploaded file\(s\) were erased\.",
        withdrawn["message"],
    )
    assert withdrawn["consent_user_data"] is False
    assert declined["message"] == "Consent declined."


def test_invalid_uuids_share_one_budget_per_client(app_at_defaults: Flask) -> None:
    client = app_at_defaults.test_client()

    verdicts = [validate(client, f"not-a-uuid-{n}") for n in range(61)]

    assert verdicts == [(200, "invalid")] * 60 + [(429, "rate_limited")]
    assert len(audit_rows(app_at_defaults, "uuid_invalid")) == 60


@pytest.mark.parametrize("redis_state", ["refusing", "hung"])
def test_counters_that_cannot_be_reached_cost_a_second_not_the_service(
    database_url: str, redis_state: str
) -> None:
    build_app(database_url)  # the schema the server process will use
    with contextlib.ExitStack() as stack:
        port = free_port() if redis_state == "refusing" else stack.enter_context(hung_server())
        env = base_env(
            database_url, **AT_DEFAULT_LIMITS, RATELIMIT_STORAGE_URI=f"redis://127.0.0.1:{port}/0"
        )
        # Its own process: the limiter's memory of a failed Redis lasts as long as the process.
        served = stack.enter_context(app_process(env))
        started = time.monotonic()
        issued = requests.post(f"{served.url}/api/v1/generate-uuid", timeout=30)
        resumed = requests.post(
            f"{served.url}/api/v1/validate-uuid", json={"uuid": issued.json()["uuid"]}, timeout=30
        )
        elapsed = time.monotonic() - started

    assert issued.status_code == 200
    assert (resumed.status_code, resumed.json()["status"]) == (200, "success")
    assert elapsed < 5, "one bounded wait, then the limits count in memory"


def test_an_ipv6_subscriber_is_one_client(database_url: str) -> None:
    app = build_app(database_url, **AT_DEFAULT_LIMITS, TRUSTED_PROXY_COUNT="1")
    client = app.test_client()

    def from_address(address: str) -> int:
        return client.post(
            "/api/v1/generate-uuid", headers={**JSON_HEADERS, "X-Forwarded-For": address}
        ).status_code

    same_subscriber = [from_address(f"2001:db8:0:1::{n:x}") for n in range(11)]
    next_subscriber = from_address("2001:db8:0:2::1")

    assert same_subscriber == [200] * 10 + [429]
    assert next_subscriber == 200


def test_a_refusal_does_not_eat_into_the_longer_windows(database_url: str) -> None:
    client = build_app(database_url, SESSION_RATE_LIMIT="2/second;3/hour").test_client()

    statuses = [generate(client) for _ in range(4)]
    time.sleep(1.1)
    after_a_second = generate(client)

    assert statuses == [200, 200, 429, 429]
    assert after_a_second == 200, "only two of the hour's three were spent"


def test_a_limit_holds_for_any_sixty_seconds(database_url: str) -> None:
    client = build_app(database_url, SESSION_RATE_LIMIT="10/minute").test_client()
    start = datetime.now(UTC)

    def burst(at_second: int, count: int) -> list[int]:
        with time_machine.travel(start + timedelta(seconds=at_second), tick=False):
            return [generate(client) for _ in range(count)]

    # A window counted from the first request would start afresh at second 60 and let ten
    # more through within two seconds of the last nine.
    statuses = burst(0, 1) + burst(58, 9) + burst(61, 2)

    assert statuses == [200] * 11 + [429]


def test_every_window_of_a_limit_counts_a_new_session(database_url: str) -> None:
    client = build_app(database_url, SESSION_RATE_LIMIT="1/second;2/hour").test_client()
    start = datetime.now(UTC)

    def at(seconds: int) -> int:
        with time_machine.travel(start + timedelta(seconds=seconds), tick=False):
            return generate(client)

    # One a second is allowed each time, but the hour's two are spent by the second request.
    assert [at(0), at(2), at(4)] == [200, 200, 429]


def test_a_new_session_refusal_says_when_its_own_window_frees_up(database_url: str) -> None:
    client = build_app(database_url, SESSION_RATE_LIMIT="2/minute").test_client()
    start = datetime.now(UTC)

    def at(seconds: int):
        with time_machine.travel(start + timedelta(seconds=seconds), tick=False):
            return client.post("/api/v1/generate-uuid", headers=JSON_HEADERS)

    at(0)
    at(1)
    refused = at(50)

    assert refused.status_code == 429
    # The first of the two frees up at second 60: ten seconds from now.
    assert refused.headers["Retry-After"] == "10"


def test_retry_after_is_the_time_left_in_the_window(database_url: str) -> None:
    client = build_app(database_url, EMAIL_RATE_LIMIT="1/minute").test_client()
    body = {"email": "someone@example.org"}
    headers = {**JSON_HEADERS, "X-Session-ID": str(uuid.uuid4())}

    client.post("/api/v1/email-verification/verify-email", json=body, headers=headers)
    refused = client.post("/api/v1/email-verification/verify-email", json=body, headers=headers)

    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60


def resume_counter(secret_key: str, session_uuid: str) -> str:
    """The part of a session's resume counter key that names it: a keyed hash of its UUID."""
    digest = hmac.new(secret_key.encode(), f"resume-limit:{session_uuid}".encode(), "sha256")
    return f"/session:{digest.hexdigest()[:32]}/"


def test_a_sessions_counter_is_named_by_a_keyed_hash_never_by_its_uuid(
    database_url: str, redis_url: str
) -> None:
    counters = redis.Redis.from_url(redis_url)
    session_uuid = str(uuid.uuid4())

    def counter_keys(secret_key: str) -> set[str]:
        app = build_app(database_url, SECRET_KEY=secret_key, RATELIMIT_STORAGE_URI=redis_url)
        assert validate(app.test_client(), session_uuid.upper()) == (200, "success")
        return {key.decode() for key in counters.scan_iter("*session:*")}

    first, second = "a" * 40, "b" * 40
    keys = counter_keys(first) | counter_keys(second)

    assert len([key for key in keys if resume_counter(first, session_uuid) in key]) == 1
    assert len([key for key in keys if resume_counter(second, session_uuid) in key]) == 1
    for key in keys:
        assert session_uuid not in key.lower()
        assert session_uuid.replace("-", "") not in key.lower()


@pytest.mark.parametrize(
    "body", ['{"uuid": "' + "x" * (65 * 1024) + '"}', "{not json"], ids=["oversized", "not-json"]
)
def test_a_body_the_limiter_cannot_read_keeps_the_counters_in_redis(
    database_url: str, redis_url: str, body: str
) -> None:
    counters = redis.Redis.from_url(redis_url)
    client = build_app(database_url, RATELIMIT_STORAGE_URI=redis_url).test_client()
    session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]

    refused = client.post("/api/v1/validate-uuid", data=body, headers=JSON_HEADERS)
    resumed = validate(client, session_uuid)

    assert refused.status_code in (400, 413)
    assert resumed == (200, "success")
    # Counted where every worker counts, not in this process's memory as a fallback.
    key = resume_counter(TEST_SECRET_KEY, session_uuid)
    assert [k for k in counters.scan_iter("*session:*") if key in k.decode()]
