"""A data subject's rights over a session: access, portability, rectification, consent, erasure."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import exists, select

from app.clock import utcnow
from app.errors import ConsentRequired, SessionNotFound, StorageUnavailableError
from app.extensions import db
from app.models import AuditEvent, ChatSession, ConsentEvent, RetiredSessionUUID, RetirementReason
from app.services import audit, chat_sessions, consent, files
from app.services.audit import AuditContext
from app.services.erasure import delete_leftover_files, erase_sessions
from app.storage import StorageUnavailable


@dataclass(frozen=True)
class SessionExport:
    """Everything held about one session."""

    chat_session: ChatSession
    consent_history: list[ConsentEvent]
    files: list[files.SessionFile]
    audit_events: list[AuditEvent]
    exported_at: datetime


def export(session_uuid: uuid.UUID, context: AuditContext) -> SessionExport:
    """Collect the session's profile, consent history, files and audit trail."""
    session_files = files.list_files(session_uuid)
    chat_session = db.session.get(ChatSession, session_uuid)
    if chat_session is None:
        raise SessionNotFound()
    history = list(
        db.session.scalars(
            select(ConsentEvent)
            .where(ConsentEvent.session_uuid == session_uuid)
            .order_by(ConsentEvent.occurred_at, ConsentEvent.id)
        )
    )
    trail = audit.trail(session_uuid)
    audit.record("data_exported", context, session_uuid)
    db.session.commit()
    return SessionExport(chat_session, history, session_files, trail, utcnow())


def rectify(
    session_uuid: uuid.UUID, changes: dict[str, Any], context: AuditContext
) -> chat_sessions.SessionOverview:
    """Correct name and e-mail; a new e-mail must be verified again."""
    chat_session = chat_sessions.locked_session(session_uuid)
    name, email = changes.get("name"), changes.get("email")
    if "name" in changes and name is not None and not chat_session.consent_user_data:
        raise ConsentRequired()
    changed = []
    if "name" in changes:
        clean = chat_sessions.clean_name(name) if name is not None else None
        if clean != chat_session.name:
            chat_session.name = clean
            changed.append("name")
    if "email" in changes:
        clean = chat_sessions.normalise_email(email) if email is not None else None
        if clean != chat_session.email:
            chat_session.email = clean
            chat_session.require_email_verification()
            changed.append("email")
    if changed:
        audit.record("personal_data_rectified", context, session_uuid, fields=changed)
    db.session.commit()
    return chat_sessions.describe(session_uuid)


def set_consent(
    session_uuid: uuid.UUID, granted: bool, context: AuditContext
) -> consent.ConsentDecision:
    """Grant consent, or withdraw it and erase personal data and files."""
    if not granted:
        return consent.withdraw(session_uuid, context)
    chat_session = chat_sessions.locked_session(session_uuid)
    consent.grant(chat_session, context, utcnow())
    db.session.commit()
    return consent.ConsentDecision(chat_session, consent.ConsentChange.RECORDED)


def erase(session_uuid: uuid.UUID, context: AuditContext) -> bool:
    """Erase the session completely and retire its UUID; False if it was already erased.

    Repeating it finishes what storage could not: files left behind by an earlier attempt
    are deleted then.
    """
    if session_uuid.version != 4:
        raise SessionNotFound()
    if chat_sessions.is_live(session_uuid):
        result = erase_sessions(
            [session_uuid],
            ChatSession.uuid == session_uuid,
            reason=RetirementReason.DELETED,
            context=context,
            wait=True,
        )
        if result.skipped or result.files_left:
            raise StorageUnavailableError()
        if result.files:
            return True
    if not db.session.scalar(select(exists().where(RetiredSessionUUID.uuid == session_uuid))):
        raise SessionNotFound()
    try:
        delete_leftover_files(session_uuid)
    except StorageUnavailable as exc:
        raise StorageUnavailableError() from exc
    return False
