"""A download link names one stored upload: equal bytes uploaded again never revive it.

On both databases and both storage backends. S3's ETag is a hash of the content, so a version
taken from it let a link outlive its file whenever the same bytes came back.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import boto3
from flask import Flask
from flask.testing import FlaskClient

from app.storage import session_prefix
from tests.conftest import JSON_HEADERS, build_app, new_session, s3_env
from tests.s3_proxy import S3Proxy

PDF = b"%PDF-1.7\n" + b"1" * 1024 + b"\n%%EOF\n"


def uploaded_link(client: FlaskClient, session_uuid: str, name: str = "cv.pdf") -> str:
    """Upload ``PDF`` as ``name``; the link the answer carries."""
    response = client.post(
        "/api/v1/upload",
        data={"session_uuid": session_uuid, "file": (io.BytesIO(PDF), name)},
        content_type="multipart/form-data",
    )
    assert response.status_code == 200, response.get_json()
    return str(response.get_json()["url"])


def listed_link(client: FlaskClient, session_uuid: str) -> str:
    """The link the listing gives for the session's one file."""
    [listed] = client.get(f"/api/v1/session/{session_uuid}/files").get_json()["files"]
    return str(listed["url"])


def status(client: FlaskClient, url: str) -> int:
    return client.get(urlsplit(url).path).status_code


def downloaded(client: FlaskClient, url: str) -> bytes:
    response = client.get(urlsplit(url).path)
    assert response.status_code == 200
    return response.data


def delete(client: FlaskClient, session_uuid: str, name: str = "cv.pdf") -> None:
    response = client.delete(
        "/api/v1/delete",
        json={"filename": name, "session_uuid": session_uuid},
        headers=JSON_HEADERS,
    )
    assert response.status_code == 200


def consent(client: FlaskClient, session_uuid: str, *, given: bool) -> None:
    response = client.post(
        f"/api/v1/session/{session_uuid}/consent",
        json={"consent_user_data": given},
        headers=JSON_HEADERS,
    )
    assert response.status_code == 200


def test_links_die_when_a_file_is_deleted_and_the_same_bytes_uploaded_again(
    files_client: FlaskClient,
) -> None:
    session_uuid = new_session(files_client)
    old_links = [uploaded_link(files_client, session_uuid), listed_link(files_client, session_uuid)]
    assert [downloaded(files_client, url) for url in old_links] == [PDF, PDF]

    delete(files_client, session_uuid)
    new_links = [uploaded_link(files_client, session_uuid), listed_link(files_client, session_uuid)]

    assert [status(files_client, url) for url in old_links] == [404, 404]
    assert [downloaded(files_client, url) for url in new_links] == [PDF, PDF]


def test_links_die_when_consent_is_withdrawn_and_the_same_bytes_uploaded_again(
    files_client: FlaskClient,
) -> None:
    session_uuid = new_session(files_client)
    consent(files_client, session_uuid, given=True)
    old_links = [uploaded_link(files_client, session_uuid), listed_link(files_client, session_uuid)]

    consent(files_client, session_uuid, given=False)
    new_links = [uploaded_link(files_client, session_uuid), listed_link(files_client, session_uuid)]

    assert [status(files_client, url) for url in old_links] == [404, 404]
    assert [downloaded(files_client, url) for url in new_links] == [PDF, PDF]


def test_links_die_when_a_file_is_replaced_by_the_same_bytes(files_client: FlaskClient) -> None:
    session_uuid = new_session(files_client)
    old_links = [uploaded_link(files_client, session_uuid), listed_link(files_client, session_uuid)]

    new_links = [uploaded_link(files_client, session_uuid), listed_link(files_client, session_uuid)]

    assert [status(files_client, url) for url in old_links] == [404, 404]
    assert [downloaded(files_client, url) for url in new_links] == [PDF, PDF]


def store_as_before_upload_ids(app: Flask, key: str, content: bytes) -> None:
    """Write an object the way the app did before it tagged uploads: bare content, no tag."""
    config = app.config
    if config["STORAGE_BACKEND"] == "s3":
        boto3.client(
            "s3", endpoint_url=config["S3_ENDPOINT_URL"], region_name=config["S3_REGION"]
        ).put_object(Bucket=config["S3_BUCKET"], Key=key, Body=content)
    else:
        path = Path(config["STORAGE_LOCAL_ROOT"]) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def test_files_stored_before_upload_ids_keep_working_links_that_die_on_re_upload(
    files_app: Flask, files_client: FlaskClient
) -> None:
    session_uuid = new_session(files_client)
    store_as_before_upload_ids(files_app, session_prefix(session_uuid) + "cv.pdf", PDF)
    old_link = listed_link(files_client, session_uuid)
    assert downloaded(files_client, old_link) == PDF
    assert downloaded(files_client, listed_link(files_client, session_uuid)) == PDF

    delete(files_client, session_uuid)
    new_link = uploaded_link(files_client, session_uuid)

    assert status(files_client, old_link) == 404
    assert downloaded(files_client, new_link) == PDF


def test_a_listing_whose_file_checks_fail_or_stall_answers_503(
    database_url: str, proxy: tuple[S3Proxy, str]
) -> None:
    s3_proxy, url = proxy
    app = build_app(
        database_url,
        **s3_env(url),
        S3_CONNECT_TIMEOUT_SECONDS="1",
        S3_READ_TIMEOUT_SECONDS="1",
        S3_MAX_ATTEMPTS="1",
    )
    client = app.test_client()
    session_uuid = new_session(client)
    uploaded_link(client, session_uuid)
    released = threading.Event()

    def fail_head(operation: str, path: str, body: bytes) -> tuple[int, bytes] | None:
        return (500, b"") if operation == "HeadObject" else None

    def stall_head(operation: str, path: str, body: bytes) -> None:
        if operation == "HeadObject":
            released.wait(10)

    try:
        for fault in (fail_head, stall_head):
            s3_proxy.fault = fault
            started = time.monotonic()
            response = client.get(f"/api/v1/session/{session_uuid}/files")

            assert (response.status_code, response.get_json()["error"]) == (
                503,
                "storage_unavailable",
            )
            # The check is bounded like every S3 call: attempts x (connect + read), here 2 s.
            assert time.monotonic() - started < 5
    finally:
        released.set()
    s3_proxy.fault = None
    assert s3_proxy.counts["HeadObject"] >= 2
    assert downloaded(client, listed_link(client, session_uuid)) == PDF
