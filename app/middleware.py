"""Per-request plumbing: correlation ids, client address, response headers and the access log."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from flask import Flask, Request, Response, current_app, g, request
from flask.json.provider import DefaultJSONProvider
from flask.sessions import SecureCookieSessionInterface
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from app import deadline, metrics
from app.privacy import truncate_ip
from app.services.audit import AuditContext

access_log = logging.getLogger("app.access")

CORRELATION_HEADER = "X-Correlation-ID"
HSTS_VALUE = "max-age=31536000; includeSubDomains"


def current_correlation_id() -> str:
    """The correlation id of the current request, minted on first use."""
    if "correlation_id" not in g:
        g.correlation_id = _caller_correlation_id() or str(uuid.uuid4())
    return str(g.correlation_id)


def _caller_correlation_id() -> str | None:
    raw = request.headers.get(CORRELATION_HEADER, "")
    if len(raw) > 36:
        return None
    try:
        caller_id = str(uuid.UUID(raw))
    except ValueError:
        return None
    # Correlation ids are logged and audited as they are; a session's UUID is its credential
    # and never is. A caller could send it in both places, so a caller id that the request
    # names anywhere else is not adopted.
    return None if _named_elsewhere(caller_id) else caller_id


def _named_elsewhere(value: str) -> bool:
    """Whether the request names ``value`` outside its correlation header, in any spelling.

    Asked at the id's first use, once the view has read its body; a body that cannot be read
    counts as naming it.
    """
    places = [request.path, request.query_string.decode("latin-1")]
    own = CORRELATION_HEADER.lower()
    places += [text for name, text in request.headers.items() if name.lower() != own]
    try:
        body = request.get_json(silent=True) if request.is_json else request.form.to_dict(False)
    except HTTPException:
        return True
    places.append(json.dumps(body))
    named = " ".join(places).lower()
    return value in named or value.replace("-", "") in named.replace("-", "")


def request_session_uuid() -> uuid.UUID | None:
    """The session a request names, wherever it names it (path, header, JSON body or form)."""
    candidates = [
        (request.view_args or {}).get("session_uuid"),
        request.headers.get("X-Session-ID"),
    ]
    try:
        body = request.get_json(silent=True) if request.is_json else request.form
    except HTTPException:
        body = None  # a body too large to read names no session we can trust
    if isinstance(body, dict):
        candidates += [body.get("uuid"), body.get("session_uuid")]
    for candidate in candidates:
        if isinstance(candidate, uuid.UUID):
            return candidate
        if isinstance(candidate, str) and len(candidate) <= 64:
            try:
                return uuid.UUID(candidate)
            except ValueError:
                continue
    return None


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
