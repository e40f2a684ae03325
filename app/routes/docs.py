"""Interactive API docs: Swagger UI at ``/api/v1/docs``, every file served by the app itself.

The scripts and stylesheets come from the flask-swagger-ui package, so the page works on a
closed network; it reads the OpenAPI document from ``/api/v1/openapi.json`` on the same server,
so "Try it out" calls this server.
"""

from __future__ import annotations

import base64
import hashlib
import re

from flask import Blueprint, Response
from flask_swagger_ui import get_swaggerui_blueprint

DOCS_PATH = "/api/v1/docs"
OPENAPI_PATH = "/api/v1/openapi.json"
INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)
# Everything from this server; no framing. Swagger UI sets inline styles and data: images, and
# its page configures it in one inline script, allowed by its hash alone.
DOCS_POLICY = (
    "default-src 'self'; script-src 'self'{scripts}; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)


def docs_blueprint(title: str) -> Blueprint:
    """Swagger UI's page and files under DOCS_PATH."""
    blueprint: Blueprint = get_swaggerui_blueprint(
        DOCS_PATH,
        OPENAPI_PATH,
        config={
            "app_name": title,
            "displayRequestDuration": True,
            # Swagger UI would otherwise send the document's address to swagger.io's validator.
            "validatorUrl": None,
            "oauth2RedirectUrl": f"{DOCS_PATH}/oauth2-redirect.html",
        },
        blueprint_name="api_docs",
    )
    blueprint.after_request(_strict_policy)
    return blueprint


def _strict_policy(response: Response) -> Response:
    """A Content-Security-Policy that allows the page's own files and its one inline script."""
    hashes = ""
    if response.mimetype == "text/html" and not response.direct_passthrough:
        for script in INLINE_SCRIPT.findall(response.get_data(as_text=True)):
            digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
            hashes += f" 'sha256-{digest}'"
    response.headers["Content-Security-Policy"] = DOCS_POLICY.format(scripts=hashes)
    return response
