"""HTTP routes: parse the request, call one service, serialise the result."""

from __future__ import annotations

from typing import Any, ClassVar

import flask_smorest
import marshmallow as ma
from flask import Request
from webargs.flaskparser import FlaskParser
from werkzeug.datastructures import CombinedMultiDict


class _ContractParser(FlaskParser):
    """Malformed input is a 400 in this API, not webargs' default 422.

    Adds a ``multipart`` location that reads form fields and files together, so one
    schema validates (and documents) an upload.
    """

    DEFAULT_VALIDATION_STATUS = 400
    # webargs declares these as plain class attributes; overriding them is its extension point.
    DEFAULT_UNKNOWN_BY_LOCATION: dict[str, str | None] = {  # noqa: RUF012
        **FlaskParser.DEFAULT_UNKNOWN_BY_LOCATION,
        "multipart": None,
    }
    __location_map__: dict[str, Any] = {  # noqa: RUF012
        **FlaskParser.__location_map__,
        "multipart": "load_multipart",
    }

    def load_multipart(self, req: Request, schema: ma.Schema) -> Any:
        return self._makeproxy(CombinedMultiDict([req.form, req.files]), schema)


class ApiBlueprint(flask_smorest.Blueprint):
    """A documented blueprint whose request schemas answer 400 on bad input."""

    ARGUMENTS_PARSER = _ContractParser()
    DEFAULT_LOCATION_CONTENT_TYPE_MAPPING: ClassVar[dict[str, str]] = {
        **flask_smorest.Blueprint.DEFAULT_LOCATION_CONTENT_TYPE_MAPPING,
        "multipart": "multipart/form-data",
    }
