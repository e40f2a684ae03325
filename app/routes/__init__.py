"""HTTP routes: parse the request, call one service, serialise the result."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flask_smorest
from flask import current_app, request
from webargs.flaskparser import FlaskParser

from app.extensions import limiter


class _ContractParser(FlaskParser):
    """Malformed input is a 400 in this API, not webargs' default 422."""

    DEFAULT_VALIDATION_STATUS = 400


class ApiBlueprint(flask_smorest.Blueprint):
    """A documented blueprint whose request schemas answer 400 on bad input."""

    ARGUMENTS_PARSER = _ContractParser()


def rate_limited(config_key: str) -> Callable[[Callable[..., Any]], Any]:
    """Limit a route per client IP by the limit string in ``app.config[config_key]``."""
    return limiter.limit(
        lambda: str(current_app.config[config_key]),
        # CORS preflights carry no work and must never eat into the caller's budget.
        exempt_when=lambda: request.method == "OPTIONS",
    )
