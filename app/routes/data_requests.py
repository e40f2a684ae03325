"""Data rights without the session: see, take away or erase what is held under an address."""

from __future__ import annotations

from typing import Any

from flask import request

from app.middleware import request_audit_context
from app.rate_limits import limited_per_ip
from app.routes import ApiBlueprint
from app.schemas import (
    DataRequestErasedSchema,
    DataRequestExportSchema,
    DataRequestGrantSchema,
    DataRequestSchema,
    DataRequestVerifySchema,
    MessageSchema,
)
from app.services import data_requests

data_requests_bp = ApiBlueprint(
    "data_requests",
    __name__,
    url_prefix="/api/v1/data-requests",
    description="For a person who verified an address and no longer has the session: a code "
    "mailed to the address gives a short-lived bearer token with which to export or erase "
    "every session that verified it.",
)

BEARER: list[dict[str, list[str]]] = [{"bearerAuth": []}]


@data_requests_bp.route("", methods=["POST"])
@limited_per_ip("DATA_REQUEST_RATE_LIMIT")
@data_requests_bp.arguments(DataRequestSchema())
@data_requests_bp.response(202, MessageSchema)
@data_requests_bp.alt_response(429, response="TOO_MANY_REQUESTS")
def request_code(body: dict[str, Any]) -> dict[str, Any]:
    """Ask for a code; the same answer whether or not the address is known."""
    data_requests.request_code(body["email"], request_audit_context())
    return {"status": "success", "message": data_requests.ANSWER}


@data_requests_bp.route("/verify", methods=["POST"])
@limited_per_ip("DATA_REQUEST_RATE_LIMIT")
@data_requests_bp.arguments(DataRequestVerifySchema())
@data_requests_bp.response(200, DataRequestGrantSchema)
@data_requests_bp.alt_response(400, response="BAD_REQUEST")
@data_requests_bp.alt_response(429, response="TOO_MANY_REQUESTS")
def verify(body: dict[str, Any]) -> dict[str, Any]:
    """Trade the mailed code for a bearer token and the sessions it reaches."""
    grant = data_requests.verify(body["email"], body["code"], request_audit_context())
    return {
        "status": "success",
        "message": f"{len(grant.sessions)} session(s) found for this address.",
        "token": grant.token,
        "expires_in": grant.expires_in,
        "sessions": grant.sessions,
    }


@data_requests_bp.route("/export", methods=["GET"])
@limited_per_ip("DATA_REQUEST_RATE_LIMIT")
@data_requests_bp.response(200, DataRequestExportSchema)
@data_requests_bp.alt_response(401, response="UNAUTHORIZED")
@data_requests_bp.alt_response(429, response="TOO_MANY_REQUESTS")
@data_requests_bp.alt_response(503, response="SERVICE_UNAVAILABLE")
@data_requests_bp.doc(security=BEARER)
def export() -> tuple[dict[str, Any], int, dict[str, str]]:
    """Everything held about every session tied to the token's address, as a JSON download."""
    holder = data_requests.holder(request.headers.get("Authorization"))
    body = data_requests.export_document(holder.address, request_audit_context())
    return body, 200, {"Content-Disposition": 'attachment; filename="my-data.json"'}


@data_requests_bp.route("/sessions", methods=["DELETE"])
@limited_per_ip("DATA_REQUEST_RATE_LIMIT")
@data_requests_bp.response(200, DataRequestErasedSchema)
@data_requests_bp.alt_response(401, response="UNAUTHORIZED")
@data_requests_bp.alt_response(429, response="TOO_MANY_REQUESTS")
@data_requests_bp.alt_response(503, response="SERVICE_UNAVAILABLE")
@data_requests_bp.doc(security=BEARER)
def erase() -> dict[str, Any]:
    """Erase every session tied to the token's address; the token dies with them."""
    holder = data_requests.holder(request.headers.get("Authorization"))
    erased = data_requests.erase_all(
        holder.address, request_audit_context(), grant_id=holder.grant_id
    )
    return {
        "status": "success",
        "message": f"{len(erased)} session(s) erased.",
        "erased": len(erased),
        "sessions": erased,
    }
