"""Application configuration read from the environment."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from typing import Any

import limits

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})


class ConfigError(ValueError):
    """A configuration variable is missing or malformed."""


class _Env:
    """Typed readers over an environment mapping."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def text(self, name: str, default: str) -> str:
        return self._environ.get(name, "").strip() or default

    def optional_text(self, name: str) -> str | None:
        value = self._environ.get(name, "").strip()
        return value or None

    def integer(self, name: str, default: int, *, minimum: int = 0) -> int:
        raw = self._environ.get(name)
        if raw is None or not raw.strip():
            return default
        try:
            value = int(raw.strip())
        except ValueError as exc:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc
        if value < minimum:
            raise ConfigError(f"{name} must be at least {minimum}, got {value}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        raw = self._environ.get(name)
        if raw is None:
            return default
        word = raw.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ConfigError(f"{name} must be a boolean (true/false), got {raw!r}")

    def csv(self, name: str, default: str) -> list[str]:
        return [item.strip() for item in self.text(name, default).split(",") if item.strip()]

    def rate_limit(self, name: str, default: str) -> str:
        """A flask-limiter limit string; a typo would otherwise silently disable the limit."""
        value = self.text(name, default)
        try:
            limits.parse_many(value)
        except ValueError as exc:
            raise ConfigError(
                f"{name} must be a rate limit such as 10/minute, got {value!r}"
            ) from exc
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default).lower()
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value


class Config:
    """Every setting the app reads, coerced from environment variables.

    Attributes in upper case are copied into ``app.config`` by the factory.
    """

    def __init__(self, environ: Mapping[str, str], *, instance_path: str) -> None:
        env = _Env(environ)
        self.APP_ENV = env.choice("APP_ENV", "development", ("development", "production"))
        production = self.APP_ENV == "production"

        secret_key = env.optional_text("SECRET_KEY")
        if secret_key is None:
            if production:
                raise ConfigError("SECRET_KEY is required when APP_ENV=production")
            # A per-process random key keeps development usable without a shared secret.
            secret_key = secrets.token_hex(32)
        self.SECRET_KEY = secret_key

        default_db = "sqlite:///" + os.path.join(instance_path, "sessions.sqlite3")
        self.SQLALCHEMY_DATABASE_URI = _normalise_database_url(env.text("DATABASE_URL", default_db))
        if production and self.SQLALCHEMY_DATABASE_URI.startswith("sqlite"):
            raise ConfigError("DATABASE_URL must point at PostgreSQL when APP_ENV=production")
        self.DATABASE_STATEMENT_TIMEOUT_MS = env.integer(
            "DATABASE_STATEMENT_TIMEOUT_MS", 5000, minimum=1
        )
        self.DATABASE_CONNECT_TIMEOUT_SECONDS = env.integer(
            "DATABASE_CONNECT_TIMEOUT_SECONDS", 5, minimum=1
        )
        self.SQLALCHEMY_ENGINE_OPTIONS = _engine_options(
            self.SQLALCHEMY_DATABASE_URI,
            statement_timeout_ms=self.DATABASE_STATEMENT_TIMEOUT_MS,
            connect_timeout_s=self.DATABASE_CONNECT_TIMEOUT_SECONDS,
        )

        self.CORS_ORIGINS = env.csv("CORS_ORIGINS", "http://localhost:3000,http://127.0.0.1:3000")
        if production and "*" in self.CORS_ORIGINS:
            raise ConfigError("CORS_ORIGINS may not be '*' when APP_ENV=production")

        self.SESSION_RATE_LIMIT = env.rate_limit("SESSION_RATE_LIMIT", "10/minute")
        self.SESSION_RESOURCE_RATE_LIMIT = env.rate_limit(
            "SESSION_RESOURCE_RATE_LIMIT", "60/minute"
        )
        self.RATELIMIT_STORAGE_URI = env.text("RATELIMIT_STORAGE_URI", "memory://")
        self.RATELIMIT_KEY_PREFIX = env.text("RATELIMIT_KEY_PREFIX", "session-api")
        self.RATELIMIT_HEADERS_ENABLED = True
        self.TRUSTED_PROXY_COUNT = env.integer("TRUSTED_PROXY_COUNT", 0)

        self.MAX_JSON_BODY_KB = env.integer("MAX_JSON_BODY_KB", 64, minimum=1)
        self.MAX_CONTENT_LENGTH = self.MAX_JSON_BODY_KB * 1024

        self.STORAGE_BACKEND = env.choice("STORAGE_BACKEND", "local", ("local", "s3"))
        self.STORAGE_LOCAL_ROOT = env.text(
            "STORAGE_LOCAL_ROOT", os.path.join(instance_path, "storage")
        )
        self.S3_BUCKET = env.optional_text("S3_BUCKET")
        if self.STORAGE_BACKEND == "s3" and self.S3_BUCKET is None:
            raise ConfigError("S3_BUCKET is required when STORAGE_BACKEND=s3")
        self.S3_REGION = env.optional_text("S3_REGION")
        self.S3_ENDPOINT_URL = env.optional_text("S3_ENDPOINT_URL")
        self.S3_CONNECT_TIMEOUT_SECONDS = env.integer("S3_CONNECT_TIMEOUT_SECONDS", 3, minimum=1)
        self.S3_READ_TIMEOUT_SECONDS = env.integer("S3_READ_TIMEOUT_SECONDS", 10, minimum=1)
        self.S3_MAX_ATTEMPTS = env.integer("S3_MAX_ATTEMPTS", 3, minimum=1)
        self.DOWNLOAD_URL_EXPIRES_SECONDS = env.integer(
            "DOWNLOAD_URL_EXPIRES_SECONDS", 900, minimum=1
        )
        self.MAX_UPLOAD_MB = env.integer("MAX_UPLOAD_MB", 5, minimum=1)
        self.MAX_FILES_PER_SESSION = env.integer("MAX_FILES_PER_SESSION", 3, minimum=1)
        self.UPLOAD_RATE_LIMIT = env.rate_limit("UPLOAD_RATE_LIMIT", "30/minute")

        self.MAIL_BACKEND = env.choice("MAIL_BACKEND", "console", ("console", "smtp"))
        if production and self.MAIL_BACKEND == "console":
            raise ConfigError("MAIL_BACKEND must be smtp when APP_ENV=production")
        self.SMTP_HOST = env.optional_text("SMTP_HOST")
        if self.MAIL_BACKEND == "smtp" and self.SMTP_HOST is None:
            raise ConfigError("SMTP_HOST is required when MAIL_BACKEND=smtp")
        self.SMTP_PORT = env.integer("SMTP_PORT", 587, minimum=1)
        self.SMTP_USERNAME = env.optional_text("SMTP_USERNAME")
        self.SMTP_PASSWORD = env.optional_text("SMTP_PASSWORD")
        self.SMTP_STARTTLS = env.boolean("SMTP_STARTTLS", True)
        self.SMTP_SSL = env.boolean("SMTP_SSL", False)
        if self.SMTP_SSL and self.SMTP_STARTTLS and "SMTP_STARTTLS" in environ:
            raise ConfigError("SMTP_SSL and SMTP_STARTTLS are exclusive; choose one")
        self.SMTP_TIMEOUT_SECONDS = env.integer("SMTP_TIMEOUT_SECONDS", 10, minimum=1)
        self.MAIL_FROM = env.text("MAIL_FROM", "no-reply@localhost")
        self.SERVICE_NAME = env.text("SERVICE_NAME", "Chat Assistant")

        self.EMAIL_CODE_TTL_MINUTES = env.integer("EMAIL_CODE_TTL_MINUTES", 10, minimum=1)
        self.EMAIL_CODE_MAX_ATTEMPTS = env.integer("EMAIL_CODE_MAX_ATTEMPTS", 3, minimum=1)
        self.EMAIL_SEND_COOLDOWN_SECONDS = env.integer("EMAIL_SEND_COOLDOWN_SECONDS", 30)
        self.EMAIL_SENDS_PER_SESSION_PER_HOUR = env.integer(
            "EMAIL_SENDS_PER_SESSION_PER_HOUR", 3, minimum=1
        )
        self.EMAIL_SENDS_PER_ADDRESS_PER_DAY = env.integer(
            "EMAIL_SENDS_PER_ADDRESS_PER_DAY", 5, minimum=1
        )
        self.EMAIL_RATE_LIMIT = env.rate_limit("EMAIL_RATE_LIMIT", "10/minute")

        self.ABANDONED_SESSION_MINUTES = env.integer(
            "ABANDONED_SESSION_MINUTES", 24 * 60, minimum=1
        )
        self.ABANDONED_PURGE_INTERVAL_MINUTES = env.integer(
            "ABANDONED_PURGE_INTERVAL_MINUTES", 30, minimum=1
        )

        self.CONSENT_WORDING_VERSION = env.text("CONSENT_WORDING_VERSION", "v1")
        self.DATA_RETENTION_DAYS = env.integer("DATA_RETENTION_DAYS", 180, minimum=1)
        self.AUDIT_RETENTION_DAYS = env.integer("AUDIT_RETENTION_DAYS", 365, minimum=1)
        self.RETENTION_INTERVAL_MINUTES = env.integer(
            "RETENTION_INTERVAL_MINUTES", 24 * 60, minimum=1
        )

        self.ADMIN_EMAIL = env.optional_text("ADMIN_EMAIL")
        self.ADMIN_NOTIFY_DEDUP_MINUTES = env.integer("ADMIN_NOTIFY_DEDUP_MINUTES", 15)
        self.SUSPICIOUS_WINDOW_MINUTES = env.integer("SUSPICIOUS_WINDOW_MINUTES", 10, minimum=1)
        self.SUSPICIOUS_FAILED_CODES = env.integer("SUSPICIOUS_FAILED_CODES", 6, minimum=1)
        self.SUSPICIOUS_RATE_LIMIT_HITS = env.integer("SUSPICIOUS_RATE_LIMIT_HITS", 20, minimum=1)

        self.SCHEDULER_ENABLED = env.boolean("SCHEDULER_ENABLED", True)
        self.ORPHAN_SWEEP_INTERVAL_MINUTES = env.integer(
            "ORPHAN_SWEEP_INTERVAL_MINUTES", 30, minimum=1
        )
        self.ORPHAN_MIN_AGE_MINUTES = env.integer("ORPHAN_MIN_AGE_MINUTES", 30)

        self.LOG_LEVEL = env.choice(
            "LOG_LEVEL", "info", ("debug", "info", "warning", "error")
        ).upper()

        self.OPENAPI_VERSION = "3.1.0"
        self.OPENAPI_URL_PREFIX = "/api/v1"
        self.OPENAPI_JSON_PATH = "openapi.json"
        self.API_TITLE = "Chat session service"
        self.API_VERSION = "v1"

    def as_mapping(self) -> dict[str, Any]:
        """The upper-case settings, ready for ``app.config``."""
        return {key: value for key, value in vars(self).items() if key.isupper()}


def _normalise_database_url(url: str) -> str:
    """Accept the ``postgres://`` scheme that hosting platforms hand out."""
    if url.startswith("postgres://"):
        return "postgresql://" + url.removeprefix("postgres://")
    return url


def _engine_options(
    url: str, *, statement_timeout_ms: int, connect_timeout_s: int
) -> dict[str, Any]:
    """Engine options that bound every database wait."""
    if url.startswith("postgresql"):
        return {
            # No pre-ping (docs/decisions.md): a dead connection costs one 503,
            # not a round trip on every request.
            "pool_pre_ping": False,
            # Error messages would otherwise quote row values (names, e-mail addresses).
            "hide_parameters": True,
            "connect_args": {
                "connect_timeout": connect_timeout_s,
                "options": f"-c statement_timeout={statement_timeout_ms}",
                "application_name": "chat-session-service",
            },
        }
    if url.startswith("sqlite"):
        # SQLite has no statement timeout; the busy timeout bounds waits for the write lock.
        return {"connect_args": {"timeout": statement_timeout_ms / 1000}, "hide_parameters": True}
    return {"hide_parameters": True}
