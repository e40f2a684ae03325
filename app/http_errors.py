"""The one place that turns any error into the contract's JSON shape, alerting and counting.

Domain errors (app.errors) carry their status and code; this module, on the HTTP floor, answers
them, the framework's own HTTP errors and anything unexpected, tells the administrator of every
5xx and records rate-limit refusals.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Flask, Response, g, jsonify, request
from flask_limiter.errors import RateLimitExceeded
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from app import metrics
from app.deadline import DeadlineExceeded
from app.errors import DependencyTimeout, DomainError, RateLimited, SessionBusy
from app.extensions import db, limiter
from app.messages import GENERAL_ERROR
from app.middleware import request_audit_context
from app.rate_limits import seconds_until
from app.request_context import current_correlation_id
from app.services import admin_alerts, security_monitor

log = logging.getLogger(__name__)

# Codes for errors that the framework, not our services, raises.
HTTP_ERROR_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}
HTTP_ERROR_MESSAGES = {
    400: "The request is malformed.",
    404: "No such endpoint.",
    405: "This method is not allowed on this endpoint.",
    413: "The request body is too large.",
    415: "Unsupported content type.",
    429: "Too many requests. Please wait before trying again.",
}


def error_response(
    status_code: int,
    error: str,
    message: str,
    details: dict[str, Any] | None = None,
) -> Response:
    """The contract's error body with the given status."""
    body: dict[str, Any] = {
        "status": "error",
        "error": error,
        "message": message,
        "correlation_id": current_correlation_id(),
    }
    if details:
        body["details"] = details
    # The e-mail verification screens show `error` to the user word for word: there it is the
    # sentence, the machine code moves to `code`, and the screen to go to comes along. Those
    # screens only read 200 answers, so a dependency that is down (503) is answered 200 there,
    # the user staying on the screen to try again.
    if "error_transition" in g:
        body.update(error=message, code=error, nextTransition=g.error_transition)
        if status_code == 503:
            status_code = 200
    response = jsonify(body)
    response.status_code = status_code
    return response


def with_retry_after(response: Response, seconds: int) -> Response:
    """Tell the client when to retry, on the answers that carry that (429 and 503)."""
    if response.status_code in (429, 503):
        response.headers["Retry-After"] = str(seconds)
    return response


def _validation_details(exc: HTTPException) -> dict[str, Any] | None:
    """Field errors that webargs attached to a 400, keyed by field (``body`` for the whole)."""
    messages = getattr(exc, "data", {}).get("messages")
    if not isinstance(messages, dict):
        return None
    details: dict[str, Any] = {}
    for location_errors in messages.values():
        if isinstance(location_errors, dict):
            for field, problems in location_errors.items():
                details["body" if field == "_schema" else field] = problems
        else:
            details["body"] = location_errors
    return details


def handle_domain_error(exc: DomainError) -> Response:
    if exc.status_code >= 500:
        log.error("domain failure", extra={"error": exc.error}, exc_info=exc)
        admin_alerts.report_exception(exc, status=exc.status_code)
    response = error_response(exc.status_code, exc.error, exc.message, exc.details)
    if exc.status_code == 503:
        with_retry_after(response, exc.retry_after)
    if exc.status_code == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def handle_rate_limited(exc: RateLimited) -> Response:
    # Whatever the request had begun is abandoned; the refusal itself is recorded.
    db.session.rollback()
    metrics.count_refusal(request.url_rule.rule if request.url_rule else None)
    security_monitor.on_rate_limited(exc.limit, request_audit_context())
    response = error_response(429, exc.error, exc.message)
    response.headers["Retry-After"] = str(exc.retry_after)
    return response


def handle_limiter_refusal(exc: RateLimitExceeded) -> Response:
    """flask-limiter's 429, answered like the app's own, with the limit's real reset."""
    current = limiter.current_limit
    # The window's own reset time: flask-limiter's reset_at adds a second for its headers.
    reset_at = current.window.reset_time if current is not None else time.time() + 1
    return handle_rate_limited(
        RateLimited(limit=str(exc.limit.limit), retry_after=seconds_until(reset_at))
    )


def handle_http_exception(exc: HTTPException) -> Response:
    status_code = exc.code or 500
    if status_code >= 500:
        admin_alerts.report_exception(exc, status=status_code)
        return error_response(status_code, "internal_error", GENERAL_ERROR)
    response = error_response(
        status_code,
        HTTP_ERROR_CODES.get(status_code, "http_error"),
        HTTP_ERROR_MESSAGES.get(status_code, exc.description or "Request failed."),
        _validation_details(exc) if status_code == 400 else None,
    )
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def handle_database_unavailable(exc: OperationalError) -> Response:
    if _is_lock_wait(exc):
        # The database answered; the session was held too long by another request.
        log.warning("lock wait timed out", exc_info=exc)
        admin_alerts.report_exception(exc, status=503)
        busy = SessionBusy()
        return with_retry_after(error_response(503, busy.error, busy.message), busy.retry_after)
    log.error("database unavailable", exc_info=exc)
    admin_alerts.report_exception(exc, status=503)
    return with_retry_after(error_response(503, "database_unavailable", GENERAL_ERROR), 5)


def _is_lock_wait(exc: OperationalError) -> bool:
    """The database answered, but a lock was not granted within the lock timeout."""
    # 55P03 is PostgreSQL's lock_not_available; SQLite reports its busy timeout this way.
    return getattr(exc.orig, "pgcode", None) == "55P03" or "database is locked" in str(exc.orig)


def handle_deadline_exceeded(exc: DeadlineExceeded) -> Response:
    log.error("dependency timed out", exc_info=exc)
    admin_alerts.report_exception(exc, status=503)
    timeout = DependencyTimeout()
    return with_retry_after(
        error_response(503, timeout.error, timeout.message), timeout.retry_after
    )


def handle_unexpected(exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc)
    admin_alerts.report_exception(exc, status=500)
    return error_response(500, "internal_error", GENERAL_ERROR)


def register_error_handlers(app: Flask) -> None:
    """Map domain errors, HTTP errors and anything unexpected to JSON."""
    app.register_error_handler(RateLimited, handle_rate_limited)
    app.register_error_handler(RateLimitExceeded, handle_limiter_refusal)
    app.register_error_handler(DomainError, handle_domain_error)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(OperationalError, handle_database_unavailable)
    app.register_error_handler(DeadlineExceeded, handle_deadline_exceeded)
    app.register_error_handler(Exception, handle_unexpected)
