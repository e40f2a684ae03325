"""gunicorn settings for production: ``gunicorn wsgi:app`` reads this file."""

import multiprocessing
import os

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", multiprocessing.cpu_count() * 2 + 1))
threads = int(os.environ.get("GUNICORN_THREADS", "1"))
# Every external call has its own shorter timeout; this only catches a stuck worker.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = 30
keepalive = 5
# Request-line and header bounds, so a client cannot hold a worker with a giant header.
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190
# TLS straight from gunicorn, when no TLS-terminating proxy stands in front.
certfile = os.environ.get("GUNICORN_CERTFILE") or None
keyfile = os.environ.get("GUNICORN_KEYFILE") or None
# The app writes its own JSON access log without session UUIDs; gunicorn's would log raw paths.
accesslog = None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
