"""Hostile text and bodies: refused with 400 invalid_request, never stored, never a 500."""

from __future__ import annotations

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import JSON_HEADERS, build_app, session_row

NESTED = "[" * 20_000 + "]" * 20_000  # 40 KB of arrays inside arrays


@pytest.fixture
def app(database_url: str) -> Flask:
    return build_app(database_url)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def refused(response, field: str | None = None) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == 400, response.get_data(as_text=True)
    body = response.get_json()
    assert body["status"] == "error"
    assert body.get("code", body["error"]) == "invalid_request"
    if field is not None:
        assert field in body["details"]


@pytest.mark.parametrize(
    "hostile",
    ["Ada\x00Lovelace", "Ada\x1bLovelace", "\x7f", "Ada\ud800", "\udfffAda", "Ada\u0085"],
    ids=["nul", "escape", "delete", "high-surrogate", "low-surrogate", "c1-control"],
)
def test_a_name_with_control_characters_or_lone_surrogates_is_refused(
    app: Flask, client: FlaskClient, hostile: str
) -> None:
    session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]

    response = client.post(
        "/api/v1/persist_session",
        json={"uuid": session_uuid, "consent_user_data": True, "name": hostile},
        headers=JSON_HEADERS,
    )

    refused(response, "name")
    row = session_row(app, session_uuid)
    assert row is not None
    assert row.name is None


def test_every_text_field_refuses_control_characters(client: FlaskClient) -> None:
    session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]
    email_headers = {**JSON_HEADERS, "X-Session-ID": session_uuid}
    calls = [
        ("POST", "/api/v1/validate-uuid", {"uuid": session_uuid + "\x00"}, JSON_HEADERS, "uuid"),
        (
            "PATCH",
            f"/api/v1/session/{session_uuid}",
            {"email": "a\x00@example.org"},
            JSON_HEADERS,
            "email",
        ),
        (
            "DELETE",
            "/api/v1/delete",
            {"filename": "cv\x00.pdf", "session_uuid": session_uuid},
            JSON_HEADERS,
            "filename",
        ),
        (
            "POST",
            "/api/v1/email-verification/verify-email",
            {"email": "a@example.org\ud800"},
            email_headers,
            "email",
        ),
        (
            "POST",
            "/api/v1/email-verification/verify-code",
            {"code": "12\x0034"},
            email_headers,
            "code",
        ),
    ]
    for method, path, body, headers, field in calls:
        refused(client.open(path, method=method, json=body, headers=headers), field)


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/validate-uuid",
        "/api/v1/persist_session",
        "/api/v1/email-verification/verify-email",
        "/api/v1/email-verification/verify-code",
        "/api/v1/delete",
    ],
)
def test_a_body_nested_too_deeply_is_a_400(client: FlaskClient, path: str) -> None:
    session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]
    method = "DELETE" if path.endswith("/delete") else "POST"

    response = client.open(
        path,
        method=method,
        data=NESTED,
        headers={**JSON_HEADERS, "X-Session-ID": session_uuid},
    )

    refused(response)


def test_a_huge_number_is_a_400(client: FlaskClient) -> None:
    response = client.post(
        "/api/v1/persist_session", data='{"uuid": ' + "9" * 5000 + "}", headers=JSON_HEADERS
    )

    refused(response)
