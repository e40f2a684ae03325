"""Per-request plumbing: correlation ids, client address, response headers and the access log."""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Flask, Request, Response, current_app, g, request
from flask.json.provider import DefaultJSONProvider
from flask.sessions import SecureCookieSessionInterface
from werkzeug.middleware.proxy_fix import ProxyFix

from app import deadline, metrics
from app.privacy import truncate_ip
from app.request_context import CORRELATION_HEADER, current_correlation_id
from app.services.audit import AuditContext

access_log = logging.getLogger("app.access")

HSTS_VALUE = "max-age=31536000; includeSubDomains"


def request_audit_context() -> AuditContext:
    """Who is asking, in the reduced form the audit trail keeps."""
    return AuditContext(
        client_ip=truncate_ip(request.remote_addr),
        correlation_id=current_correlation_id(),
    )


def _start_request() -> None:
    g.request_started = time.perf_counter()
    deadline.start(current_app.config["REQUEST_DEADLINE_SECONDS"])


def _end_request(exc: BaseException | None) -> None:
    deadline.clear()


def _finish_response(response: Response) -> Response:
    headers = response.headers
    correlation_id = current_correlation_id()
    headers[CORRELATION_HEADER] = correlation_id
    headers["X-API-Version"] = "v1"
    headers["Cache-Control"] = "no-store"
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"
    # No page of this service is meant to be framed; the API's JSON is not a page at all. The
    # docs blueprint sets its own, wider policy for its page.
    headers["X-Frame-Options"] = "DENY"
    headers.setdefault("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
    if request.is_secure:
        headers["Strict-Transport-Security"] = HSTS_VALUE
    started = g.get("request_started")
    seconds = time.perf_counter() - started if started else 0.0
    # The rule, not the path: paths carry session UUIDs and arbitrary caller text.
    route = request.url_rule.rule if request.url_rule else None
    access_log.info(
        "request",
        extra={
            "correlation_id": correlation_id,
            "method": request.method,
            "route": route,
            "status": response.status_code,
            "duration_ms": round(seconds * 1000, 2) if started else None,
        },
    )
    if started:
        metrics.observe_request(request.method, route, response.status_code, seconds)
    return response


class BoundedJSONProvider(DefaultJSONProvider):
    """JSON whose parsing fails as a client error, however it is built.

    A body nested thousands of levels deep exhausts the parser's recursion; reported as the
    ValueError it amounts to, Flask answers it 400 like any other body it cannot parse.
    """

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


class _NoCookieSessions(SecureCookieSessionInterface):
    """The API keeps no cookie state: ``flask.session`` is a null session that refuses writes."""

    def open_session(self, app: Flask, request: Request) -> None:
        return None


def init_app(app: Flask) -> None:
    """Install the request hooks, trusting X-Forwarded-* only from configured proxies."""
    # Chat sessions live in the database under their UUID; a cookie session would only add a
    # signing step to every request and a second meaning of "session".
    app.session_interface = _NoCookieSessions()
    app.json = BoundedJSONProvider(app)
    proxies = app.config["TRUSTED_PROXY_COUNT"]
    if proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=proxies)  # type: ignore[method-assign]
    app.before_request(_start_request)
    app.after_request(_finish_response)
    app.teardown_request(_end_request)
