"""Configuration coercion and refusal, the personal-data reducers, and what logs may carry."""

from __future__ import annotations

import json
import logging
import sys
import uuid

import pytest

from app.logging_setup import RedactingJsonFormatter
from app.privacy import mask_email, truncate_ip
from config import Config, ConfigError
from tests.conftest import json_lines, operator
from tests.servers import free_port


def make(**environ: str) -> Config:
    return Config(environ, instance_path="/srv/instance")


def test_development_defaults_are_embedded() -> None:
    config = make()

    assert config.SQLALCHEMY_DATABASE_URI == "sqlite:////srv/instance/sessions.sqlite3"
    assert config.CORS_ORIGINS == ["http://localhost:3000", "http://127.0.0.1:3000"]
    assert config.SESSION_RATE_LIMIT == "10/minute"
    assert config.RATELIMIT_STORAGE_URI == "memory://"
    assert config.TRUSTED_PROXY_COUNT == 0
    assert len(config.SECRET_KEY) >= 32


PRODUCTION = {
    "APP_ENV": "production",
    "SECRET_KEY": "a-production-secret-of-32-chars!",
    "DATABASE_URL": "postgresql://db/app",
    "MAIL_BACKEND": "smtp",
    "SMTP_HOST": "smtp.example.org",
    "METRICS_TOKEN": "a-scraper-token-of-32-characters",
}


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"SECRET_KEY": ""}, "SECRET_KEY"),
        ({"DATABASE_URL": ""}, "DATABASE_URL"),
        ({"CORS_ORIGINS": "*"}, "CORS_ORIGINS"),
        ({"MAIL_BACKEND": "console"}, "MAIL_BACKEND"),
        ({"SMTP_HOST": ""}, "SMTP_HOST"),
        ({"SECRET_KEY": "x" * 31}, "SECRET_KEY must be at least 32 characters"),
        ({"METRICS_TOKEN": ""}, "METRICS_TOKEN is required in production"),
        ({"METRICS_TOKEN": "x" * 31}, "METRICS_TOKEN must be at least 32 characters"),
    ],
)
def test_production_refuses_insecure_defaults(override: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        make(**{**PRODUCTION, **override})


@pytest.mark.parametrize("spelling", ["Production", "PRODUCTION", " production "])
def test_production_is_production_in_any_letter_case(spelling: str) -> None:
    with pytest.raises(ConfigError) as refused:
        make(APP_ENV=spelling, STORAGE_BACKEND="S3", MAIL_BACKEND="SMTP")

    assert sorted(refused.value.problems) == [
        "DATABASE_URL must point at PostgreSQL in production",
        "METRICS_TOKEN is required in production while /metrics is served; set one, or "
        "METRICS_ENABLED=false",
        "S3_BUCKET is required when STORAGE_BACKEND=s3",
        "SECRET_KEY is required in production",
        "SMTP_HOST is required when MAIL_BACKEND=smtp",
    ]


def test_production_starts_with_its_settings_given() -> None:
    assert make(**PRODUCTION).APP_ENV == "production"


def test_production_serves_no_docs_unless_asked_and_no_metrics_without_a_token() -> None:
    without_metrics = make(**{**PRODUCTION, "METRICS_TOKEN": "", "METRICS_ENABLED": "false"})

    assert make(**PRODUCTION).API_DOCS_ENABLED is False
    assert make(**PRODUCTION, API_DOCS_ENABLED="true").API_DOCS_ENABLED is True
    assert make().API_DOCS_ENABLED is True
    assert (without_metrics.METRICS_ENABLED, without_metrics.METRICS_TOKEN) == (False, None)


@pytest.mark.parametrize(
    "environ",
    [
        {"TRUSTED_PROXY_COUNT": "one"},
        {"TRUSTED_PROXY_COUNT": "-1"},
        {"APP_ENV": "staging"},
        {"MAX_JSON_BODY_KB": "0"},
        {"SESSION_RATE_LIMIT": "ten a minute"},
        {"UPLOAD_RATE_LIMIT": "30/fortnight"},
    ],
)
def test_malformed_values_are_refused_by_name(environ: dict[str, str]) -> None:
    [name] = environ
    with pytest.raises(ConfigError, match=name):
        make(**environ)


def test_values_are_coerced() -> None:
    config = make(
        TRUSTED_PROXY_COUNT=" 2 ",
        CORS_ORIGINS="https://a.example, https://b.example,",
        DATABASE_URL="postgres://u@h/db",
        MAX_JSON_BODY_KB="8",
    )

    assert config.TRUSTED_PROXY_COUNT == 2
    assert config.CORS_ORIGINS == ["https://a.example", "https://b.example"]
    assert config.SQLALCHEMY_DATABASE_URI == "postgresql+psycopg2://u@h/db"
    assert config.MAX_CONTENT_LENGTH == 8 * 1024
    assert (
        config.SQLALCHEMY_ENGINE_OPTIONS["connect_args"]["options"]
        == "-c statement_timeout=5000 -c lock_timeout=2000"
    )


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("postgresql://u@h:5432/db", "postgresql+psycopg2://u@h:5432/db"),
        ("postgres://u:p@h/db", "postgresql+psycopg2://u:p@h/db"),
        ("postgresql+psycopg2://u@h/db", "postgresql+psycopg2://u@h/db"),
        ("sqlite:////tmp/x.sqlite3", "sqlite:////tmp/x.sqlite3"),
    ],
)
def test_plain_postgresql_urls_use_the_installed_driver(given: str, used: str) -> None:
    assert used == make(DATABASE_URL=given).SQLALCHEMY_DATABASE_URI


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as refused:
        make(
            TRUSTED_PROXY_COUNT="one",
            MAX_UPLOAD_MB="0",
            SESSION_RATE_LIMIT="ten a minute",
            LOG_LEVEL="loud",
        )

    named = sorted(problem.split(":")[0] for problem in refused.value.problems)
    assert named == ["LOG_LEVEL", "MAX_UPLOAD_MB", "SESSION_RATE_LIMIT", "TRUSTED_PROXY_COUNT"]
    assert "(got 'one')" in str(refused.value)


def test_a_secret_is_never_quoted_in_a_problem() -> None:
    with pytest.raises(ConfigError) as refused:
        make(DATABASE_URL="postgresql://u:hunter2@h/db", DATABASE_CONNECT_TIMEOUT_SECONDS="x")
    assert "hunter2" not in str(refused.value)


def test_the_request_deadline_is_half_the_worker_timeout_unless_set() -> None:
    assert make(**PRODUCTION).REQUEST_DEADLINE_SECONDS == 30
    assert make(GUNICORN_TIMEOUT="30").REQUEST_DEADLINE_SECONDS == 15
    assert make(REQUEST_DEADLINE_SECONDS="12").REQUEST_DEADLINE_SECONDS == 12


@pytest.mark.parametrize(
    "environ",
    [
        {"REQUEST_DEADLINE_SECONDS": "43"},
        {"GUNICORN_TIMEOUT": "30", "REQUEST_DEADLINE_SECONDS": "22"},
    ],
)
def test_a_deadline_that_leaves_gunicorn_no_margin_is_refused_by_name(
    environ: dict[str, str],
) -> None:
    with pytest.raises(ConfigError) as refused:
        make(**environ)

    [problem] = refused.value.problems
    for name in environ:
        assert name in problem


def test_a_deadline_at_the_margin_is_accepted() -> None:
    assert make(GUNICORN_TIMEOUT="30", REQUEST_DEADLINE_SECONDS="21").REQUEST_DEADLINE_SECONDS == 21


def test_lock_waits_must_be_shorter_than_statements() -> None:
    with pytest.raises(ConfigError, match="DATABASE_LOCK_TIMEOUT_MS"):
        make(DATABASE_LOCK_TIMEOUT_MS="5000")


def test_production_with_in_memory_counters_warns_that_limits_are_per_worker() -> None:
    assert make().warnings == []
    [warning] = make(**PRODUCTION).warnings
    assert "per worker" in warning
    assert make(**PRODUCTION, RATELIMIT_STORAGE_URI="redis://r:6379/0").warnings == []


@pytest.mark.parametrize(
    ("address", "kept"),
    [
        ("203.0.113.77", "203.0.113.0"),
        ("2001:db8:abcd:12:1:2:3:4", "2001:db8:abcd::"),
        ("::ffff:198.51.100.9", "198.51.100.0"),
        ("not an ip", None),
        (None, None),
    ],
)
def test_truncate_ip_keeps_only_the_network(address: str | None, kept: str | None) -> None:
    assert truncate_ip(address) == kept


@pytest.mark.parametrize(
    ("email", "masked"),
    [
        ("jane.doe@example.com", "j***@e***.com"),
        ("a@localhost", "a***@l***"),
        (None, None),
    ],
)
def test_mask_email(email: str | None, masked: str | None) -> None:
    assert mask_email(email) == masked


BROKEN = {
    "APP_ENV": "production",
    "SECRET_KEY": "too-short",
    "DATABASE_URL": "postgresql://app:hunter2@127.0.0.1:1/app",
    "MAIL_BACKEND": "console",
    "MAX_UPLOAD_MB": "five",
}
BROKEN_NAMES = ("SECRET_KEY", "MAIL_BACKEND", "METRICS_TOKEN", "MAX_UPLOAD_MB")


def _reported_once_each(output: str) -> None:
    """Every line JSON, one per problem, each problem named once, no traceback, no secret."""
    assert "Traceback" not in output
    assert "hunter2" not in output
    problems = [str(line["message"]) for line in json_lines(output) if line["logger"] == "config"]
    assert len(problems) == len(BROKEN_NAMES)
    for name in BROKEN_NAMES:
        assert len([problem for problem in problems if problem.startswith(name)]) == 1


def test_the_flask_cli_reports_every_configuration_problem_and_exits() -> None:
    refused = operator(BROKEN, "flask", "--app", "wsgi", "db", "upgrade", check=False)

    assert refused.returncode == 2
    _reported_once_each(refused.stderr + refused.stdout)


def test_gunicorn_reports_every_configuration_problem_once_and_exits() -> None:
    env = {**BROKEN, "GUNICORN_BIND": f"127.0.0.1:{free_port()}", "WEB_CONCURRENCY": "3"}

    refused = operator(env, "gunicorn", "wsgi:app", check=False)

    assert refused.returncode != 0
    _reported_once_each(refused.stderr + refused.stdout)


def test_log_lines_never_carry_a_session_uuid_or_an_address() -> None:
    session_uuid, correlation_id = str(uuid.uuid4()), str(uuid.uuid4())
    try:
        raise ValueError(f"no session {session_uuid} for jane.doe@example.org")
    except ValueError:
        record = logging.LogRecord(
            "gunicorn.error",
            logging.ERROR,
            __file__,
            1,
            "Error handling request /api/v1/session/%s",
            (session_uuid.upper(),),
            sys.exc_info(),
        )
    record.correlation_id = correlation_id

    line = RedactingJsonFormatter().format(record)

    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["message"] == "Error handling request /api/v1/session/<uuid>"
    assert "ValueError: no session <uuid> for <email>" in parsed["exc_info"]
    assert session_uuid not in line.lower()
    assert "example.org" not in line
    assert parsed["correlation_id"] == correlation_id
