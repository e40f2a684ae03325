"""E-mail verification endpoints; the session comes from the X-Session-ID header."""

from __future__ import annotations

import uuid
from typing import Any

from flask import g, request

from app.errors import InvalidRequest
from app.middleware import request_audit_context
from app.rate_limits import limited_per_ip
from app.routes import ApiBlueprint
from app.schemas import (
    ResendCodeRequestSchema,
    VerificationOutcomeSchema,
    VerifyCodeRequestSchema,
    VerifyEmailRequestSchema,
)
from app.services import email_verification
from app.services.chat_sessions import parse_uuid4
from app.services.email_verification import Outcome, Transition

email_verification_bp = ApiBlueprint(
    "email_verification",
    __name__,
    url_prefix="/api/v1/email-verification",
    description="Verify the session's e-mail address with a 6-digit code. Business outcomes "
    "answer 200 with `status` and `nextTransition`; only malformed requests answer 400. On these "
    "endpoints `error` is a sentence for the user (the frontend shows it as it is) and the "
    "stable machine code is in `code`.",
)

SESSION_HEADER = "X-Session-ID"
# Documented, so that the interactive docs ask for it when trying an endpoint out.
SESSION_HEADER_PARAMETER = {
    "in": "header",
    "name": SESSION_HEADER,
    "required": True,
    "description": "The session's UUID v4.",
    "schema": {"type": "string", "format": "uuid"},
}


@email_verification_bp.before_request
def _screen_for_errors() -> None:
    """Malformed requests keep the user on the screen they came from."""
    g.error_transition = (
        Transition.EMAIL_INPUT
        if request.endpoint == "email_verification.verify_email"
        else Transition.CODE_INPUT
    ).value


def _header_session() -> uuid.UUID:
    raw = request.headers.get(SESSION_HEADER, "")
    session_uuid = parse_uuid4(raw) if len(raw) <= 64 else None
    if session_uuid is None:
        g.error_transition = Transition.SESSION_RESET.value
        raise InvalidRequest(
            details={SESSION_HEADER: ["Send the session's UUID v4 in this header."]}
        )
    return session_uuid


def _answer(outcome: Outcome) -> dict[str, Any]:
    body: dict[str, Any] = {
        "status": "success" if outcome.success else "error",
        "message": outcome.message,
        "nextTransition": outcome.next_transition.value,
    }
    if outcome.error is not None:
        # The screens show `error` word for word: the sentence goes there, the code beside it.
        body["error"] = outcome.message
        body["code"] = outcome.error
    return body


@email_verification_bp.route("/verify-email", methods=["POST"])
@limited_per_ip("EMAIL_RATE_LIMIT")
@email_verification_bp.arguments(VerifyEmailRequestSchema())
@email_verification_bp.doc(parameters=[SESSION_HEADER_PARAMETER])
@email_verification_bp.response(200, VerificationOutcomeSchema)
@email_verification_bp.alt_response(429, response="TOO_MANY_REQUESTS")
def verify_email(body: dict[str, Any]) -> dict[str, Any]:
    """Store the address as the session's unverified e-mail and send it a code."""
    outcome = email_verification.request_code(
        _header_session(), body["email"], request_audit_context()
    )
    return _answer(outcome)


@email_verification_bp.route("/verify-code", methods=["POST"])
@limited_per_ip("EMAIL_RATE_LIMIT")
@email_verification_bp.arguments(VerifyCodeRequestSchema())
@email_verification_bp.doc(parameters=[SESSION_HEADER_PARAMETER])
@email_verification_bp.response(200, VerificationOutcomeSchema)
@email_verification_bp.alt_response(429, response="TOO_MANY_REQUESTS")
def verify_code(body: dict[str, Any]) -> dict[str, Any]:
    """Check the code; the right one completes the session (CHAT_READY)."""
    outcome = email_verification.verify_code(
        _header_session(), body["code"], request_audit_context()
    )
    return _answer(outcome)


@email_verification_bp.route("/resend-code", methods=["POST"])
@limited_per_ip("EMAIL_RATE_LIMIT")
@email_verification_bp.arguments(ResendCodeRequestSchema())
@email_verification_bp.doc(parameters=[SESSION_HEADER_PARAMETER])
@email_verification_bp.response(200, VerificationOutcomeSchema)
@email_verification_bp.alt_response(429, response="TOO_MANY_REQUESTS")
def resend_code(body: dict[str, Any]) -> dict[str, Any]:
    """Send a fresh code to the stored address."""
    return _answer(email_verification.resend_code(_header_session(), request_audit_context()))
