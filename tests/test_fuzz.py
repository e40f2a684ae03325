"""Property-based fuzzing of every documented operation against the app's own OpenAPI document.

Both valid (positive) and invalid (negative) data are generated, and then hostile data no
schema describes: control characters, lone surrogates, very long tokens and deeply nested
bodies, in every field, path parameter and body of every operation. A fixed seed (derandomize)
and a bounded number of examples per operation keep the run repeatable and short. Every
response must be non-5xx, have a documented status code and content type, and match the
documented schema.
"""

from __future__ import annotations

import itertools
from urllib.parse import quote

import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import build_app

EXAMPLES_PER_OPERATION = 40
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_every_operation_keeps_its_documented_promises(sqlite_url: str) -> None:
    app = build_app(sqlite_url)
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    failures: list[str] = []

    for operation, mode in itertools.product(operations, GenerationMode):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def exercise(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=CHECKS)

        try:
            exercise()
        except Unsatisfiable:
            # No input of this operation can be invalid (no body, any string is a valid token).
            assert mode is GenerationMode.NEGATIVE, operation.label
        except Exception as exc:
            failures.append(f"{operation.label} ({mode.value} data): {exc}")

    assert not failures, "\n\n".join(failures)


# Text no person types: control characters, lone surrogates, very long tokens.
HOSTILE_TEXT = st.one_of(
    st.text(st.characters(categories=["Cc"]), min_size=1, max_size=8),
    st.builds(
        "{}{}{}".format,
        st.text(max_size=8),
        st.sampled_from(["\x00", "\ud800", "\udfff", "\x1b[31m", "\u0085"]),
        st.text(max_size=8),
    ),
    st.integers(1_000, 70_000).map(lambda size: "A" * size),
)
NESTED = st.integers(200, 30_000).map(lambda depth: "[" * depth + "]" * depth)
# What every operation is sent: its JSON body's fields, its path parameters, X-Session-ID.
SESSION = "1b4e28ba-2fa1-41d2-883f-0016d3cca427"


def _operations(app: Flask) -> list[tuple[str, str, list[str], list[str]]]:
    """Each documented operation: method, path template, path parameters, JSON body fields."""
    document = app.test_client().get("/api/v1/openapi.json").get_json()
    schemas = document["components"]["schemas"]
    found = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if method == "parameters":
                continue
            parameters = operations.get("parameters", []) + operation.get("parameters", [])
            content = operation.get("requestBody", {}).get("content", {})
            body = content.get("application/json", content.get("multipart/form-data", {}))
            reference = body.get("schema", {}).get("$ref", "")
            fields = list(schemas.get(reference.rpartition("/")[2], {}).get("properties", {}))
            found.append((method.upper(), path, [p["name"] for p in parameters], fields))
    return found


def test_every_operation_refuses_hostile_text_and_bodies_without_a_5xx(
    database_url: str,
) -> None:
    # On both databases: PostgreSQL refuses a NUL that SQLite would store.
    app = build_app(database_url)
    client = app.test_client()
    operations = _operations(app)
    assert len(operations) >= 17

    @given(
        operation=st.sampled_from(operations),
        text=HOSTILE_TEXT,
        nested=NESTED,
        whole_body=st.booleans(),
    )
    @settings(
        max_examples=300,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def exercise(
        operation: tuple[str, str, list[str], list[str]], text: str, nested: str, whole_body: bool
    ) -> None:
        method, path, parameters, fields = operation
        for name in parameters:
            # A path cannot carry a lone surrogate; the rest of the text travels percent-encoded.
            safe = text.encode("utf-8", "ignore").decode("utf-8") or "x"
            path = path.replace("{" + name + "}", quote(safe, safe=""))
        headers = {"Accept": "application/json; version=v1", "X-Session-ID": SESSION}
        if whole_body or not fields:
            response = client.open(
                path,
                method=method,
                data=nested,
                headers={**headers, "Content-Type": "application/json"},
            )
        else:
            response = client.open(
                path, method=method, json=dict.fromkeys(fields, text), headers=headers
            )
        assert response.status_code < 500, (method, path, response.get_data(as_text=True)[:300])
        if response.status_code >= 400:
            body = response.get_json()
            assert body["status"] == "error", body
            assert body["message"], body

    exercise()
