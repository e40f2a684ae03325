"""Consent to store personal data: granting it, withdrawing it, and its history."""

from __future__ import annotations

from datetime import datetime

from flask import current_app
from sqlalchemy import insert

from app.errors import StorageUnavailableError
from app.extensions import db
from app.models import ChatSession, ConsentEvent
from app.services import audit
from app.services.audit import AuditContext
from app.services.erasure import unlink_send_history
from app.storage import StorageUnavailable, current_storage, session_objects


def grant(chat_session: ChatSession, context: AuditContext, now: datetime) -> None:
    """Record consent, unless the session already has it; the caller commits."""
    if chat_session.consent_user_data:
        return
    chat_session.consent_user_data = True
    chat_session.consent_at = now
    _remember(chat_session, granted=True, context=context, now=now)
    audit.record("consent_granted", context, chat_session.uuid)


def withdraw(chat_session: ChatSession, context: AuditContext, now: datetime) -> None:
    """Erase the session's personal data and files, keeping it as an anonymous pending session.

    Files go first: if storage fails, StorageUnavailableError is raised before anything in
    the database has changed. The caller commits.
    """
    storage = current_storage()
    try:
        keys = [stored.key for stored in session_objects(storage, chat_session.uuid)]
        failed = storage.delete_many(keys)
    except StorageUnavailable as exc:
        raise StorageUnavailableError() from exc
    if failed:
        raise StorageUnavailableError()
    _erase_personal_data(chat_session)
    unlink_send_history([chat_session.uuid])
    _remember(chat_session, granted=False, context=context, now=now)
    audit.record("consent_withdrawn", context, chat_session.uuid, files=len(keys))


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
