"""Property-based fuzzing of every documented operation against the app's own OpenAPI document.

Both valid (positive) and invalid (negative) data are generated, and then hostile data no
schema describes: control characters, lone surrogates, very long tokens and deeply nested
bodies, in every field, path parameter and body of every operation. A fixed seed (derandomize)
and a bounded number of examples per operation keep the run repeatable and short. Every
response must be non-5xx, have a documented status code and content type, and match the
documented schema.
"""

from __future__ import annotations

import io
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
PDF = b"%PDF-1.4\n%%EOF\n"


def _operations(app: Flask) -> list[tuple[str, str, list[str], list[str], bool]]:
    """Each operation: method, path template, path parameters, body fields, multipart or not."""
    document = app.test_client().get("/api/v1/openapi.json").get_json()
    schemas = document["components"]["schemas"]
    found = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if method == "parameters":
                continue
            parameters = operations.get("parameters", []) + operation.get("parameters", [])
            content = operation.get("requestBody", {}).get("content", {})
            multipart = "multipart/form-data" in content
            body = content.get("application/json", content.get("multipart/form-data", {}))
            reference = body.get("schema", {}).get("$ref", "")
            fields = list(schemas.get(reference.rpartition("/")[2], {}).get("properties", {}))
            names = [p["name"] for p in parameters]
            found.append((method.upper(), path, names, fields, multipart))
    return found


def _targets(app: Flask) -> list[tuple[tuple[str, str, list[str], list[str], bool], str, str]]:
    """Every place hostile input can go: each body field, path parameter, the session header,
    and (for a JSON body) the body as a whole."""
    targets = []
    for operation in _operations(app):
        _, _, parameters, fields, multipart = operation
        targets += [(operation, "field", name) for name in fields]
        targets += [(operation, "path", name) for name in parameters]
        targets.append((operation, "header", "X-Session-ID"))
        if fields and not multipart:
            targets.append((operation, "body", ""))
    return targets


def test_every_operation_refuses_hostile_text_and_bodies_without_a_5xx(
    database_url: str,
) -> None:
    # On both databases: PostgreSQL refuses a NUL that SQLite would store.
    app = build_app(database_url)
    client = app.test_client()
    live = client.post("/api/v1/generate-uuid").get_json()["uuid"]
    valid = {
        "uuid": live,
        "session_uuid": live,
        "consent_user_data": True,
        "name": "Ada",
        "email": "ada@example.org",
        "code": "123456",
        "filename": "cv.pdf",
        "token": "x",
    }
    targets = _targets(app)
    assert len({target[0][:2] for target in targets}) >= 17

    @given(target=st.sampled_from(targets), text=HOSTILE_TEXT, nested=NESTED)
    @settings(
        max_examples=400,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def exercise(
        target: tuple[tuple[str, str, list[str], list[str], bool], str, str],
        text: str,
        nested: str,
    ) -> None:
        (method, path, parameters, fields, multipart), where, name = target
        headers = {"Accept": "application/json; version=v1", "X-Session-ID": live}
        for parameter in parameters:
            value = valid.get(parameter, live)
            if where == "path" and parameter == name:
                # A path cannot carry a lone surrogate; the rest travels percent-encoded.
                value = _encodable(text)
            path = path.replace("{" + parameter + "}", quote(value, safe=""))
        if where == "header":
            # Header values travel as Latin-1 on one line.
            headers[name] = (
                text.encode("latin-1", "ignore")
                .decode("latin-1")
                .replace("\r", "")
                .replace("\n", "")
            )
        body = {field: valid.get(field) for field in fields}
        if where == "field":
            body[name] = text
        if where == "body":
            response = client.open(
                path,
                method=method,
                data=nested,
                headers={**headers, "Content-Type": "application/json"},
            )
        elif multipart:
            # A multipart body is bytes on the wire: it cannot carry a lone surrogate either.
            form = {
                key: _encodable(value) if isinstance(value, str) else value
                for key, value in body.items()
                if key != "file"
            }
            filename = _encodable(text) if where == "field" and name == "file" else "cv.pdf"
            form["file"] = (io.BytesIO(PDF), filename)
            response = client.open(
                path, method=method, data=form, headers=headers, content_type="multipart/form-data"
            )
        elif fields:
            response = client.open(path, method=method, json=body, headers=headers)
        else:
            response = client.open(path, method=method, headers=headers)
        assert response.status_code < 500, (method, path, where, name, response.get_data()[:300])
        if response.status_code >= 400:
            answer = response.get_json()
            assert answer["status"] == "error", answer
            assert answer["message"], answer

    exercise()


def _encodable(text: str) -> str:
    """``text`` without what UTF-8 cannot carry (lone surrogates), never empty."""
    return text.encode("utf-8", "ignore").decode("utf-8") or "x"
