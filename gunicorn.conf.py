"""gunicorn settings for production: ``gunicorn wsgi:app`` reads this file from the project folder.

The master checks the whole configuration before any worker starts, so a mistake is reported
once, one line per problem, instead of once per worker boot.
"""

import logging
import os
import tempfile

from dotenv import load_dotenv

from config import Config, ConfigError

load_dotenv()
try:
    settings = Config(os.environ)
except ConfigError as error:
    from app.logging_setup import exit_for_config_error

    exit_for_config_error(error)

# prometheus-client chooses its multiprocess mode when it is first imported, which the app's
# imports below do (and the workers inherit): the directory must be in the environment first.
# Without one named, each server gets a fresh one (kept across a reload, which re-reads this
# file), so two servers on a host never count into each other's files.
metrics_dir = settings.PROMETHEUS_MULTIPROC_DIR or tempfile.mkdtemp(prefix="session-metrics-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir

from app.serving import (  # noqa: E402
    JsonGunicornLogger,
    clear_metrics_dir,
    log_worker_abort,
    watch_server_problems,
)

bind = settings.GUNICORN_BIND
workers = settings.WEB_CONCURRENCY
threads = settings.GUNICORN_THREADS
# Every outbound call has its own shorter timeout, and the app refuses settings whose sum for
# one request comes near this one (docs/decisions.md, "Time budget"): this only catches a bug.
timeout = settings.GUNICORN_TIMEOUT
graceful_timeout = 30
keepalive = 5
# Request-line and header bounds, so a client cannot hold a worker with a giant header. The
# request line may be as long as gunicorn allows (8190 bytes), so that the app sees every path it
# could and answers it in JSON (a link longer than any it issues is a JSON 404); only a longer
# line gets gunicorn's own HTML 414, before the app is reached (docs/decisions.md).
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
# TLS straight from gunicorn, when no TLS-terminating proxy stands in front.
certfile = settings.GUNICORN_CERTFILE
keyfile = settings.GUNICORN_KEYFILE
# The app writes its own JSON access log without session UUIDs; gunicorn's would log raw paths.
accesslog = None
errorlog = "-"
loglevel = settings.LOG_LEVEL.lower()
logger_class = JsonGunicornLogger
# gunicorn's control socket sits at one path per user, which two servers on a host would share;
# nothing here uses it.
control_socket_disable = True


def on_starting(server):
    """Start from empty metrics; report the master's warnings and errors to the admin."""
    # A previous run's figures would be summed into this one's.
    clear_metrics_dir(metrics_dir)
    logging.getLogger("gunicorn.error").info("metrics directory: %s", metrics_dir)
    watch_server_problems(os.getcwd(), settings.ADMIN_NOTIFY_DEDUP_MINUTES * 60)


def worker_abort(worker):
    """A worker past its timeout: log where it was stuck before gunicorn ends it."""
    log_worker_abort()
