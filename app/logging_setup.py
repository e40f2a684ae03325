"""One JSON object per log line, on standard error."""

from __future__ import annotations

import logging
import sys
from collections import deque

from pythonjsonlogger.json import JsonFormatter

_HANDLER_NAME = "app-json"
RECENT_LINES_KEPT = 50


class RecentProblems(logging.Handler):
    """Keeps the last warnings and errors of this process, for admin notifications."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.lines: deque[str] = deque(maxlen=RECENT_LINES_KEPT)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


recent_problems = RecentProblems()


def configure_logging(level: str) -> None:
    """Send every log record to stderr as JSON; safe to call more than once."""
    root = logging.getLogger()
    root.setLevel(level)
    if any(handler.get_name() == _HANDLER_NAME for handler in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        JsonFormatter(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    )
    root.addHandler(handler)
    root.addHandler(recent_problems)
    # The development server logs raw paths, which carry session UUIDs; our access log replaces it.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
