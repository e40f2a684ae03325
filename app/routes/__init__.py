"""HTTP routes: parse the request, call one service, serialise the result."""

from __future__ import annotations

from typing import Any, ClassVar

import flask_smorest
import marshmallow as ma
from flask import Request
from webargs import core
from webargs.flaskparser import FlaskParser, abort, is_json_request
from werkzeug.datastructures import CombinedMultiDict
from werkzeug.exceptions import BadRequest


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

    def _raw_load_json(self, req: Request) -> Any:
        """The body through the app's JSON provider, parsed once per request and bounded.

        webargs would parse it again with the bare json module, which lets a deeply nested body
        escape as a RecursionError (a 500) instead of a 400.
        """
        if not is_json_request(req):
            return core.missing
        if not req.get_data(cache=True):
            return core.missing
        try:
            return req.get_json()
        except BadRequest:
            abort(400, messages={"json": ["Invalid JSON body."]})


class ApiBlueprint(flask_smorest.Blueprint):
    """A documented blueprint whose request schemas answer 400 on bad input."""

    ARGUMENTS_PARSER = _ContractParser()
    DEFAULT_LOCATION_CONTENT_TYPE_MAPPING: ClassVar[dict[str, str]] = {
        **flask_smorest.Blueprint.DEFAULT_LOCATION_CONTENT_TYPE_MAPPING,
        "multipart": "multipart/form-data",
    }
