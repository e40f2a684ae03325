"""Fixtures: real databases (SQLite and PostgreSQL), real Redis, and apps built on them.

PostgreSQL and Redis come from ``TEST_DATABASE_URL`` and ``TEST_REDIS_URL``. Without
them the tests that need them are skipped, unless ``TEST_REQUIRE_SERVICES=1`` (as
``.ci/run`` sets), which turns their absence into a failure.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import os
import re
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from email.message import EmailMessage
from typing import Any

import psycopg2
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from flask_migrate import upgrade
from sqlalchemy import delete, select, update
from sqlalchemy.engine import make_url

from app import create_app
from app.extensions import db
from app.models import (
    AuditEvent,
    ChatSession,
)
from tests.s3_proxy import S3Proxy
from tests.servers import PROJECT_ROOT, VENV_BIN

RUN_ID = uuid.uuid4().hex[:10]
RATE_LIMIT_PREFIX = f"test-{RUN_ID}"
JSON_HEADERS = {"Accept": "application/json; version=v1", "Content-Type": "application/json"}
# The contract's fixed texts, word for word (CONTRACT.md, section 1). Tests compare answers with
# these, never with the app's own constants, so a rewording in the app fails them.
SESSION_RESET = "Your session has been reset due to a technical issue. Please start again."
GENERAL_ERROR = (
    "The system has encountered an error, which has been notified to the administrator to "
    "investigate. Please try again later."
)
TEST_SECRET_KEY = "test-secret-key"


def _service_url(name: str) -> str:
    url = os.environ.get(name, "").strip()
    if url:
        return url
    message = f"{name} is not set"
    if os.environ.get("TEST_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message}, and TEST_REQUIRE_SERVICES=1 makes that a failure")
    pytest.skip(f"{message}; set it to run these tests")


def _run_admin_statement(url: str, statement: str) -> None:
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with closing(psycopg2.connect(dsn)) as connection:
        connection.autocommit = True
        connection.cursor().execute(statement)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL database created for this test run and dropped after it."""
    admin_url = _service_url("TEST_DATABASE_URL")
    name = f"session_service_test_{RUN_ID}_{os.getpid()}"
    _run_admin_statement(admin_url, f'CREATE DATABASE "{name}"')
    # The URL keeps the scheme the operator wrote (plain postgresql://): the app picks the driver.
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    # A new database needs the schema, even under a name an earlier session in this process used.
    _migrated.discard(url)
    yield url
    _run_admin_statement(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """A new, empty PostgreSQL database, named by the plain URL an operator writes."""
    server = _service_url("TEST_DATABASE_URL")
    name = f"fresh_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    _run_admin_statement(server, f'CREATE DATABASE "{name}"')
    url = make_url(server).set(database=name).render_as_string(hide_password=False)
    assert url.startswith("postgresql://")
    yield url
    _run_admin_statement(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    url = _service_url("TEST_REDIS_URL")
    yield url
    _clear_rate_limits(url)


@pytest.fixture
def redis_url(redis_server_url: str) -> str:
    """Redis, with this run's rate-limit counters cleared."""
    _clear_rate_limits(redis_server_url)
    return redis_server_url


def _clear_rate_limits(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(match=f"*{RATE_LIMIT_PREFIX}*"):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return "sqlite:///" + str(tmp_path_factory.mktemp("sqlite") / "sessions.sqlite3")


_migrated: set[str] = set()


def base_env(database_url: str, **overrides: str) -> dict[str, str]:
    """The environment a test app is built from."""
    env = {
        "APP_ENV": "development",
        "SECRET_KEY": TEST_SECRET_KEY,
        "DATABASE_URL": database_url,
        # Generous by default so only the rate-limit tests meet the limit.
        "SESSION_RATE_LIMIT": "1000/minute",
        "RESUME_RATE_LIMIT": "1000/minute",
        "RESUME_IP_RATE_LIMIT": "1000/minute",
        "SESSION_RESOURCE_RATE_LIMIT": "1000/minute",
        "UPLOAD_RATE_LIMIT": "1000/minute",
        "EMAIL_RATE_LIMIT": "1000/minute",
        "RATELIMIT_STORAGE_URI": "memory://",
        # flask-limiter keeps the first key prefix it is bound with for the life of the
        # process, so there is one per test run; Redis tests clear it before they count.
        "RATELIMIT_KEY_PREFIX": RATE_LIMIT_PREFIX,
        "LOG_LEVEL": "warning",
        "SCHEDULER_ENABLED": "false",
        "STORAGE_LOCAL_ROOT": tempfile.mkdtemp(prefix="storage-"),
    }
    env.update(overrides)
    return env


# Apps built during the current test; their connection pools are closed when it ends.
_built_apps: list[Flask] = []


@pytest.fixture(autouse=True)
def _close_connection_pools() -> Iterator[None]:
    """Close every pool a test's apps opened: a long run must not pile up idle connections."""
    yield
    while _built_apps:
        with _built_apps.pop().app_context():
            for engine in db.engines.values():
                engine.dispose()


def build_app(database_url: str, **overrides: str) -> Flask:
    """An app on ``database_url`` with the schema migrated and every table empty."""
    app = create_app(base_env(database_url, **overrides))
    app.config["TESTING"] = True
    _built_apps.append(app)
    with app.app_context():
        if database_url not in _migrated:
            upgrade()
            _migrated.add(database_url)
        # Every table the models know, so a new one cannot carry rows from test to test.
        for table in db.metadata.sorted_tables:
            db.session.execute(delete(table))
        db.session.commit()
    return app


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each API and service test runs once on SQLite and once on PostgreSQL."""
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def app(database_url: str) -> Flask:
    return build_app(database_url)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def audit_rows(app: Flask, event_type: str | None = None) -> list[AuditEvent]:
    """Audit rows in the order they were written, optionally of one type."""
    with app.app_context():
        query = select(AuditEvent).order_by(AuditEvent.id)
        if event_type is not None:
            query = query.where(AuditEvent.event_type == event_type)
        return list(db.session.scalars(query))


def session_row(app: Flask, session_uuid: str | uuid.UUID) -> ChatSession | None:
    with app.app_context():
        return db.session.get(ChatSession, uuid.UUID(str(session_uuid)))


def set_session_columns(app: Flask, session_uuid: str | uuid.UUID, **values: object) -> None:
    """Write ``values`` straight into a session's row, as time or another process would."""
    with app.app_context():
        row = ChatSession.uuid == uuid.UUID(str(session_uuid))
        db.session.execute(update(ChatSession).where(row).values(values))
        db.session.commit()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server speaking the real protocol over HTTP on a free port."""
    from moto.server import ThreadedMotoServer

    from tests.servers import free_port

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(name, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[tuple[S3Proxy, str]]:
    """A proxy in front of the S3 server that counts requests and can be told to fail them."""
    s3_proxy = S3Proxy(s3_endpoint)
    with s3_proxy.serving() as url:
        yield s3_proxy, url


def s3_env(endpoint: str) -> dict[str, str]:
    """Settings for the S3 backend on a fresh bucket at ``endpoint``."""
    import boto3

    bucket = f"uploads-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return {
        "STORAGE_BACKEND": "s3",
        "S3_BUCKET": bucket,
        "S3_ENDPOINT_URL": endpoint,
        "S3_REGION": "us-east-1",
    }


def unreachable_s3_env() -> dict[str, str]:
    """Settings for an S3 backend whose endpoint refuses every connection."""
    from tests.servers import free_port

    return {
        "STORAGE_BACKEND": "s3",
        "S3_BUCKET": "unreachable",
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "S3_REGION": "us-east-1",
        "S3_CONNECT_TIMEOUT_SECONDS": "1",
        "S3_MAX_ATTEMPTS": "1",
    }


@pytest.fixture(params=["local", "s3"])
def storage_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Settings for each storage backend in turn."""
    if request.param == "local":
        return {"STORAGE_BACKEND": "local", "STORAGE_LOCAL_ROOT": tempfile.mkdtemp(prefix="files-")}
    return s3_env(request.getfixturevalue("s3_endpoint"))


class Inbox:
    """Messages received by the test SMTP server, optionally after a delay.

    The first ``refuse`` messages are refused (after the delay) instead of accepted.
    """

    def __init__(self, delay: float = 0.0, refuse: int = 0) -> None:
        self.messages: list[EmailMessage] = []
        self.delay = delay
        self.refuse = refuse

    def to(self, address: str) -> list[EmailMessage]:
        return [message for message in self.messages if message["To"] == address]

    async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.refuse:
            self.refuse -= 1
            return "554 Transaction failed"
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append(message)  # type: ignore[arg-type]
        return "250 Message accepted"


@contextmanager
def smtp_server(
    port: int | None = None, delay: float = 0.0, refuse: int = 0
) -> Iterator[tuple[int, Inbox]]:
    """A real SMTP server (aiosmtpd) on loopback; yields its port and inbox."""
    from aiosmtpd.controller import Controller

    from tests.servers import free_port

    inbox = Inbox(delay, refuse)
    controller = Controller(inbox, hostname="127.0.0.1", port=port or free_port())
    controller.start()
    try:
        yield controller.port, inbox
    finally:
        controller.stop()


@pytest.fixture
def mail_server() -> Iterator[tuple[int, Inbox]]:
    """A real SMTP server for one test: its port and inbox."""
    with smtp_server() as server:
        yield server


@pytest.fixture
def inbox(mail_server: tuple[int, Inbox]) -> Inbox:
    return mail_server[1]


@pytest.fixture
def files_app(database_url: str, storage_env: dict[str, str]) -> Flask:
    """An app on each database with each storage backend."""
    return build_app(database_url, **storage_env)


@pytest.fixture
def files_client(files_app: Flask) -> FlaskClient:
    return files_app.test_client()


def new_session(client: FlaskClient) -> str:
    """A fresh session's UUID, issued through the API."""
    return str(client.post("/api/v1/generate-uuid", headers=JSON_HEADERS).get_json()["uuid"])


def smtp_env(port: int) -> dict[str, str]:
    return {
        "MAIL_BACKEND": "smtp",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(port),
        "SMTP_STARTTLS": "false",
        "SMTP_TIMEOUT_SECONDS": "2",
        "MAIL_FROM": "verify@chat.example",
    }


def code_in(message: EmailMessage) -> str:
    """The 6-digit verification code in a message's plain-text body."""
    text = message.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    found = re.search(r"\b(\d{6})\b", text)
    assert found is not None, "no code in the message"
    return found.group(1)


def operator(
    env: dict[str, str], *command: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a command as typed in the project directory with the virtual environment active."""
    result = subprocess.run(
        list(command),
        cwd=PROJECT_ROOT,
        env={**os.environ, **env, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert result.returncode == 0, f"{' '.join(command)}: {result.stdout}{result.stderr}"
    return result


def json_lines(text: str) -> list[dict[str, object]]:
    """Every line parsed as JSON; fails on the first line that is not one JSON object."""
    parsed = []
    for line in text.splitlines():
        record = json.loads(line)
        assert isinstance(record, dict), line
        parsed.append(record)
    return parsed
