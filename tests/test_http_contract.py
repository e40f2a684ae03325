"""Cross-cutting HTTP rules: JSON errors, headers, rate limits, client IP, CORS, OpenAPI, probes."""

from __future__ import annotations

import io
import json
import logging
import uuid
from typing import Any

import pytest
import requests
from flask import Flask, session
from flask.testing import FlaskClient
from openapi_spec_validator import validate as validate_openapi

from app import create_app
from tests.conftest import GENERAL_ERROR, JSON_HEADERS, audit_rows, base_env, build_app
from tests.servers import app_process, free_port

ALLOWED_ORIGIN = "http://localhost:3000"


def test_every_response_carries_the_contract_headers(client: FlaskClient) -> None:
    response = client.post("/api/v1/generate-uuid", headers=JSON_HEADERS)

    assert response.headers["X-API-Version"] == "v1"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert uuid.UUID(response.headers["X-Correlation-ID"])
    assert "Strict-Transport-Security" not in response.headers


def test_the_api_keeps_no_cookie_session(app: Flask) -> None:
    with (
        app.test_request_context("/api/v1/generate-uuid", method="POST"),
        pytest.raises(RuntimeError, match="session is unavailable"),
    ):
        session["chat"] = "state"


def test_hsts_is_sent_on_secure_requests(client: FlaskClient) -> None:
    response = client.get("/health", base_url="https://api.example.org")

    assert response.headers["Strict-Transport-Security"].startswith("max-age=")


def test_hsts_behind_a_trusted_tls_proxy_only(database_url: str) -> None:
    proxied = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"}
    trusted = build_app(database_url, TRUSTED_PROXY_COUNT="1").test_client()
    untrusted = build_app(database_url).test_client()

    assert "Strict-Transport-Security" in trusted.get("/health", headers=proxied).headers
    assert "Strict-Transport-Security" not in untrusted.get("/health", headers=proxied).headers


def test_a_caller_correlation_id_is_echoed_only_if_it_is_a_uuid(client: FlaskClient) -> None:
    mine = str(uuid.uuid4())
    echoed = client.get("/health", headers={"X-Correlation-ID": mine})
    replaced = client.get("/health", headers={"X-Correlation-ID": "<script>"})

    assert echoed.headers["X-Correlation-ID"] == mine
    assert replaced.headers["X-Correlation-ID"] != "<script>"
    assert uuid.UUID(replaced.headers["X-Correlation-ID"])


@pytest.mark.parametrize(
    ("method", "path", "status", "error"),
    [
        ("GET", "/api/v1/nowhere", 404, "not_found"),
        ("GET", "/api/v1/session/not-a-uuid", 404, "not_found"),
        ("GET", "/api/v1/generate-uuid", 405, "method_not_allowed"),
        ("DELETE", "/api/v1/validate-uuid", 405, "method_not_allowed"),
    ],
)
def test_routing_errors_answer_json(
    client: FlaskClient, method: str, path: str, status: int, error: str
) -> None:
    response = client.open(path, method=method, headers=JSON_HEADERS)

    assert response.status_code == status
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert (body["status"], body["error"]) == ("error", error)
    assert body["message"]
    assert body["correlation_id"] == response.headers["X-Correlation-ID"]
    if status == 405:
        assert "POST" in response.headers["Allow"]


def test_an_oversized_body_answers_413_json(client: FlaskClient) -> None:
    body = json.dumps({"uuid": "x" * (65 * 1024)})

    response = client.post("/api/v1/validate-uuid", data=body, headers=JSON_HEADERS)

    assert response.status_code == 413
    assert response.get_json()["error"] == "payload_too_large"


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        ("{not json", "application/json"),
        ('["a list"]', "application/json"),
        ('"a string"', "application/json"),
        ("uuid=abc", "application/x-www-form-urlencoded"),
        ('{"uuid": 42}', "application/json"),
        ('{"uuid": null}', "application/json"),
        ('{"uuid": "' + "a" * 65 + '"}', "application/json"),
        ('{"uuid": "x", "extra": true}', "application/json"),
    ],
)
def test_malformed_validate_requests_answer_400_with_details(
    app: Flask, client: FlaskClient, data: str, content_type: str
) -> None:
    response = client.post(
        "/api/v1/validate-uuid", data=data, headers={"Content-Type": content_type}
    )

    assert response.status_code == 400
    body = response.get_json()
    assert (body["status"], body["error"]) == ("error", "invalid_request")
    assert body["details"]
    assert body["message"]
    assert audit_rows(app) == []


def test_unexpected_errors_answer_general_error_without_internals(
    app: Flask, client: FlaskClient
) -> None:
    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("secret internals")

    response = client.get("/boom")

    assert response.status_code == 500
    body = response.get_json()
    assert body["error"] == "internal_error"
    assert "secret internals" not in response.get_data(as_text=True)


def test_a_correlation_id_naming_the_session_is_not_taken(client: FlaskClient) -> None:
    session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]

    answer = client.get(
        f"/api/v1/session/{session_uuid}", headers={"X-Correlation-ID": session_uuid.upper()}
    )

    assert answer.status_code == 200
    assert answer.headers["X-Correlation-ID"] != session_uuid


@pytest.mark.parametrize(
    ("method", "path", "names_it"),
    [
        ("POST", "/api/v1/validate-uuid", lambda u: {"json": {"uuid": u}}),
        (
            "POST",
            "/api/v1/persist_session",
            lambda u: {"json": {"session_uuid": u, "consent_user_data": True}},
        ),
        ("DELETE", "/api/v1/delete", lambda u: {"json": {"session_uuid": u, "filename": "a.pdf"}}),
        (
            "POST",
            "/api/v1/upload",
            lambda u: {
                "data": {"session_uuid": u, "file": (io.BytesIO(b"%PDF-1.4\n"), "a.pdf")},
                "content_type": "multipart/form-data",
            },
        ),
        (
            "POST",
            "/api/v1/email-verification/resend-code",
            lambda u: {"json": {}, "headers": {"X-Session-ID": u}},
        ),
    ],
)
def test_a_correlation_id_equal_to_a_uuid_the_request_names_anywhere_is_not_taken(
    app: Flask, client: FlaskClient, method: str, path: str, names_it: Any
) -> None:
    session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]
    request = names_it(session_uuid)
    # Another spelling of the same UUID: without hyphens.
    request["headers"] = {
        **request.get("headers", {}),
        "X-Correlation-ID": session_uuid.replace("-", ""),
    }

    answer = client.open(path, method=method, **request)

    assert answer.headers["X-Correlation-ID"] != session_uuid
    assert session_uuid not in {row.correlation_id for row in audit_rows(app)}


# rate limits


def _burst(client: FlaskClient, count: int, **headers: str) -> list[int]:
    return [
        client.post("/api/v1/generate-uuid", headers={**JSON_HEADERS, **headers}).status_code
        for _ in range(count)
    ]


def test_the_eleventh_request_in_a_minute_is_refused_with_json(database_url: str) -> None:
    client = build_app(database_url, SESSION_RATE_LIMIT="10/minute").test_client()

    statuses = _burst(client, 11)

    assert statuses == [200] * 10 + [429]
    refused = client.post("/api/v1/generate-uuid", headers=JSON_HEADERS)
    assert refused.status_code == 429
    body = refused.get_json()
    assert (body["status"], body["error"]) == ("error", "rate_limited")
    assert 0 < int(refused.headers["Retry-After"]) <= 60


def test_uploads_and_email_sends_have_their_own_budgets(database_url: str) -> None:
    app = build_app(database_url, UPLOAD_RATE_LIMIT="2/minute", EMAIL_RATE_LIMIT="1/minute")
    client = app.test_client()
    session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]

    uploads = [
        client.post(
            "/api/v1/upload",
            data={"session_uuid": session_uuid, "file": (io.BytesIO(b"%PDF-1.7 x"), f"{n}.pdf")},
            content_type="multipart/form-data",
        ).status_code
        for n in range(3)
    ]
    sends = [
        client.post(
            "/api/v1/email-verification/verify-email",
            json={"email": "a@example.org"},
            headers={**JSON_HEADERS, "X-Session-ID": session_uuid},
        ).status_code
        for _ in range(2)
    ]

    assert uploads == [200, 200, 429]
    assert sends == [200, 429]
    assert client.post("/api/v1/generate-uuid").status_code == 200


def test_preflights_are_never_rate_limited(database_url: str) -> None:
    client = build_app(
        database_url, SESSION_RATE_LIMIT="2/minute", SESSION_RESOURCE_RATE_LIMIT="2/minute"
    ).test_client()
    preflight = {
        "Origin": ALLOWED_ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    limited_route = "/api/v1/persist_session"

    statuses = [
        client.options(path, headers=preflight).status_code
        for path in ("/api/v1/generate-uuid", limited_route)
        for _ in range(5)
    ]

    assert statuses == [200] * 10
    assert _burst(client, 2) == [200, 200]
    body = {"uuid": str(uuid.uuid4()), "consent_user_data": False}
    assert [client.post(limited_route, json=body).status_code for _ in range(3)] == [404, 404, 429]


def test_a_spoofed_forwarded_for_is_ignored_without_a_trusted_proxy(database_url: str) -> None:
    app = build_app(database_url, SESSION_RATE_LIMIT="3/minute")
    client = app.test_client()

    statuses = [
        client.post(
            "/api/v1/generate-uuid", headers={**JSON_HEADERS, "X-Forwarded-For": f"198.51.100.{n}"}
        ).status_code
        for n in range(4)
    ]

    assert statuses == [200, 200, 200, 429]
    assert {event.client_ip for event in audit_rows(app)} == {"127.0.0.0"}


def test_a_trusted_proxy_supplies_the_client_ip(database_url: str) -> None:
    app = build_app(database_url, SESSION_RATE_LIMIT="3/minute", TRUSTED_PROXY_COUNT="1")
    client = app.test_client()

    first = _burst(client, 4, **{"X-Forwarded-For": "203.0.113.7"})
    second = _burst(client, 1, **{"X-Forwarded-For": "198.51.100.9"})

    assert first == [200, 200, 200, 429]
    assert second == [200]
    assert {event.client_ip for event in audit_rows(app)} == {"203.0.113.0", "198.51.100.0"}


def test_two_instances_sharing_redis_share_the_count(database_url: str, redis_url: str) -> None:
    shared = {"SESSION_RATE_LIMIT": "10/minute", "RATELIMIT_STORAGE_URI": redis_url}
    in_process = build_app(database_url, **shared).test_client()
    env = base_env(database_url, **shared)

    with app_process(env) as served:
        other_instance = served.url
        here = _burst(in_process, 5)
        there = [
            requests.post(f"{other_instance}/api/v1/generate-uuid", timeout=10).status_code
            for _ in range(5)
        ]
        eleventh = requests.post(f"{other_instance}/api/v1/generate-uuid", timeout=10)

    assert here + there == [200] * 10
    assert eleventh.status_code == 429
    assert eleventh.json()["error"] == "rate_limited"


# CORS


def test_an_allowed_origin_gets_cors_headers(client: FlaskClient) -> None:
    response = client.post(
        "/api/v1/generate-uuid", headers={**JSON_HEADERS, "Origin": ALLOWED_ORIGIN}
    )

    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    exposed = {
        h.strip().lower() for h in response.headers["Access-Control-Expose-Headers"].split(",")
    }
    assert {"x-correlation-id", "x-api-version", "retry-after"} <= exposed


def test_a_disallowed_origin_gets_no_cors_headers(client: FlaskClient) -> None:
    response = client.post(
        "/api/v1/generate-uuid", headers={**JSON_HEADERS, "Origin": "https://evil.example"}
    )

    assert "Access-Control-Allow-Origin" not in response.headers


def test_a_preflight_for_x_session_id_is_allowed(client: FlaskClient) -> None:
    response = client.options(
        "/api/v1/email-verification/verify-email",
        headers={
            "Origin": ALLOWED_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-session-id",
        },
    )
    on_known_route = client.options(
        "/api/v1/persist_session",
        headers={
            "Origin": ALLOWED_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-session-id, accept",
        },
    )

    for preflight in (response, on_known_route):
        assert preflight.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
        allowed = {
            h.strip().lower() for h in preflight.headers["Access-Control-Allow-Headers"].split(",")
        }
        assert {"content-type", "x-session-id"} <= allowed
    assert on_known_route.status_code == 200


# documentation and probes


def test_the_openapi_document_is_valid_and_lists_the_endpoints(client: FlaskClient) -> None:
    response = client.get("/api/v1/openapi.json")

    assert response.status_code == 200
    document = response.get_json()
    validate_openapi(document)
    assert {
        "/api/v1/generate-uuid",
        "/api/v1/validate-uuid",
        "/api/v1/persist_session",
        "/api/v1/session/{session_uuid}",
        "/api/v1/upload",
        "/api/v1/delete",
        "/api/v1/session/{session_uuid}/files",
        "/api/v1/email-verification/verify-email",
        "/api/v1/email-verification/verify-code",
        "/api/v1/email-verification/resend-code",
        "/health",
        "/ready",
    } <= set(document["paths"])
    error_schema = document["components"]["schemas"]["Error"]
    assert {"status", "error", "message", "correlation_id"} <= set(error_schema["required"])


def test_health_and_readiness(client: FlaskClient) -> None:
    assert client.get("/health").get_json()["status"] == "success"
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.get_json()["checks"] == {"database": "ok", "storage": "ok"}
    assert ready.get_json()["last_orphan_sweep_at"] is None


def test_an_unreachable_database_answers_503_json_and_fails_readiness() -> None:
    unreachable = f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/nothing"
    app = create_app(base_env(unreachable, DATABASE_CONNECT_TIMEOUT_SECONDS="1"))
    client = app.test_client()

    ready = client.get("/ready")
    issued = client.post("/api/v1/generate-uuid", headers=JSON_HEADERS)

    assert ready.status_code == 503
    assert ready.get_json()["checks"]["database"] == "unavailable"
    assert issued.status_code == 503
    body = issued.get_json()
    assert (body["error"], body["message"]) == ("database_unavailable", GENERAL_ERROR)
    # An unread, oversized body must not turn the outage answer into an HTML page.
    oversized = client.post(
        "/api/v1/generate-uuid", data="{" + " " * (70 * 1024) + "}", headers=JSON_HEADERS
    )
    assert oversized.status_code == 503
    assert oversized.get_json()["error"] == "database_unavailable"


def test_the_access_log_has_one_line_per_request_without_session_uuids(
    client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    issued = client.post("/api/v1/generate-uuid", headers=JSON_HEADERS).get_json()["uuid"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="app.access"):
        response = client.get(f"/api/v1/session/{issued}")

    [line] = [record for record in caplog.records if record.name == "app.access"]
    assert line.__dict__["route"] == "/api/v1/session/<uuid:session_uuid>"
    assert line.__dict__["status"] == 200
    assert line.__dict__["correlation_id"] == response.headers["X-Correlation-ID"]
    assert line.__dict__["method"] == "GET"
    assert line.__dict__["duration_ms"] >= 0
    for record in caplog.records:
        assert issued not in record.getMessage()
        assert issued not in str(record.__dict__)
