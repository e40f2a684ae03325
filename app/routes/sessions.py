"""Session endpoints under /api/v1."""

from __future__ import annotations

import uuid
from typing import Any

from app.messages import SESSION_RESET
from app.middleware import request_audit_context
from app.privacy import mask_email
from app.rate_limits import limited_per_ip, new_session_budget, resume_budget
from app.routes import ApiBlueprint
from app.schemas import (
    ConsentRequestSchema,
    MessageSchema,
    PersistSessionRequestSchema,
    PersistSessionResponseSchema,
    RectifyRequestSchema,
    SessionExportSchema,
    SessionStateSchema,
    UuidIssuedSchema,
    ValidateUuidRequestSchema,
    ValidateUuidResponseSchema,
)
from app.services import chat_sessions, consent, data_rights
from app.services.chat_sessions import SessionOverview, Verdict
from app.services.consent import ConsentChange, ConsentDecision

sessions_bp = ApiBlueprint(
    "sessions",
    __name__,
    url_prefix="/api/v1",
    description="Anonymous chat sessions, keyed by a UUID v4 the frontend keeps.",
)

CONSENT_MESSAGES = {
    ConsentChange.RECORDED: "Consent recorded.",
    ConsentChange.DECLINED: "Consent declined.",
}
VERDICT_MESSAGES = {
    (Verdict.SUCCESS, False): "Session validated.",
    (Verdict.SUCCESS, True): "New session registered.",
    (Verdict.COLLISION, True): SESSION_RESET,
    (Verdict.INVALID, False): SESSION_RESET,
}


@sessions_bp.route("/generate-uuid", methods=["POST"])
@sessions_bp.response(200, UuidIssuedSchema)
@sessions_bp.alt_response(429, response="TOO_MANY_REQUESTS")
@sessions_bp.alt_response(500, response="INTERNAL_SERVER_ERROR")
def generate_uuid() -> dict[str, Any]:
    """Issue a fresh session UUID, registered as a pending session.

    Spends one of the client's new sessions (`SESSION_RATE_LIMIT`, shared with validate-uuid
    registrations and replacements).
    """
    session_uuid = chat_sessions.generate(request_audit_context(), new_session_budget())
    return {"status": "success", "uuid": session_uuid, "message": "Session created."}


@sessions_bp.route("/validate-uuid", methods=["POST"])
@sessions_bp.arguments(ValidateUuidRequestSchema())
@sessions_bp.response(200, ValidateUuidResponseSchema)
@sessions_bp.alt_response(429, response="TOO_MANY_REQUESTS")
def validate_uuid(body: dict[str, Any]) -> dict[str, Any]:
    """Judge a UUID: resume or register it (success), replace it (collision) or reject it (invalid).

    Every verdict answers 200; the frontend reads it from ``status``. Limited per session named
    (`RESUME_RATE_LIMIT`) and per client (`RESUME_IP_RATE_LIMIT`); registering or replacing
    spends a new session (`SESSION_RATE_LIMIT`).
    """
    result = chat_sessions.validate(
        body["uuid"], request_audit_context(), new_session_budget(), resume_budget(body["uuid"])
    )
    return {
        "status": result.verdict.value,
        "uuid": result.session_uuid,
        "message": VERDICT_MESSAGES[(result.verdict, result.registered)],
    }


@sessions_bp.route("/persist_session", methods=["POST"])
@limited_per_ip("SESSION_RESOURCE_RATE_LIMIT")
@sessions_bp.arguments(PersistSessionRequestSchema())
@sessions_bp.response(200, PersistSessionResponseSchema)
@sessions_bp.alt_response(404, response="NOT_FOUND")
@sessions_bp.alt_response(429, response="TOO_MANY_REQUESTS")
def persist_session(body: dict[str, Any]) -> dict[str, Any]:
    """Record consent to store personal data, optionally with name and e-mail."""
    decision = consent.persist(
        body["uuid"] if body.get("uuid") is not None else body["session_uuid"],
        consent_user_data=body["consent_user_data"],
        name=body.get("name"),
        email=body.get("email"),
        context=request_audit_context(),
    )
    return _consent_answer(decision)


def _consent_answer(decision: ConsentDecision) -> dict[str, Any]:
    if decision.change is ConsentChange.WITHDRAWN:
        message = (
            "Consent withdrawn: your name, e-mail address and "
            f"{decision.files_erased} uploaded file(s) were erased."
        )
    else:
        message = CONSENT_MESSAGES[decision.change]
    return {
        "status": "success",
        "uuid": decision.chat_session.uuid,
        "message": message,
        "consent_user_data": decision.chat_session.consent_user_data,
    }


@sessions_bp.route("/session/<uuid:session_uuid>", methods=["GET"])
@limited_per_ip("SESSION_RESOURCE_RATE_LIMIT")
@sessions_bp.response(200, SessionStateSchema)
@sessions_bp.alt_response(404, response="NOT_FOUND")
@sessions_bp.alt_response(429, response="TOO_MANY_REQUESTS")
def get_session(session_uuid: uuid.UUID) -> dict[str, Any]:
    """The session's state, times, consent and masked e-mail."""
    return _overview(chat_sessions.describe(session_uuid), "Session found.")


def _overview(overview: SessionOverview, message: str) -> dict[str, Any]:
    chat_session = overview.chat_session
    return {
        "status": "success",
        "message": message,
        "uuid": chat_session.uuid,
        "state": chat_session.state.value,
        "created_at": chat_session.created_at,
        "last_seen_at": overview.seen_at,
        "completed_at": chat_session.completed_at,
        "consent_user_data": chat_session.consent_user_data,
        "consent_at": chat_session.consent_at,
        "email_verified": chat_session.email_verified,
        "email_masked": mask_email(chat_session.email),
        "file_count": overview.file_count,
    }


@sessions_bp.route("/session/<uuid:session_uuid>/export", methods=["GET"])
@limited_per_ip("SESSION_RESOURCE_RATE_LIMIT")
@sessions_bp.response(200, SessionExportSchema)
@sessions_bp.alt_response(404, response="NOT_FOUND")
@sessions_bp.alt_response(429, response="TOO_MANY_REQUESTS")
@sessions_bp.alt_response(503, response="SERVICE_UNAVAILABLE")
def export_session(session_uuid: uuid.UUID) -> tuple[dict[str, Any], int, dict[str, str]]:
    """Everything held about the session, as a JSON download (GDPR access and portability)."""
    exported = data_rights.export(session_uuid, request_audit_context())
    body = {
        "status": "success",
        "message": "Everything this service holds about the session.",
        "exported_at": exported.exported_at,
        "profile": exported.chat_session,
        "consent_history": exported.consent_history,
        "files": exported.files,
        "audit_events": exported.audit_events,
    }
    disposition = f'attachment; filename="session-{session_uuid}.json"'
    return body, 200, {"Content-Disposition": disposition}


@sessions_bp.route("/session/<uuid:session_uuid>", methods=["PATCH"])
@limited_per_ip("SESSION_RESOURCE_RATE_LIMIT")
@sessions_bp.arguments(RectifyRequestSchema())
@sessions_bp.response(200, SessionStateSchema)
@sessions_bp.alt_response(404, response="NOT_FOUND")
@sessions_bp.alt_response(429, response="TOO_MANY_REQUESTS")
def rectify_session(changes: dict[str, Any], session_uuid: uuid.UUID) -> dict[str, Any]:
    """Correct name or e-mail (GDPR rectification); a new e-mail must be verified again."""
    overview = data_rights.rectify(session_uuid, changes, request_audit_context())
    return _overview(overview, "Session updated.")


@sessions_bp.route("/session/<uuid:session_uuid>/consent", methods=["POST"])
@limited_per_ip("SESSION_RESOURCE_RATE_LIMIT")
@sessions_bp.arguments(ConsentRequestSchema())
@sessions_bp.response(200, PersistSessionResponseSchema)
@sessions_bp.alt_response(404, response="NOT_FOUND")
@sessions_bp.alt_response(429, response="TOO_MANY_REQUESTS")
@sessions_bp.alt_response(503, response="SERVICE_UNAVAILABLE")
def set_consent(body: dict[str, Any], session_uuid: uuid.UUID) -> dict[str, Any]:
    """Grant consent, or withdraw it: name, e-mail, verification and files are erased."""
    decision = data_rights.set_consent(
        session_uuid, body["consent_user_data"], request_audit_context()
    )
    return _consent_answer(decision)


@sessions_bp.route("/session/<uuid:session_uuid>", methods=["DELETE"])
@limited_per_ip("SESSION_RESOURCE_RATE_LIMIT")
@sessions_bp.response(200, MessageSchema)
@sessions_bp.alt_response(404, response="NOT_FOUND")
@sessions_bp.alt_response(429, response="TOO_MANY_REQUESTS")
@sessions_bp.alt_response(503, response="SERVICE_UNAVAILABLE")
def delete_session(session_uuid: uuid.UUID) -> dict[str, Any]:
    """Erase the session completely and retire its UUID; repeating it is a no-op."""
    erased_now = data_rights.erase(session_uuid, request_audit_context())
    message = "Session erased." if erased_now else "Session was already erased."
    return {"status": "success", "message": message}
