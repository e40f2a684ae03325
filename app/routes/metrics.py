"""``GET /metrics``: Prometheus' scrape endpoint, behind a bearer token when one is set."""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, current_app, request

from app import metrics
from app.errors import CredentialsMissing, CredentialsRejected

metrics_bp = Blueprint("metrics", __name__)


@metrics_bp.get("/metrics")
def scrape() -> Response:
    """Every worker's figures in the Prometheus text format."""
    _require_token(current_app.config["METRICS_TOKEN"])
    body, content_type = metrics.exposition(request.headers.get("Accept", ""))
    return Response(body, content_type=content_type)


def _require_token(token: str | None) -> None:
    if token is None:
        return
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise CredentialsMissing()
    # Compared in constant time: the time to refuse must not tell how much of a guess was right.
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise CredentialsRejected()
