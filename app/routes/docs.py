"""Interactive API docs: Swagger UI at ``/api/v1/docs``, every file served by the app itself.

The scripts and stylesheets come from the flask-swagger-ui package, so the page works on a
closed network; it reads the OpenAPI document from ``/api/v1/openapi.json`` on the same server,
so "Try it out" calls this server.
"""

from __future__ import annotations

from flask import Blueprint
from flask_swagger_ui import get_swaggerui_blueprint

DOCS_PATH = "/api/v1/docs"
OPENAPI_PATH = "/api/v1/openapi.json"


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
    return blueprint
