"""Upload, delete and list, on both databases and both storage backends."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import io
import threading
import uuid
from datetime import UTC, datetime
from urllib.parse import urlsplit

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from app.services.files import safe_filename
from app.storage import current_storage, session_objects
from tests.conftest import (
    JSON_HEADERS,
    TEST_SECRET_KEY,
    audit_rows,
    base_env,
    build_app,
    new_session,
    unreachable_s3_env,
)
from tests.servers import app_process

PDF = b"%PDF-1.7\n" + b"0" * 2048 + b"\n%%EOF\n"


def upload(client: FlaskClient, session_uuid: str, name: str = "cv.pdf", data: bytes = PDF):
    return client.post(
        "/api/v1/upload",
        data={"session_uuid": session_uuid, "file": (io.BytesIO(data), name)},
        content_type="multipart/form-data",
    )


def keyed_ref(name: str, secret_key: str = TEST_SECRET_KEY) -> str:
    """The audit trail's reference to a file name: an HMAC keyed with SECRET_KEY, cut short."""
    digest = hmac.new(secret_key.encode(), f"file-name:{name}".encode(), hashlib.sha256)
    return digest.hexdigest()[:16]


def stored_names(app: Flask, session_uuid: str) -> list[str]:
    with app.app_context():
        return [o.key.rpartition("/")[2] for o in session_objects(current_storage(), session_uuid)]


def download(client: FlaskClient, url: str) -> bytes:
    """Follow a download link: the app streams the file, whatever the backend."""
    response = client.get(urlsplit(url).path)
    assert response.status_code == 200
    return response.data


def test_the_longest_name_kept_still_gets_a_working_link(
    files_app: Flask, files_client: FlaskClient
) -> None:
    session_uuid = new_session(files_client)
    longest = "n" * 196 + ".pdf"

    response = upload(files_client, session_uuid, "n" * 300 + ".pdf")

    assert response.status_code == 200
    assert response.get_json()["filename"] == longest
    assert stored_names(files_app, session_uuid) == [longest]
    assert download(files_client, response.get_json()["url"]) == PDF
    [listed] = files_client.get(f"/api/v1/session/{session_uuid}/files").get_json()["files"]
    assert download(files_client, listed["url"]) == PDF


def test_upload_stores_a_pdf_with_a_working_time_limited_link(
    files_app: Flask, files_client: FlaskClient
) -> None:
    session_uuid = new_session(files_client)

    response = upload(files_client, session_uuid, "My CV (final).pdf")

    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "success"
    assert (body["filename"], body["size"], body["content_type"]) == (
        "My_CV_final.pdf",
        len(PDF),
        "application/pdf",
    )
    # An absolute link: the frontend opens it as it is, from another origin.
    assert body["url"].startswith("http://localhost/api/v1/files/")
    assert download(files_client, body["url"]) == PDF
    assert stored_names(files_app, session_uuid) == ["My_CV_final.pdf"]
    [event] = audit_rows(files_app, "file_uploaded")
    assert event.details == {
        "file_ref": keyed_ref("My_CV_final.pdf"),
        "size": len(PDF),
        "replaced": False,
    }
    assert "CV" not in str(event.details)


def test_upload_to_an_unknown_session_is_refused(
    files_app: Flask, files_client: FlaskClient
) -> None:
    for session_uuid in (str(uuid.uuid4()), "not-a-uuid"):
        response = upload(files_client, session_uuid)

        assert response.status_code == 404
        body = response.get_json()
        assert body["error"] == "session_not_found"
        assert "invalid session" in body["message"]
    reasons = [event.details["reason"] for event in audit_rows(files_app, "file_upload_rejected")]
    assert reasons == ["session_not_found", "session_not_found"]


@pytest.mark.parametrize(
    ("name", "data"),
    [("notes.txt", PDF), ("fake.pdf", b"PK\x03\x04 a zip"), ("empty.pdf", b"")],
)
def test_anything_but_a_pdf_is_unsupported(
    files_app: Flask, files_client: FlaskClient, name: str, data: bytes
) -> None:
    session_uuid = new_session(files_client)

    response = upload(files_client, session_uuid, name, data)

    assert response.status_code == 415
    assert response.get_json()["error"] == "unsupported_file_type"
    assert stored_names(files_app, session_uuid) == []
    [event] = audit_rows(files_app, "file_upload_rejected")
    assert event.details == {"reason": "unsupported_file_type"}


def test_a_file_over_the_limit_is_refused(database_url: str, storage_env: dict[str, str]) -> None:
    app = build_app(database_url, MAX_UPLOAD_MB="1", **storage_env)
    client = app.test_client()
    session_uuid = new_session(client)

    just_over = upload(client, session_uuid, data=PDF + b"0" * (1024 * 1024))
    far_over = upload(client, session_uuid, data=PDF + b"0" * (3 * 1024 * 1024))

    for response in (just_over, far_over):
        assert response.status_code == 413
        assert response.get_json()["error"] == "file_too_large"
    assert stored_names(app, session_uuid) == []
    rejections = audit_rows(app, "file_upload_rejected")
    assert [event.details["reason"] for event in rejections] == ["file_too_large"] * 2
    # The far-over body was refused unread, so its session is not known.
    assert [event.session_uuid for event in rejections] == [uuid.UUID(session_uuid), None]


def test_a_fourth_file_is_refused_but_a_same_name_upload_replaces(
    files_app: Flask, files_client: FlaskClient
) -> None:
    session_uuid = new_session(files_client)
    for name in ("a.pdf", "b.pdf", "c.pdf"):
        assert upload(files_client, session_uuid, name).status_code == 200

    fourth = upload(files_client, session_uuid, "d.pdf")
    replaced = upload(files_client, session_uuid, "b.pdf", PDF + b"v2")

    assert fourth.status_code == 409
    assert fourth.get_json()["error"] == "file_limit_reached"
    assert replaced.status_code == 200
    assert replaced.get_json()["size"] == len(PDF) + 2
    assert stored_names(files_app, session_uuid) == ["a.pdf", "b.pdf", "c.pdf"]
    assert audit_rows(files_app, "file_uploaded")[-1].details["replaced"] is True
    [refusal] = audit_rows(files_app, "file_upload_rejected")
    assert refusal.details == {"reason": "file_limit_reached"}


@pytest.mark.parametrize("name", ["...", "日本語.pdf", "/"])
def test_an_unusable_name_is_refused(
    files_app: Flask, files_client: FlaskClient, name: str
) -> None:
    response = upload(files_client, new_session(files_client), name)

    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_filename"
    [event] = audit_rows(files_app, "file_upload_rejected")
    assert event.details == {"reason": "invalid_filename"}


def test_names_are_sanitised() -> None:
    assert safe_filename("../../etc/passwd.pdf") == "passwd.pdf"
    assert safe_filename("C:\\Users\\me\\cv.pdf") == "cv.pdf"
    assert [safe_filename(name) for name in ("cv", "cv.", "cv.x", "cv.pdf")] == [
        "cv",
        "cv",
        "cv.x",
        "cv.pdf",
    ]
    assert safe_filename("a" * 300 + ".pdf") == "a" * 196 + ".pdf"
    assert safe_filename("...") is None


@pytest.mark.parametrize(
    "fields",
    [
        ("session_uuid",),
        ("file",),
        ("session_uuid", "file_as_text"),
        ("session_uuid", "file", "extra"),
    ],
)
def test_malformed_uploads_answer_400(files_client: FlaskClient, fields: tuple[str, ...]) -> None:
    parts: dict[str, dict[str, object]] = {
        "session_uuid": {"session_uuid": "x"},
        "file": {"file": (io.BytesIO(PDF), "cv.pdf")},
        "file_as_text": {"file": "not a file part"},
        "extra": {"extra": "1"},
    }
    form = {key: value for field in fields for key, value in parts[field].items()}
    response = files_client.post("/api/v1/upload", data=form, content_type="multipart/form-data")

    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_request"


def test_unreachable_storage_answers_503_and_writes_nothing(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = build_app(
        database_url,
        **unreachable_s3_env(),
    )
    client = app.test_client()
    session_uuid = new_session(client)

    response = upload(client, session_uuid)

    assert response.status_code == 503
    assert response.get_json()["error"] == "storage_unavailable"
    assert response.headers["Retry-After"]
    assert audit_rows(app, "file_uploaded") == []
    [event] = audit_rows(app, "file_upload_rejected")
    assert event.details == {"reason": "storage_unavailable"}
    ready = client.get("/ready")
    assert ready.status_code == 503
    assert ready.get_json()["checks"]["storage"] == "unavailable"
    for path in (f"/api/v1/session/{session_uuid}/files", f"/api/v1/session/{session_uuid}"):
        listing = client.get(path)
        assert listing.status_code == 503
        assert listing.get_json()["error"] == "storage_unavailable"
    # File names are personal data: the failure is logged without the key.
    assert caplog.records
    assert not any("cv.pdf" in f"{r.getMessage()} {r.exc_text}" for r in caplog.records)


def test_delete_removes_the_file_once(files_app: Flask, files_client: FlaskClient) -> None:
    session_uuid = new_session(files_client)
    upload(files_client, session_uuid, "a.pdf")
    upload(files_client, session_uuid, "b.pdf")
    body = {"filename": "a.pdf", "session_uuid": session_uuid}

    first = files_client.delete("/api/v1/delete", json=body, headers=JSON_HEADERS)
    second = files_client.delete("/api/v1/delete", json=body, headers=JSON_HEADERS)

    assert first.status_code == 200
    assert first.get_json()["status"] == "success"
    assert second.status_code == 404
    assert second.get_json()["error"] == "file_not_found"
    assert stored_names(files_app, session_uuid) == ["b.pdf"]
    [event] = audit_rows(files_app, "file_deleted")
    assert event.details == {"file_ref": keyed_ref("a.pdf")}


def test_delete_in_an_unknown_session_is_not_found(files_client: FlaskClient) -> None:
    response = files_client.delete(
        "/api/v1/delete",
        json={"filename": "a.pdf", "session_uuid": str(uuid.uuid4())},
        headers=JSON_HEADERS,
    )

    assert response.status_code == 404
    assert response.get_json()["error"] == "session_not_found"


def test_listing_shows_each_file_with_a_link(files_client: FlaskClient) -> None:
    session_uuid = new_session(files_client)
    started = datetime.now(UTC).replace(microsecond=0)
    upload(files_client, session_uuid, "b.pdf")
    upload(files_client, session_uuid, "a.pdf", PDF + b"longer")

    response = files_client.get(f"/api/v1/session/{session_uuid}/files")
    overview = files_client.get(f"/api/v1/session/{session_uuid}")

    assert response.status_code == 200
    listed = response.get_json()["files"]
    assert [(f["filename"], f["size"]) for f in listed] == [
        ("a.pdf", len(PDF) + 6),
        ("b.pdf", len(PDF)),
    ]
    assert download(files_client, listed[1]["url"]) == PDF
    for listed_file in listed:
        uploaded_at = datetime.fromisoformat(listed_file["uploaded_at"])
        assert started <= uploaded_at <= datetime.now(UTC)
    assert overview.get_json()["file_count"] == 2
    unknown = files_client.get(f"/api/v1/session/{uuid.uuid4()}/files")
    assert unknown.status_code == 404


def test_a_link_names_neither_the_session_nor_the_key(
    files_app: Flask, files_client: FlaskClient
) -> None:
    session_uuid = new_session(files_client)
    url = upload(files_client, session_uuid).get_json()["url"]
    listed = files_client.get(f"/api/v1/session/{session_uuid}/files").get_json()["files"]

    for link in (url, listed[0]["url"]):
        parts = urlsplit(link)
        assert parts.path.startswith("/api/v1/files/")
        assert not parts.query
        visible = link.lower() + _decodable(parts.path.rpartition("/")[2])
        assert session_uuid.replace("-", "") not in visible.replace("-", "")
        assert "uploads" not in visible
        assert "cv.pdf" not in visible
        assert download(files_client, link) == PDF


def _decodable(token: str) -> str:
    """Whatever the token's bytes say when decoded as base64, the way a curious holder would."""
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    return raw.decode("latin-1").lower() + raw.hex()


def test_following_a_link_shows_neither_the_session_nor_the_key(
    files_client: FlaskClient,
) -> None:
    session_uuid = new_session(files_client)
    url = upload(files_client, session_uuid).get_json()["url"]

    followed = files_client.get(urlsplit(url).path)

    assert followed.status_code == 200
    assert followed.data == PDF
    assert "Location" not in followed.headers
    headers = " ".join(f"{name}: {value}" for name, value in followed.headers).lower()
    assert session_uuid not in headers
    assert "uploads/" not in headers
    assert "filename=cv.pdf" in followed.headers["Content-Disposition"]


def test_a_link_dies_with_its_file_its_version_or_its_session(
    files_app: Flask, files_client: FlaskClient
) -> None:
    session_uuid = new_session(files_client)
    deleted = upload(files_client, session_uuid, "a.pdf").get_json()["url"]
    replaced = upload(files_client, session_uuid, "b.pdf").get_json()["url"]
    erased = upload(files_client, session_uuid, "c.pdf").get_json()["url"]

    files_client.delete(
        "/api/v1/delete",
        json={"filename": "a.pdf", "session_uuid": session_uuid},
        headers=JSON_HEADERS,
    )
    replacement = upload(files_client, session_uuid, "b.pdf", PDF + b"v2").get_json()["url"]

    assert files_client.get(urlsplit(deleted).path).status_code == 404
    assert files_client.get(urlsplit(replaced).path).status_code == 404
    assert download(files_client, replacement) == PDF + b"v2"
    assert download(files_client, erased) == PDF
    assert files_client.delete(f"/api/v1/session/{session_uuid}").status_code == 200
    gone = files_client.get(urlsplit(erased).path)
    assert (gone.status_code, gone.get_json()["error"]) == (404, "file_not_found")


def test_a_forged_or_expired_link_is_refused(
    database_url: str, storage_env: dict[str, str]
) -> None:
    app = build_app(database_url, DOWNLOAD_URL_EXPIRES_SECONDS="1", **storage_env)
    client = app.test_client()
    session_uuid = new_session(client)
    url = upload(client, session_uuid).get_json()["url"]
    path = urlsplit(url).path
    assert client.get(path).status_code == 200

    forged = client.get(path[:-3] + "abc")
    assert forged.status_code == 404
    assert forged.get_json()["error"] == "file_not_found"
    assert client.get("/api/v1/files/" + "A" * 5000).status_code == 404
    threading.Event().wait(2.1)  # the link was issued for one second
    assert client.get(path).status_code == 404


def test_concurrent_uploads_never_exceed_the_limit(
    postgres_url: str, storage_env: dict[str, str]
) -> None:
    app = build_app(postgres_url, **storage_env)
    session_uuid = new_session(app.test_client())
    start = threading.Barrier(8)
    statuses: list[int] = []

    def attempt(index: int) -> None:
        client = app.test_client()
        start.wait()
        statuses.append(upload(client, session_uuid, f"f{index}.pdf").status_code)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sorted(statuses) == [200] * 3 + [409] * 5
    assert len(stored_names(app, session_uuid)) == 3


def test_an_endless_body_is_refused_before_it_is_read(database_url: str, tmp_path) -> None:
    env = base_env(database_url, STORAGE_LOCAL_ROOT=str(tmp_path))
    build_app(database_url)  # migrate the schema the server process will use
    with app_process(env) as served:
        base_url = served.url
        issued = requests.post(f"{base_url}/api/v1/generate-uuid", timeout=10).json()["uuid"]
        host = urlsplit(base_url)
        connection = http.client.HTTPConnection(host.hostname, host.port, timeout=10)
        connection.putrequest("POST", "/api/v1/upload")
        connection.putheader("Content-Type", "multipart/form-data; boundary=x")
        connection.putheader("Content-Length", str(10 * 1024**3))
        connection.endheaders()
        connection.send(b"--x\r\n")  # then nothing more: the server must not wait for 10 GiB
        response = connection.getresponse()

        assert response.status == 413
        assert b"file_too_large" in response.read()
        assert issued


def test_file_references_in_the_audit_trail_depend_on_the_secret_key(
    database_url: str, storage_env: dict[str, str]
) -> None:
    references = []
    for secret_key in ("first-secret-key", "second-secret-key"):
        app = build_app(database_url, SECRET_KEY=secret_key, **storage_env)
        client = app.test_client()
        upload(client, new_session(client), "passport-scan.pdf")
        [event] = audit_rows(app, "file_uploaded")
        assert event.details["file_ref"] == keyed_ref("passport-scan.pdf", secret_key)
        references.append(event.details["file_ref"])

    assert references[0] != references[1]
    unkeyed = hashlib.sha256(b"passport-scan.pdf").hexdigest()[:16]
    assert unkeyed not in references
