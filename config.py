"""Application configuration read from the environment."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import environs
import limits
from marshmallow import ValidationError
from marshmallow.validate import Range

DEFAULT_INSTANCE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "instance")
MIN_PRODUCTION_SECRET_LENGTH = 32
# Values of these variables are never repeated in error messages.
SECRET_VARIABLES = frozenset({"SECRET_KEY", "SMTP_PASSWORD", "DATABASE_URL", "METRICS_TOKEN"})

# A request's deadline may take at most this share of gunicorn's worker timeout: past the
# deadline a request may still undo a half-done upload for a fifth of the deadline
# (``deadline.grace``), and then answer, log and hand its alert to a thread (docs/decisions.md,
# "One deadline per request"). Unless set, the deadline is half the worker timeout.
DEADLINE_SHARE_OF_WORKER_TIMEOUT = 0.7
DEFAULT_DEADLINE_SHARE = 0.5


class ConfigError(ValueError):
    """Configuration variables are missing, malformed or unsafe; ``problems`` lists each one."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class _MappingEnv(environs.Env):
    """environs over the mapping it is given, where a blank value counts as unset.

    environs reads ``os.environ``; the app reads the mapping passed to the factory (the process
    environment in production, a plain dict in tests), so the lookup is redirected to it.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        super().__init__(eager=False)
        self._source = environ

    def _get_value(self, env_key: str, default: Any) -> Any:
        value = self._source.get(env_key, "").strip()
        return value or default


def _rate_limit(value: str) -> None:
    """A typo in a limit string would otherwise silently disable the limit."""
    try:
        limits.parse_many(value)
    except ValueError as exc:
        raise ValidationError(
            "Must be a rate limit such as 10/minute or 100/hour;10/minute."
        ) from (exc)


def _one_of(*choices: str) -> Callable[[str], None]:
    def validate(value: str) -> None:
        if value.lower() not in choices:
            raise ValidationError(f"Must be one of {', '.join(choices)}.")

    return validate


AT_LEAST_ONE = Range(min=1)
NOT_NEGATIVE = Range(min=0)


class Config:
    """Every setting the app reads, coerced from environment variables.

    Every problem is collected before anything is refused, so an operator sees them all at
    once. Attributes in upper case are copied into ``app.config`` by the factory; ``warnings``
    lists what is allowed but worth saying at start-up.
    """

    def __init__(
        self, environ: Mapping[str, str], *, instance_path: str = DEFAULT_INSTANCE_PATH
    ) -> None:
        env = _MappingEnv(environ)
        text, integer, boolean = env.str, env.int, env.bool

        def choice(name: str, default: str, *choices: str) -> str:
            """One of ``choices`` in any letter case, kept in lower case for every check."""
            value = text(name, default, validate=_one_of(*choices))
            return value.lower() if value else default

        self.APP_ENV = choice("APP_ENV", "development", "development", "production")
        self.SECRET_KEY = text("SECRET_KEY", None)
        default_db = "sqlite:///" + os.path.join(instance_path, "sessions.sqlite3")
        self.SQLALCHEMY_DATABASE_URI = normalise_database_url(text("DATABASE_URL", default_db))
        self.DATABASE_STATEMENT_TIMEOUT_MS = integer(
            "DATABASE_STATEMENT_TIMEOUT_MS", 5000, validate=AT_LEAST_ONE
        )
        self.DATABASE_LOCK_TIMEOUT_MS = integer(
            "DATABASE_LOCK_TIMEOUT_MS", 2000, validate=AT_LEAST_ONE
        )
        self.DATABASE_CONNECT_TIMEOUT_SECONDS = integer(
            "DATABASE_CONNECT_TIMEOUT_SECONDS", 3, validate=AT_LEAST_ONE
        )

        origins = env.list("CORS_ORIGINS", ["http://localhost:3000", "http://127.0.0.1:3000"])
        self.CORS_ORIGINS = [origin.strip() for origin in origins or [] if origin.strip()]
        # docs/decisions.md, "Rate limits", explains these defaults.
        self.SESSION_RATE_LIMIT = text("SESSION_RATE_LIMIT", "10/minute", validate=_rate_limit)
        self.RESUME_RATE_LIMIT = text("RESUME_RATE_LIMIT", "60/minute", validate=_rate_limit)
        self.RESUME_IP_RATE_LIMIT = text("RESUME_IP_RATE_LIMIT", "600/minute", validate=_rate_limit)
        self.SESSION_RESOURCE_RATE_LIMIT = text(
            "SESSION_RESOURCE_RATE_LIMIT", "60/minute", validate=_rate_limit
        )
        self.RATELIMIT_STORAGE_URI = text("RATELIMIT_STORAGE_URI", "memory://")
        self.RATELIMIT_STORAGE_TIMEOUT_SECONDS = integer(
            "RATELIMIT_STORAGE_TIMEOUT_SECONDS", 1, validate=AT_LEAST_ONE
        )
        self.RATELIMIT_KEY_PREFIX = text("RATELIMIT_KEY_PREFIX", "session-api")
        # "10/minute" means any 60 seconds: a fixed window would let 20 through across its edge.
        self.RATELIMIT_STRATEGY = "moving-window"
        # Retry-After goes only on 429 and 503 (the app sets it); X-RateLimit-* headers would
        # cost a counter read on every request for a client that never reads them.
        self.RATELIMIT_HEADERS_ENABLED = False
        self.TRUSTED_PROXY_COUNT = integer("TRUSTED_PROXY_COUNT", 0, validate=NOT_NEGATIVE)

        self.MAX_JSON_BODY_KB = integer("MAX_JSON_BODY_KB", 64, validate=AT_LEAST_ONE)

        self.STORAGE_BACKEND = choice("STORAGE_BACKEND", "local", "local", "s3")
        self.STORAGE_LOCAL_ROOT = text("STORAGE_LOCAL_ROOT", os.path.join(instance_path, "storage"))
        self.S3_BUCKET = text("S3_BUCKET", None)
        self.S3_REGION = text("S3_REGION", None)
        self.S3_ENDPOINT_URL = text("S3_ENDPOINT_URL", None)
        self.S3_CONNECT_TIMEOUT_SECONDS = integer(
            "S3_CONNECT_TIMEOUT_SECONDS", 2, validate=AT_LEAST_ONE
        )
        self.S3_READ_TIMEOUT_SECONDS = integer("S3_READ_TIMEOUT_SECONDS", 5, validate=AT_LEAST_ONE)
        self.S3_MAX_ATTEMPTS = integer("S3_MAX_ATTEMPTS", 2, validate=AT_LEAST_ONE)
        self.DOWNLOAD_URL_EXPIRES_SECONDS = integer(
            "DOWNLOAD_URL_EXPIRES_SECONDS", 900, validate=AT_LEAST_ONE
        )
        self.MAX_UPLOAD_MB = integer("MAX_UPLOAD_MB", 5, validate=AT_LEAST_ONE)
        self.MAX_FILES_PER_SESSION = integer("MAX_FILES_PER_SESSION", 3, validate=AT_LEAST_ONE)
        self.UPLOAD_RATE_LIMIT = text("UPLOAD_RATE_LIMIT", "30/minute", validate=_rate_limit)

        self.MAIL_BACKEND = choice("MAIL_BACKEND", "console", "console", "smtp")
        self.SMTP_HOST = text("SMTP_HOST", None)
        self.SMTP_PORT = integer("SMTP_PORT", 587, validate=AT_LEAST_ONE)
        self.SMTP_USERNAME = text("SMTP_USERNAME", None)
        self.SMTP_PASSWORD = text("SMTP_PASSWORD", None)
        self.SMTP_SSL = boolean("SMTP_SSL", False)
        # Implicit TLS needs no upgrade; asking for both explicitly is a mistake worth naming.
        self.SMTP_STARTTLS = boolean("SMTP_STARTTLS", not self.SMTP_SSL)
        self.SMTP_TIMEOUT_SECONDS = integer("SMTP_TIMEOUT_SECONDS", 10, validate=AT_LEAST_ONE)
        self.MAIL_FROM = text("MAIL_FROM", "no-reply@localhost")
        self.SERVICE_NAME = text("SERVICE_NAME", "Chat Assistant")

        self.EMAIL_CODE_TTL_MINUTES = integer("EMAIL_CODE_TTL_MINUTES", 10, validate=AT_LEAST_ONE)
        self.EMAIL_CODE_MAX_ATTEMPTS = integer("EMAIL_CODE_MAX_ATTEMPTS", 3, validate=AT_LEAST_ONE)
        self.EMAIL_SEND_COOLDOWN_SECONDS = integer(
            "EMAIL_SEND_COOLDOWN_SECONDS", 30, validate=NOT_NEGATIVE
        )
        self.EMAIL_SENDS_PER_SESSION_PER_HOUR = integer(
            "EMAIL_SENDS_PER_SESSION_PER_HOUR", 3, validate=AT_LEAST_ONE
        )
        # Per mailbox (plus-tags folded): a share per client network under a ceiling across all
        # networks, so that a stranger's network cannot use up the owner's codes.
        self.EMAIL_SENDS_PER_ADDRESS_PER_NETWORK_PER_DAY = integer(
            "EMAIL_SENDS_PER_ADDRESS_PER_NETWORK_PER_DAY", 5, validate=AT_LEAST_ONE
        )
        self.EMAIL_SENDS_PER_ADDRESS_PER_DAY = integer(
            "EMAIL_SENDS_PER_ADDRESS_PER_DAY", 20, validate=AT_LEAST_ONE
        )
        self.EMAIL_RATE_LIMIT = text("EMAIL_RATE_LIMIT", "10/minute", validate=_rate_limit)

        # Data requests by address (CONTRACT section 8): a person makes a handful a year.
        self.DATA_REQUEST_TOKEN_MINUTES = integer(
            "DATA_REQUEST_TOKEN_MINUTES", 15, validate=AT_LEAST_ONE
        )
        # Where the API is reached from outside: download links in an export made from the CLI.
        self.PUBLIC_BASE_URL = text("PUBLIC_BASE_URL", "http://localhost:5000")
        self.DATA_REQUEST_RATE_LIMIT = text(
            "DATA_REQUEST_RATE_LIMIT", "10/hour;3/minute", validate=_rate_limit
        )

        self.ABANDONED_SESSION_MINUTES = integer(
            "ABANDONED_SESSION_MINUTES", 24 * 60, validate=AT_LEAST_ONE
        )
        self.ABANDONED_PURGE_INTERVAL_MINUTES = integer(
            "ABANDONED_PURGE_INTERVAL_MINUTES", 30, validate=AT_LEAST_ONE
        )

        self.CONSENT_WORDING_VERSION = text("CONSENT_WORDING_VERSION", "v1")
        self.DATA_RETENTION_DAYS = integer("DATA_RETENTION_DAYS", 180, validate=AT_LEAST_ONE)
        self.AUDIT_RETENTION_DAYS = integer("AUDIT_RETENTION_DAYS", 365, validate=AT_LEAST_ONE)
        self.RETENTION_INTERVAL_MINUTES = integer(
            "RETENTION_INTERVAL_MINUTES", 24 * 60, validate=AT_LEAST_ONE
        )

        self.ADMIN_EMAIL = text("ADMIN_EMAIL", None)
        self.ADMIN_NOTIFY_DEDUP_MINUTES = integer(
            "ADMIN_NOTIFY_DEDUP_MINUTES", 15, validate=NOT_NEGATIVE
        )
        self.SUSPICIOUS_WINDOW_MINUTES = integer(
            "SUSPICIOUS_WINDOW_MINUTES", 10, validate=AT_LEAST_ONE
        )
        self.SUSPICIOUS_FAILED_CODES = integer("SUSPICIOUS_FAILED_CODES", 6, validate=AT_LEAST_ONE)
        self.SUSPICIOUS_RATE_LIMIT_HITS = integer(
            "SUSPICIOUS_RATE_LIMIT_HITS", 20, validate=AT_LEAST_ONE
        )

        self.SCHEDULER_ENABLED = boolean("SCHEDULER_ENABLED", True)
        self.ORPHAN_SWEEP_INTERVAL_MINUTES = integer(
            "ORPHAN_SWEEP_INTERVAL_MINUTES", 30, validate=AT_LEAST_ONE
        )
        self.ORPHAN_MIN_AGE_MINUTES = integer("ORPHAN_MIN_AGE_MINUTES", 30, validate=NOT_NEGATIVE)

        # Interactive API docs at /api/v1/docs: on in development, opt-in in production.
        self.API_DOCS_ENABLED = boolean("API_DOCS_ENABLED", self.APP_ENV != "production")
        self.METRICS_ENABLED = boolean("METRICS_ENABLED", True)
        self.METRICS_TOKEN = text("METRICS_TOKEN", None) or None
        self.METRICS_SESSION_COUNT_SECONDS = integer(
            "METRICS_SESSION_COUNT_SECONDS", 15, validate=NOT_NEGATIVE
        )
        # /ready answers from a verdict this recent, and checks within this bound.
        self.READY_CACHE_SECONDS = integer("READY_CACHE_SECONDS", 5, validate=NOT_NEGATIVE)
        self.READY_TIMEOUT_SECONDS = integer("READY_TIMEOUT_SECONDS", 3, validate=AT_LEAST_ONE)
        # prometheus-client reads it from the environment; gunicorn.conf.py sets one if unset.
        self.PROMETHEUS_MULTIPROC_DIR = text("PROMETHEUS_MULTIPROC_DIR", None) or None

        self.LOG_LEVEL = choice("LOG_LEVEL", "info", "debug", "info", "warning", "error").upper()

        # gunicorn.conf.py serves with these; a request's deadline must fit inside the timeout.
        self.GUNICORN_BIND = text("GUNICORN_BIND", "0.0.0.0:8000")
        self.WEB_CONCURRENCY = integer(
            "WEB_CONCURRENCY", (os.cpu_count() or 1) * 2 + 1, validate=AT_LEAST_ONE
        )
        self.GUNICORN_THREADS = integer("GUNICORN_THREADS", 1, validate=AT_LEAST_ONE)
        self.GUNICORN_TIMEOUT = integer("GUNICORN_TIMEOUT", 60, validate=AT_LEAST_ONE)
        default_deadline = max(1, int((self.GUNICORN_TIMEOUT or 0) * DEFAULT_DEADLINE_SHARE))
        self.REQUEST_DEADLINE_SECONDS = integer(
            "REQUEST_DEADLINE_SECONDS", default_deadline, validate=AT_LEAST_ONE
        )
        self.GUNICORN_CERTFILE = text("GUNICORN_CERTFILE", None)
        self.GUNICORN_KEYFILE = text("GUNICORN_KEYFILE", None)

        problems = _parse_problems(env, environ)
        problems += self._combination_problems({problem.split(":", 1)[0] for problem in problems})
        if problems:
            raise ConfigError(problems)
        self._derive()

    def _combination_problems(self, malformed: set[str]) -> list[str]:
        """What is wrong with values that are each valid on their own.

        A check whose variables did not parse is skipped: their own problem is reported.
        """

        def parsed(*names: str) -> bool:
            return not malformed.intersection(names)

        problems = []
        if self.APP_ENV == "production":
            if self.SECRET_KEY is None:
                problems.append("SECRET_KEY is required in production")
            elif len(self.SECRET_KEY) < MIN_PRODUCTION_SECRET_LENGTH:
                problems.append(
                    f"SECRET_KEY must be at least {MIN_PRODUCTION_SECRET_LENGTH} characters "
                    "in production"
                )
            if self.SQLALCHEMY_DATABASE_URI.startswith("sqlite"):
                problems.append("DATABASE_URL must point at PostgreSQL in production")
            if "*" in self.CORS_ORIGINS:
                problems.append("CORS_ORIGINS may not be * in production")
            if self.MAIL_BACKEND == "console":
                problems.append("MAIL_BACKEND must be smtp in production")
            if self.METRICS_ENABLED and self.METRICS_TOKEN is None:
                problems.append(
                    "METRICS_TOKEN is required in production while /metrics is served; "
                    "set one, or METRICS_ENABLED=false"
                )
            elif (
                self.METRICS_ENABLED
                and len(self.METRICS_TOKEN or "") < MIN_PRODUCTION_SECRET_LENGTH
            ):
                problems.append(
                    f"METRICS_TOKEN must be at least {MIN_PRODUCTION_SECRET_LENGTH} characters "
                    "in production"
                )
        if self.STORAGE_BACKEND == "s3" and self.S3_BUCKET is None:
            problems.append("S3_BUCKET is required when STORAGE_BACKEND=s3")
        if self.MAIL_BACKEND == "smtp" and self.SMTP_HOST is None:
            problems.append("SMTP_HOST is required when MAIL_BACKEND=smtp")
        if self.SMTP_SSL and self.SMTP_STARTTLS:
            problems.append("SMTP_SSL and SMTP_STARTTLS are exclusive; choose one")
        if (
            parsed("DATABASE_LOCK_TIMEOUT_MS", "DATABASE_STATEMENT_TIMEOUT_MS")
            and self.DATABASE_LOCK_TIMEOUT_MS >= self.DATABASE_STATEMENT_TIMEOUT_MS
        ):
            problems.append(
                "DATABASE_LOCK_TIMEOUT_MS must be below DATABASE_STATEMENT_TIMEOUT_MS, so that "
                "a wait for a lock is told apart from a database that does not answer"
            )
        if (
            parsed("REQUEST_DEADLINE_SECONDS", "GUNICORN_TIMEOUT")
            and self.REQUEST_DEADLINE_SECONDS
            > self.GUNICORN_TIMEOUT * DEADLINE_SHARE_OF_WORKER_TIMEOUT
        ):
            problems.append(
                f"REQUEST_DEADLINE_SECONDS ({self.REQUEST_DEADLINE_SECONDS}) must be at most "
                f"{DEADLINE_SHARE_OF_WORKER_TIMEOUT:.0%} of GUNICORN_TIMEOUT "
                f"({self.GUNICORN_TIMEOUT}), so that a request past its deadline is answered "
                "before gunicorn kills its worker: lower it or raise GUNICORN_TIMEOUT"
            )
        return problems

    def _derive(self) -> None:
        """Settings computed from the ones read."""
        # A per-process random key keeps development usable without a shared secret.
        self.SECRET_KEY = self.SECRET_KEY or secrets.token_hex(32)
        self.MAX_CONTENT_LENGTH = self.MAX_JSON_BODY_KB * 1024
        # Rate limits must not become an outage: a Redis that does not answer in time is given up
        # on (the request is allowed) and, until it is back, each process counts in memory.
        self.RATELIMIT_SWALLOW_ERRORS = True
        self.RATELIMIT_IN_MEMORY_FALLBACK_ENABLED = True
        if self.RATELIMIT_STORAGE_URI.startswith(("redis", "rediss")):
            timeout = self.RATELIMIT_STORAGE_TIMEOUT_SECONDS
            self.RATELIMIT_STORAGE_OPTIONS = {
                "socket_connect_timeout": timeout,
                "socket_timeout": timeout,
            }
        self.SQLALCHEMY_ENGINE_OPTIONS = _engine_options(
            self.SQLALCHEMY_DATABASE_URI,
            statement_timeout_ms=self.DATABASE_STATEMENT_TIMEOUT_MS,
            lock_timeout_ms=self.DATABASE_LOCK_TIMEOUT_MS,
            connect_timeout_s=self.DATABASE_CONNECT_TIMEOUT_SECONDS,
        )
        # A second pool on the same database whose connections commit every statement as it
        # runs: a request that is one statement then needs no BEGIN and no COMMIT round trip.
        # A pool of its own, because switching a pooled connection to autocommit and back
        # costs a round trip each time it is returned (docs/decisions.md, "Statements alone").
        self.SQLALCHEMY_BINDS = (
            {
                AUTOCOMMIT_BIND: {
                    **self.SQLALCHEMY_ENGINE_OPTIONS,
                    "url": self.SQLALCHEMY_DATABASE_URI,
                    "isolation_level": "AUTOCOMMIT",
                }
            }
            if self.SQLALCHEMY_DATABASE_URI.startswith("postgresql")
            else {}
        )
        self.OPENAPI_VERSION = "3.1.0"
        self.OPENAPI_URL_PREFIX = "/api/v1"
        self.OPENAPI_JSON_PATH = "openapi.json"
        self.API_TITLE = "Chat session service"
        self.API_VERSION = "v1"
        self.warnings: list[str] = []
        if self.APP_ENV == "production" and self.RATELIMIT_STORAGE_URI.startswith("memory"):
            self.warnings.append(
                "RATELIMIT_STORAGE_URI is memory://: every worker process counts on its own, so "
                "each rate limit applies per worker; set it to a Redis URL to share the counters"
            )

    def as_mapping(self) -> dict[str, Any]:
        """The upper-case settings, ready for ``app.config``."""
        return {key: value for key, value in vars(self).items() if key.isupper()}


def _parse_problems(env: environs.Env, environ: Mapping[str, str]) -> list[str]:
    """One line per malformed variable, quoting the value unless it is a secret."""
    try:
        env.seal()
    except environs.EnvValidationError as exc:
        problems = []
        by_name = exc.error_messages if isinstance(exc.error_messages, Mapping) else {}
        for name, messages in by_name.items():
            quoted = "" if name in SECRET_VARIABLES else f" (got {environ.get(name, '')!r})"
            problems.append(f"{name}: {' '.join(dict.fromkeys(messages))}{quoted}")
        return problems
    return []


# The SQLAlchemy bind (engine) whose connections run each statement in its own transaction.
AUTOCOMMIT_BIND = "autocommit"


def normalise_database_url(url: str) -> str:
    """Send plain PostgreSQL URLs to the driver the project installs (psycopg2).

    SQLAlchemy maps a bare ``postgresql://`` to psycopg 3, and hosting platforms hand out
    ``postgres://``; both mean "PostgreSQL" to an operator. A URL naming its driver is kept.
    """
    for scheme in ("postgres://", "postgresql://"):
        if url.startswith(scheme):
            return "postgresql+psycopg2://" + url.removeprefix(scheme)
    return url


def _engine_options(
    url: str, *, statement_timeout_ms: int, lock_timeout_ms: int, connect_timeout_s: int
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
                "options": (
                    f"-c statement_timeout={statement_timeout_ms} -c lock_timeout={lock_timeout_ms}"
                ),
                "application_name": "chat-session-service",
                # A partitioned server sends no reset: unacknowledged data gives up after
                # tcp_user_timeout, and an idle pooled connection is found dead by keepalives
                # instead of by the next request (docs/decisions.md, "One deadline per request").
                "keepalives": 1,
                "keepalives_idle": 30,
                "keepalives_interval": 5,
                "keepalives_count": 3,
                "tcp_user_timeout": connect_timeout_s * 1000 + statement_timeout_ms,
            },
        }
    if url.startswith("sqlite"):
        # SQLite's only wait is for the write lock; its busy timeout is the lock timeout.
        return {"connect_args": {"timeout": lock_timeout_ms / 1000}, "hide_parameters": True}
    return {"hide_parameters": True}
