"""One JSON object per log line on standard error, session UUIDs and e-mail addresses redacted."""

from __future__ import annotations

import logging
import re
import sys
from collections import deque
from typing import Any, NoReturn

from pythonjsonlogger.json import JsonFormatter

from config import ConfigError

_HANDLER_NAME = "app-json"
RECENT_LINES_KEPT = 50

_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_EMAIL = re.compile(r"[\w.+%-]+@[\w-]+(?:\.[\w-]+)+")
# A download link's token (Fernet: URL-safe base64 of a 0x80 version byte and a timestamp) is
# a credential for one file until it expires; gunicorn quotes it in "Error handling request".
_TOKEN = re.compile(r"gAAAAA[\w=-]{20,}")
# Fields the app sets itself and that are safe by construction (a correlation id is a UUID).
_TRUSTED_FIELDS = frozenset({"time", "level", "logger", "correlation_id"})


def redact(value: Any) -> Any:
    """``value`` with every UUID, e-mail address and link token replaced by a placeholder.

    Library lines (gunicorn's "Error handling request <path>", driver errors, tracebacks)
    quote whatever they were given; a session UUID or an address must not reach a log.
    """
    if isinstance(value, str):
        return _TOKEN.sub("<token>", _EMAIL.sub("<email>", _UUID.sub("<uuid>", value)))
    if isinstance(value, dict):
        return {key: redact(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    return value


class RedactingJsonFormatter(JsonFormatter):
    """A JSON line per record; tracebacks are one field, personal identifiers are redacted."""

    def __init__(self) -> None:
        super().__init__(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        return {
            key: value if key in _TRUSTED_FIELDS else redact(value)
            for key, value in log_data.items()
        }


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of each record.

    A handler that kept the stream it was created with would write into a closed file once
    that stream is swapped out (as click's test runner and gunicorn's log reopening do).
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        return


class RecentProblems(logging.Handler):
    """Keeps the last warnings and errors of this process, for admin notifications."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.lines: deque[str] = deque(maxlen=RECENT_LINES_KEPT)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(redact(f"{record.levelname} {record.name}: {record.getMessage()}"))


recent_problems = RecentProblems()


def configure_logging(level: str) -> None:
    """Send every log record to stderr as JSON; safe to call more than once."""
    root = logging.getLogger()
    root.setLevel(level)
    if not any(handler.get_name() == _HANDLER_NAME for handler in root.handlers):
        handler = _StderrHandler()
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(RedactingJsonFormatter())
        root.addHandler(handler)
        root.addHandler(recent_problems)
    # No line names a thread, a process or a source line, so records need not collect them:
    # the savings the logging HOWTO ("Optimization") documents for code that logs on every
    # request. Finding the caller's source line walks the stack on every record.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    # The development server logs raw paths, which carry session UUIDs; our access log replaces it.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # flask-limiter names the client address of every refusal; refusals are audited instead.
    logging.getLogger("flask-limiter").setLevel(max(root.level, logging.WARNING))
    # The scheduler's own set-up chatter names no job; the executor's lines, which do, stay.
    logging.getLogger("apscheduler.scheduler").setLevel(max(root.level, logging.WARNING))


def exit_for_config_error(error: ConfigError) -> NoReturn:
    """Report every configuration problem, one JSON line each and no traceback, then exit."""
    configure_logging("INFO")
    log = logging.getLogger("config")
    for problem in error.problems:
        log.error(problem)
    raise SystemExit(2)
