"""Prometheus metrics: traffic, errors, latency, jobs, e-mails and sessions, for ``GET /metrics``.

Under gunicorn, prometheus-client runs in its multiprocess mode: each worker writes its figures
to files in ``PROMETHEUS_MULTIPROC_DIR`` (gunicorn.conf.py sets and clears it) and a scrape sums
every worker's. Without that directory (the development server) a scrape shows this process.

Labels hold route templates and fixed words only, never a path, a session UUID or anything else
a client sent: a label value a client chooses would also let it grow the series without bound.

This module imports no service: the factory hands it the job names, the routes and the function
that counts sessions. Every series whose labels are known in advance (each job and outcome, each
e-mail kind and outcome, each route) is created at zero when the app is built, so it is in the
first scrape and an alert on it can be written for a fresh deployment.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from flask import Flask, current_app
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from app.models import SessionState

log = logging.getLogger(__name__)

VERIFICATION_CODE_MAIL = "verification_code"
ADMIN_NOTIFICATION_MAIL = "admin_notification"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
JOB_OUTCOMES = ("completed", "failed", "skipped")
MAIL_KINDS = (VERIFICATION_CODE_MAIL, ADMIN_NOTIFICATION_MAIL)
MAIL_OUTCOMES = ("sent", "failed")
# The status a route's error alerts sum over; other statuses appear with their first answer.
_STARTING_STATUS = "500"
# Answered by Flask itself on every route (HEAD as GET, OPTIONS as the CORS preflight).
_IMPLICIT_METHODS = frozenset({"HEAD", "OPTIONS"})

SessionCounter = Callable[[], Mapping[SessionState, int]]

HTTP_REQUESTS = Counter(
    "http_requests_total",
    "HTTP requests answered, by method, route template and status.",
    ["method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "http_request_duration_seconds",
    "Time from the request's start to its answer, by method and route template.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
JOB_RUNS = Counter(
    "job_runs_total",
    "Runs of a scheduled job (or its CLI command) by outcome: completed, failed or skipped "
    "(another process had the job, or a scheduled run was not due).",
    ["job", "outcome"],
)
JOB_DURATION = Histogram(
    "job_duration_seconds",
    "Time a job run took, completed or failed.",
    ["job"],
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 1800),
)
JOB_ITEMS = Counter(
    "job_items_total",
    "What job runs did, by job and the count their report names (folders_deleted, "
    "objects_deleted, sessions_purged, sessions_erased, ...).",
    ["job", "item"],
)
EMAILS = Counter(
    "emails_total",
    "E-mails handed to the mail server, by kind (verification_code, admin_notification) and "
    "outcome (sent, failed).",
    ["kind", "outcome"],
)
RATE_LIMIT_REFUSALS = Counter(
    "rate_limit_refusals_total",
    "Requests refused by a rate limit, by route template.",
    ["route"],
)


def observe_request(method: str, route: str | None, status: int, seconds: float) -> None:
    """Count one answered request and its duration."""
    count, duration = _request_series(method, route, status)
    count.inc()
    duration.observe(seconds)


# Finding a labelled series costs more than counting into it; the set of (method, route,
# status) is small and fixed by the routes, so each is looked up once per process.
@functools.lru_cache(maxsize=1024)
def _request_series(method: str, route: str | None, status: int) -> tuple[Any, Any]:
    method = method if method in _METHODS else "other"
    route = route or "unmatched"
    return (
        HTTP_REQUESTS.labels(method, route, str(status)),
        HTTP_DURATION.labels(method, route),
    )


def observe_job(
    job: str, outcome: str, seconds: float | None, counts: Mapping[str, object]
) -> None:
    """Count one job run, its duration and the counts of its report."""
    JOB_RUNS.labels(job, outcome).inc()
    if seconds is not None:
        JOB_DURATION.labels(job).observe(seconds)
    for item, value in counts.items():
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            JOB_ITEMS.labels(job, item).inc(value)


def count_email(kind: str, sent: bool) -> None:
    """Count one e-mail handed to the mail server, or one it refused."""
    EMAILS.labels(kind, "sent" if sent else "failed").inc()


def count_refusal(route: str | None) -> None:
    """Count one request refused by a rate limit."""
    RATE_LIMIT_REFUSALS.labels(route or "unmatched").inc()


class SessionsByState(Collector):
    """Live sessions by state, counted by a query at most once per ``max_age`` seconds.

    A scrape every few seconds from several Prometheus servers must not become a query each:
    the count is kept per process for ``METRICS_SESSION_COUNT_SECONDS``.
    """

    def __init__(self, app: Flask, count_sessions: SessionCounter) -> None:
        self._app = app
        self._count_sessions = count_sessions
        self._lock = threading.Lock()
        self._counted_at = float("-inf")
        self._counts: dict[str, int] | None = None

    def collect(self) -> Iterator[Metric]:
        counts = self._current_counts()
        if counts is None:
            return
        family = GaugeMetricFamily(
            "sessions", "Live sessions by state (pending, verified).", labels=["state"]
        )
        for state, count in sorted(counts.items()):
            family.add_metric([state], count)
        yield family

    def _current_counts(self) -> dict[str, int] | None:
        with self._lock:
            max_age = self._app.config["METRICS_SESSION_COUNT_SECONDS"]
            if time.monotonic() - self._counted_at < max_age:
                return self._counts
            try:
                with self._app.app_context():
                    counted = self._count_sessions()
                self._counts = {state.value: count for state, count in counted.items()}
            except SQLAlchemyError:
                # A scrape still reports traffic and jobs while the database is down, and the
                # next scrapes in the window do not wait for it again.
                log.warning("sessions by state not counted: database unavailable")
                self._counts = None
            self._counted_at = time.monotonic()
            return self._counts


class _ThisProcess(Collector):
    """The figures this process holds (no multiprocess directory: the development server)."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def init_app(app: Flask, *, jobs: Iterable[str], count_sessions: SessionCounter) -> None:
    """Keep the registry a scrape reads, and start every series known in advance at zero.

    ``jobs`` are the scheduled jobs' names; ``count_sessions`` counts live sessions by state.
    Call it once the routes are registered: each of them gets its series too.
    """
    registry = CollectorRegistry(auto_describe=False)
    directory = app.config["PROMETHEUS_MULTIPROC_DIR"]
    if directory:
        # A CLI process may start before gunicorn ever made the directory.
        os.makedirs(directory, exist_ok=True)
        multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    else:
        registry.register(_ThisProcess())
    registry.register(SessionsByState(app, count_sessions))
    app.extensions["metrics_registry"] = registry
    _start_at_zero(jobs, _routes(app))


def _routes(app: Flask) -> list[tuple[str, str]]:
    """Every (method, route template) the app answers, leaving out the methods Flask adds."""
    return [
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        for method in (rule.methods or set()) - _IMPLICIT_METHODS
    ]


def _start_at_zero(jobs: Iterable[str], routes: Iterable[tuple[str, str]]) -> None:
    """Create the series whose labels are known in advance, at zero.

    Under gunicorn each worker writes its zeros to its own file when it builds the app, so the
    first scrape of a fresh server shows them whichever worker answers it.
    """
    for job in jobs:
        for outcome in JOB_OUTCOMES:
            JOB_RUNS.labels(job, outcome)
        # The histogram too: its _count is the runs that took time (completed or failed).
        JOB_DURATION.labels(job)
    for kind in MAIL_KINDS:
        for outcome in MAIL_OUTCOMES:
            EMAILS.labels(kind, outcome)
    for method, route in routes:
        HTTP_REQUESTS.labels(method, route, _STARTING_STATUS)
        HTTP_DURATION.labels(method, route)
        RATE_LIMIT_REFUSALS.labels(route)


def exposition(accept: str) -> tuple[bytes, str]:
    """The metrics and their content type, in the format the scraper's Accept header asks for."""
    encoder, content_type = choose_encoder(accept)
    return encoder(current_app.extensions["metrics_registry"]), content_type
