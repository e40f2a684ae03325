"""gunicorn integration: its own lines as JSON, and its worker failures reported to the admin.

``gunicorn.conf.py`` installs these. The master process loads no app; when it logs a warning
or an error (a worker timed out, was killed or crashed), it starts ``flask notify-admin`` in a
separate process, which mails the admin through the same deduplicated path as every other
notification. A worker that times out logs where it was stuck before gunicorn ends it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

from flask import has_request_context, request
from gunicorn.glogging import Logger as GunicornLogger

from app.logging_setup import configure_logging

log = logging.getLogger(__name__)


class JsonGunicornLogger(GunicornLogger):
    """gunicorn's error log through the app's JSON handler on the root logger."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        configure_logging(cfg.loglevel.upper())
        for handler in list(self.error_log.handlers):
            self.error_log.removeHandler(handler)
        self.error_log.propagate = True


class ServerProblemAlerts(logging.Handler):
    """In the master only: each warning or error gunicorn logs becomes an admin notification."""

    def __init__(self, project_dir: str, window_seconds: float) -> None:
        super().__init__(level=logging.WARNING)
        self.master_pid = os.getpid()
        self.project_dir = project_dir
        self.window_seconds = window_seconds
        self._last_reported: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        # Workers inherit this handler when they are forked; only the master reports.
        if os.getpid() != self.master_pid:
            return
        # A crash loop must not start a process per crash: one per kind of line per window.
        now = time.monotonic()
        last = self._last_reported.get(str(record.msg))
        if last is not None and now - last < self.window_seconds:
            return
        self._last_reported[str(record.msg)] = now
        command = [sys.executable, "-m", "flask", "--app", "wsgi", "notify-admin"]
        command += [f"gunicorn: {record.getMessage()}", "--signature", f"gunicorn:{record.msg}"]
        # A separate process: the master keeps no app, no database pool and no mail client.
        # gunicorn reaps it with its workers.
        subprocess.Popen(command, cwd=self.project_dir, stdin=subprocess.DEVNULL)  # noqa: S603


def clear_metrics_dir(path: str) -> None:
    """Make ``path`` an empty directory for prometheus-client's per-worker metric files."""
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.remove(os.path.join(path, name))


def watch_server_problems(project_dir: str, window_seconds: float) -> None:
    """Attach ServerProblemAlerts to gunicorn's error log (call in the master)."""
    logging.getLogger("gunicorn.error").addHandler(ServerProblemAlerts(project_dir, window_seconds))


def log_worker_abort() -> None:
    """Log where a worker's threads were when gunicorn's timeout ended it (runs in the worker).

    The hook runs in the worker's main thread. With sync workers that is the thread serving
    the request; with threaded workers it is not, so the stack of every thread is logged.
    """
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    stacks = {
        f"{names.get(ident, 'unknown')} ({ident})": "".join(traceback.format_stack(frame))
        for ident, frame in sys._current_frames().items()
    }
    in_request = has_request_context()
    log.error(
        "worker timed out",
        extra={
            "route": request.url_rule.rule if in_request and request.url_rule else None,
            "method": request.method if in_request else None,
            "threads": stacks,
        },
    )
