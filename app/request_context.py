"""What the current request says about itself: its correlation id and the session it names.

Read by the HTTP layer (headers, error bodies, the audit context) and by the admin alerts,
which describe the request an error happened in; it imports nothing of the app.
"""

from __future__ import annotations

import json
import uuid

from flask import g, request
from werkzeug.exceptions import HTTPException

CORRELATION_HEADER = "X-Correlation-ID"


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
