"""Request and response schemas: they validate input and generate the OpenAPI document."""

from __future__ import annotations

import re
from typing import Any

import marshmallow as ma
from marshmallow import fields, validate
from werkzeug.datastructures import FileStorage

# Unicode's Cc (control) and Cs (surrogate) categories, exactly.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

# Longer than any UUID spelling, short enough that no one can ship a payload in the field.
MAX_UUID_FIELD_LENGTH = 64
MAX_NAME_LENGTH = 200
MAX_EMAIL_LENGTH = 254


class StrictBoolean(fields.Boolean):
    """A JSON boolean and nothing else: ``"true"`` or ``1`` are type errors."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


class Text(fields.String):
    """A string a person could have typed: no control characters, no unpaired surrogates.

    Control characters (NUL among them) have no place in a name, an address, a code or a file
    name, and PostgreSQL refuses NUL outright; a lone surrogate cannot be encoded to store.
    """

    default_error_messages = {  # noqa: RUF012 (marshmallow's extension point)
        "unprintable": "Must not contain control characters or unpaired surrogates."
    }

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text: str = super()._deserialize(value, attr, data, **kwargs)
        if _UNPRINTABLE.search(text):
            raise self.make_error("unprintable")
        return text


def _uuid_text(**kwargs: Any) -> Text:
    return Text(validate=validate.Length(min=1, max=MAX_UUID_FIELD_LENGTH), **kwargs)


class ErrorSchema(ma.Schema):
    """The error body every non-2xx response carries."""

    status = fields.String(required=True, metadata={"example": "error"})
    error = fields.String(
        required=True,
        metadata={
            "description": "Stable machine code; on the e-mail verification endpoints, a "
            "sentence for the user (the code is then in `code`)"
        },
    )
    code = fields.String(
        metadata={"description": "On the e-mail verification endpoints: the stable machine code"}
    )
    message = fields.String(required=True)
    correlation_id = fields.String(required=True)
    details = fields.Dict(
        keys=fields.String(),
        values=fields.Raw(),
        metadata={"description": "Per-field problems, on validation errors"},
    )
    nextTransition = fields.String(
        metadata={"description": "On the e-mail verification endpoints: the screen to show next"}
    )


class UuidIssuedSchema(ma.Schema):
    """A freshly issued session UUID."""

    status = fields.String(required=True, metadata={"example": "success"})
    uuid = fields.UUID(required=True)
    message = fields.String(required=True)


class ValidateUuidRequestSchema(ma.Schema):
    """The UUID the frontend holds, as it holds it (even empty: that is an ``invalid`` verdict)."""

    uuid = Text(required=True, validate=validate.Length(max=MAX_UUID_FIELD_LENGTH))


class ValidateUuidResponseSchema(ma.Schema):
    """The verdict on a UUID; ``uuid`` is the one to use from now on."""

    status = fields.String(
        required=True, validate=validate.OneOf(["success", "collision", "invalid"])
    )
    uuid = fields.UUID(required=True, allow_none=True)
    message = fields.String(required=True)


class PersistSessionRequestSchema(ma.Schema):
    """Consent to store personal data, with optional name and e-mail."""

    uuid = _uuid_text()
    session_uuid = _uuid_text()
    consent_user_data = StrictBoolean(required=True)
    name = Text(allow_none=True, validate=validate.Length(min=1, max=MAX_NAME_LENGTH))
    email = Text(allow_none=True, validate=validate.Length(max=MAX_EMAIL_LENGTH))

    @ma.validates_schema
    def _exactly_one_session_key(self, data: dict[str, Any], **kwargs: Any) -> None:
        given = [key for key in ("uuid", "session_uuid") if data.get(key) is not None]
        if not given:
            raise ma.ValidationError("Provide the session as uuid or session_uuid.", "uuid")
        if len(given) == 2 and data["uuid"].lower() != data["session_uuid"].lower():
            raise ma.ValidationError("uuid and session_uuid name different sessions.", "uuid")


class PersistSessionResponseSchema(ma.Schema):
    """The stored consent decision."""

    status = fields.String(required=True, metadata={"example": "success"})
    uuid = fields.UUID(required=True)
    message = fields.String(required=True)
    consent_user_data = fields.Boolean(required=True)


class SessionStateSchema(ma.Schema):
    """What the service holds about a session, with the e-mail masked."""

    status = fields.String(required=True, metadata={"example": "success"})
    message = fields.String(required=True)
    uuid = fields.UUID(required=True)
    state = fields.String(required=True, validate=validate.OneOf(["pending", "verified"]))
    created_at = fields.AwareDateTime(required=True)
    last_seen_at = fields.AwareDateTime(required=True)
    completed_at = fields.AwareDateTime(required=True, allow_none=True)
    consent_user_data = fields.Boolean(required=True)
    consent_at = fields.AwareDateTime(required=True, allow_none=True)
    email_verified = fields.Boolean(required=True)
    email_masked = fields.String(required=True, allow_none=True)
    file_count = fields.Integer(required=True)


class HealthSchema(ma.Schema):
    """Liveness."""

    status = fields.String(required=True, metadata={"example": "success"})
    message = fields.String(required=True)


class ReadinessSchema(ma.Schema):
    """Readiness of each dependency, and when the orphan sweep last completed."""

    status = fields.String(required=True, validate=validate.OneOf(["success", "error"]))
    message = fields.String(required=True)
    checks = fields.Dict(keys=fields.String(), values=fields.String(), required=True)
    reasons = fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        required=True,
        metadata={"description": "Why each unavailable dependency is unavailable"},
    )
    last_orphan_sweep_at = fields.AwareDateTime(required=True, allow_none=True)


class UploadSchema(ma.Schema):
    """A multipart upload: the session and one PDF."""

    session_uuid = _uuid_text(required=True)
    file = fields.Raw(required=True, metadata={"type": "string", "format": "binary"})

    @ma.validates("file")
    def _is_a_file(self, value: Any, **kwargs: Any) -> None:
        if not isinstance(value, FileStorage):
            raise ma.ValidationError("Send the file as a multipart file part.")


class UploadedFileSchema(ma.Schema):
    """A stored file and a time-limited link to download it."""

    status = fields.String(required=True, metadata={"example": "success"})
    message = fields.String(required=True)
    filename = fields.String(required=True)
    url = fields.String(required=True, metadata={"description": "Expires; never public"})
    size = fields.Integer(required=True)
    content_type = fields.String(required=True)


class DeleteFileRequestSchema(ma.Schema):
    """Which file of which session to delete."""

    filename = Text(required=True, validate=validate.Length(min=1, max=255))
    session_uuid = _uuid_text(required=True)


class MessageSchema(ma.Schema):
    """A plain success."""

    status = fields.String(required=True, metadata={"example": "success"})
    message = fields.String(required=True)


class SessionFileSchema(ma.Schema):
    """One file of a session."""

    filename = fields.String(required=True)
    size = fields.Integer(required=True)
    content_type = fields.String(required=True)
    uploaded_at = fields.AwareDateTime(required=True)
    url = fields.String(required=True)


class SessionFilesSchema(ma.Schema):
    """A session's files."""

    status = fields.String(required=True, metadata={"example": "success"})
    message = fields.String(required=True)
    files = fields.List(fields.Nested(SessionFileSchema), required=True)


class VerifyEmailRequestSchema(ma.Schema):
    """The address to verify."""

    email = Text(required=True, validate=validate.Length(max=MAX_EMAIL_LENGTH))


class VerifyCodeRequestSchema(ma.Schema):
    """A code the user typed."""

    code = Text(required=True, validate=validate.Length(max=32))


class ResendCodeRequestSchema(ma.Schema):
    """No fields: the code goes to the stored address."""


class VerificationOutcomeSchema(ma.Schema):
    """What happened, and the screen to show next."""

    status = fields.String(required=True, validate=validate.OneOf(["success", "error"]))
    message = fields.String(required=True)
    error = fields.String(
        metadata={
            "description": "When status is error: a sentence for the user, shown as it is",
            "example": "That code is not right. 2 attempt(s) left.",
        }
    )
    code = fields.String(
        metadata={
            "description": "When status is error: the stable machine code",
            "example": "invalid_code",
        }
    )
    nextTransition = fields.String(
        required=True,
        validate=validate.OneOf(["EMAIL_INPUT", "CODE_INPUT", "SESSION_RESET", "CHAT_READY"]),
    )


class RectifyRequestSchema(ma.Schema):
    """Corrections; ``null`` removes a value, an absent field leaves it unchanged."""

    name = Text(allow_none=True, validate=validate.Length(min=1, max=MAX_NAME_LENGTH))
    email = Text(allow_none=True, validate=validate.Length(max=MAX_EMAIL_LENGTH))


class ConsentRequestSchema(ma.Schema):
    """The user's consent decision."""

    consent_user_data = StrictBoolean(required=True)


class ConsentEventSchema(ma.Schema):
    """One consent decision."""

    granted = fields.Boolean(required=True)
    occurred_at = fields.AwareDateTime(required=True)
    client_ip = fields.String(allow_none=True, metadata={"description": "Truncated"})
    wording_version = fields.String(required=True)


class AuditEventSchema(ma.Schema):
    """One audit event of the session."""

    occurred_at = fields.AwareDateTime(required=True)
    event_type = fields.String(required=True)
    client_ip = fields.String(allow_none=True)
    correlation_id = fields.String(allow_none=True)
    details = fields.Dict(required=True)


class ExportProfileSchema(ma.Schema):
    """The session's own record."""

    uuid = fields.UUID(required=True)
    state = fields.String(required=True)
    created_at = fields.AwareDateTime(required=True)
    last_seen_at = fields.AwareDateTime(required=True)
    completed_at = fields.AwareDateTime(allow_none=True)
    client_ip = fields.String(allow_none=True)
    name = fields.String(allow_none=True)
    email = fields.String(allow_none=True)
    email_verified = fields.Boolean(required=True)
    consent_user_data = fields.Boolean(required=True)
    consent_at = fields.AwareDateTime(allow_none=True)


class SessionExportSchema(ma.Schema):
    """Everything held about one session (GDPR access and portability)."""

    status = fields.String(required=True, metadata={"example": "success"})
    message = fields.String(required=True)
    exported_at = fields.AwareDateTime(required=True)
    profile = fields.Nested(ExportProfileSchema, required=True)
    consent_history = fields.List(fields.Nested(ConsentEventSchema), required=True)
    files = fields.List(fields.Nested(SessionFileSchema), required=True)
    audit_events = fields.List(fields.Nested(AuditEventSchema), required=True)


class DataRequestSchema(ma.Schema):
    """The address whose data the person asks to see or erase."""

    email = Text(required=True, validate=validate.Length(max=MAX_EMAIL_LENGTH))


class DataRequestVerifySchema(ma.Schema):
    """The address and the code mailed to it."""

    email = Text(required=True, validate=validate.Length(max=MAX_EMAIL_LENGTH))
    code = Text(required=True, validate=validate.Length(max=32))


class SessionSummarySchema(ma.Schema):
    """One session tied to the address; no UUID."""

    created_at = fields.AwareDateTime(required=True)
    last_seen_at = fields.AwareDateTime(required=True)
    completed_at = fields.AwareDateTime(allow_none=True)
    state = fields.String(required=True, metadata={"example": "verified"})
    file_count = fields.Integer(
        allow_none=True, metadata={"description": "null if storage did not answer"}
    )


class DataRequestGrantSchema(ma.Schema):
    """A bearer token for the address, and the sessions it reaches."""

    status = fields.String(required=True, metadata={"example": "success"})
    message = fields.String(required=True)
    token = fields.String(required=True)
    expires_in = fields.Integer(required=True, metadata={"description": "seconds"})
    sessions = fields.List(fields.Nested(SessionSummarySchema), required=True)


class SessionExportEntrySchema(ma.Schema):
    """Everything held about one session, as in the per-session export."""

    profile = fields.Nested(ExportProfileSchema, required=True)
    consent_history = fields.List(fields.Nested(ConsentEventSchema), required=True)
    files = fields.List(fields.Nested(SessionFileSchema), required=True)
    audit_events = fields.List(fields.Nested(AuditEventSchema), required=True)


class DataRequestExportSchema(ma.Schema):
    """Every session tied to the address."""

    status = fields.String(required=True, metadata={"example": "success"})
    message = fields.String(required=True)
    exported_at = fields.AwareDateTime(required=True)
    sessions = fields.List(fields.Nested(SessionExportEntrySchema), required=True)


class DataRequestErasedSchema(ma.Schema):
    """What an erasure by address erased."""

    status = fields.String(required=True, metadata={"example": "success"})
    message = fields.String(required=True)
    erased = fields.Integer(required=True)
    sessions = fields.List(fields.Nested(SessionSummarySchema), required=True)
