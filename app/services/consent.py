"""Consent to store personal data: granting it, withdrawing it, and its history."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime

from flask import current_app
from sqlalchemy import insert

from app.clock import utcnow
from app.errors import ConsentRequired, InvalidRequest, StorageUnavailableError
from app.extensions import db
from app.models import ChatSession, ConsentEvent
from app.services import audit, chat_sessions, files
from app.services.audit import AuditContext
from app.services.erasure import unlink_send_history
from app.storage import StorageUnavailable, current_storage


class ConsentChange(enum.StrEnum):
    """What a consent decision did."""

    RECORDED = "recorded"
    DECLINED = "declined"
    WITHDRAWN = "withdrawn"


@dataclass(frozen=True)
class ConsentDecision:
    """The session after a consent decision, what the decision did, and what it erased."""

    chat_session: ChatSession
    change: ConsentChange
    files_erased: int = 0


def persist(
    raw_uuid: str,
    *,
    consent_user_data: bool,
    name: str | None,
    email: str | None,
    context: AuditContext,
) -> ConsentDecision:
    """Record the user's consent decision and, with consent, their name and e-mail."""
    session_uuid = chat_sessions.parse_uuid4(raw_uuid)
    if session_uuid is None:
        raise InvalidRequest(details={"uuid": ["Not a UUID version 4."]})
    if (name is not None or email is not None) and not consent_user_data:
        raise ConsentRequired()
    new_name = chat_sessions.clean_name(name)
    new_email = chat_sessions.normalise_email(email)

    chat_session = chat_sessions.locked_session(session_uuid)
    if not consent_user_data:
        # Declining at the first ask erases nothing; taking back a given consent erases all.
        if not chat_session.consent_user_data:
            audit.record("consent_declined", context, session_uuid)
            db.session.commit()
            return ConsentDecision(chat_session, ConsentChange.DECLINED)
        db.session.commit()
        return withdraw(session_uuid, context)

    grant(chat_session, context, utcnow())
    changed = []
    if new_name is not None and new_name != chat_session.name:
        chat_session.name = new_name
        changed.append("name")
    if new_email is not None and new_email != chat_session.email:
        chat_session.email = new_email
        chat_session.require_email_verification()
        changed.append("email")
    if changed:
        audit.record("personal_data_updated", context, session_uuid, fields=changed)
    db.session.commit()
    return ConsentDecision(chat_session, ConsentChange.RECORDED)


def grant(chat_session: ChatSession, context: AuditContext, now: datetime) -> None:
    """Record consent, unless the session already has it; the caller commits."""
    if chat_session.consent_user_data:
        return
    chat_session.consent_user_data = True
    chat_session.consent_at = now
    _remember(chat_session, granted=True, context=context, now=now)
    audit.record("consent_granted", context, chat_session.uuid)


def withdraw(session_uuid: uuid.UUID, context: AuditContext) -> ConsentDecision:
    """Erase the session's personal data and files, keeping it as an anonymous pending session.

    The files go first, under the session's file lock but not its row lock, and the way a file
    delete goes (files.delete): their deletion is committed as pending before storage is asked,
    so a failure afterwards (storage, or the row lock not coming in time) leaves them pending
    for the retry to finish, never gone without their ``file_deleted`` rows. If storage fails,
    StorageUnavailableError; nothing but the pending deletions has changed. Commits.
    """
    chat_sessions.hold_session_files(session_uuid)
    storage = current_storage()
    try:
        files.request_deletion(session_uuid, list(files.stored_refs(storage, session_uuid)))
        db.session.commit()
        chat_sessions.hold_session_files(session_uuid)
        erased, unfinished = files.finish_deletions(storage, session_uuid, context)
    except StorageUnavailable as exc:
        db.session.rollback()
        raise StorageUnavailableError() from exc
    if unfinished:
        db.session.rollback()
        raise StorageUnavailableError()
    chat_session = chat_sessions.locked_session(session_uuid)
    _erase_personal_data(chat_session)
    unlink_send_history([session_uuid])
    _remember(chat_session, granted=False, context=context, now=utcnow())
    audit.record("consent_withdrawn", context, session_uuid, files=len(erased))
    db.session.commit()
    return ConsentDecision(chat_session, ConsentChange.WITHDRAWN, files_erased=len(erased))


def _erase_personal_data(chat_session: ChatSession) -> None:
    """Forget name, e-mail and verification: an anonymous pending session remains."""
    chat_session.consent_user_data = False
    chat_session.consent_at = None
    chat_session.name = None
    chat_session.email = None
    chat_session.require_email_verification()


def _remember(
    chat_session: ChatSession, *, granted: bool, context: AuditContext, now: datetime
) -> None:
    db.session.execute(
        insert(ConsentEvent).values(
            session_uuid=chat_session.uuid,
            granted=granted,
            occurred_at=now,
            client_ip=context.client_ip,
            wording_version=current_app.config["CONSENT_WORDING_VERSION"],
        )
    )
