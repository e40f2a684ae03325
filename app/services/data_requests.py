"""Data rights without the session: a verified address is the person's account.

A person who lost the browser that held a session's UUID proves control of the address with a
mailed code and gets a short-lived bearer token, scoped to that address, with which to export
or erase every session that verified it. The first step answers the same whether or not the
address is known, and mails off the request path, so nobody learns who used the service.
"Tied to the address" means: live sessions whose current e-mail address is this one (in any
letter case) and verified (docs/decisions.md, "Data rights without the session").
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import logging
import secrets
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from flask import Flask, current_app
from sqlalchemy import func, select, update

from app.clock import utcnow
from app.errors import (
    CodeRefused,
    CredentialsMissing,
    InvalidRequest,
    SessionNotFound,
    TokenRejected,
)
from app.extensions import db
from app.mail import MailUnavailable, current_mailer
from app.models import ChatSession, DataRequest, EmailSend
from app.privacy import keyed_hash
from app.services import audit, chat_sessions, data_rights, email_verification
from app.services.audit import AuditContext
from app.storage import StorageUnavailable, current_storage, session_objects

log = logging.getLogger(__name__)

CODE_DIGITS = 6
# The one answer to every well-formed request, whether or not the address is known.
ANSWER = "If this address belongs to a verified chat session, a code is on its way to it."
NO_CODE = "There is no valid code for this address. Please ask for a new one."


@dataclass(frozen=True)
class SessionSummary:
    """One session tied to the address, as the person may see it before exporting it."""

    created_at: datetime
    last_seen_at: datetime
    completed_at: datetime | None
    state: str
    file_count: int | None


@dataclass(frozen=True)
class Grant:
    """What a verified code gives: the bearer token, its lifetime and the sessions it reaches."""

    token: str
    expires_in: int
    sessions: list[SessionSummary]


@dataclass(frozen=True)
class Holder:
    """Who a valid token speaks for: the address and the grant behind the token."""

    address: str
    grant_id: str


def init_app(app: Flask) -> None:
    """The thread that mails data-request codes, one per process."""
    app.extensions["data_request_outbox"] = ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="data-request-mail"
    )


def request_code(raw_email: str, context: AuditContext) -> None:
    """Mail a code to the address if a live session has it verified; the same outcome either way.

    Both paths look the address up and write one audit row, and the mail goes out from a
    background thread, so the answer takes about as long for a known address as for another.
    """
    address = _normalised(raw_email)
    reference = _reference(address)
    now = utcnow()
    outcome = "unknown"
    code = None
    send_id = None
    if _sessions_of(address):
        mailbox = email_verification.mailbox_hash(address)
        network = email_verification.network_hash(context)
        email_verification.hold_mailbox(mailbox)
        outcome = _refusal(reference, mailbox, network, now) or "sent"
        if outcome == "sent":
            code = f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"
            send_id = _claim(reference, mailbox, network, code, now)
    audit.record("data_request_received", context, address_ref=reference[:16], outcome=outcome)
    db.session.commit()
    if code is not None and send_id is not None:
        outbox: ThreadPoolExecutor = current_app.extensions["data_request_outbox"]
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        outbox.submit(_deliver, app, address, code, send_id)


def verify(raw_email: str, code: str, context: AuditContext) -> Grant:
    """A token for the address if ``code`` is its live code; CodeRefused otherwise."""
    address = _normalised(raw_email)
    reference = _reference(address)
    now = utcnow()
    config = current_app.config
    request = db.session.scalars(
        select(DataRequest)
        .where(DataRequest.address_hash == reference, DataRequest.code_hash.is_not(None))
        .order_by(DataRequest.id.desc())
        .limit(1)
        .with_for_update()
    ).first()
    if request is None:
        raise _refused(context, reference, "no_code", NO_CODE)
    if request.code_expires_at <= now:
        request.code_hash = None
        raise _refused(
            context, reference, "code_expired", "This code has expired. Please ask for a new one."
        )
    if not hmac.compare_digest(request.code_hash or "", _code_hash(reference, code)):
        request.attempts_left -= 1
        if request.attempts_left <= 0:
            request.code_hash = None
            raise _refused(
                context,
                reference,
                "too_many_attempts",
                "Too many wrong codes. Please ask for a new code.",
            )
        left = request.attempts_left
        raise _refused(
            context,
            reference,
            "invalid_code",
            f"That code is not right. {left} attempt{'s' if left != 1 else ''} left.",
        )
    request.code_hash = None
    request.grant_id = secrets.token_hex(16)
    audit.record("data_request_verified", context, address_ref=reference[:16])
    db.session.commit()
    lifetime = config["DATA_REQUEST_TOKEN_MINUTES"] * 60
    claims = json.dumps({"a": address, "g": request.grant_id}).encode()
    token = _fernet(config["SECRET_KEY"]).encrypt(claims).decode()
    return Grant(token=token, expires_in=lifetime, sessions=summaries(address))


def holder(authorization: str | None) -> Holder:
    """Who the ``Authorization: Bearer`` token speaks for; 401 if it is missing or not valid."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise CredentialsMissing()
    config = current_app.config
    try:
        claims = json.loads(
            _fernet(config["SECRET_KEY"]).decrypt(
                token.strip().encode(), ttl=config["DATA_REQUEST_TOKEN_MINUTES"] * 60
            )
        )
        address, grant_id = str(claims["a"]), str(claims["g"])
    except (InvalidToken, ValueError, KeyError, TypeError):
        raise TokenRejected() from None
    live = db.session.scalar(
        select(func.count())
        .select_from(DataRequest)
        .where(DataRequest.grant_id == grant_id, DataRequest.revoked_at.is_(None))
    )
    if not live:
        raise TokenRejected()
    return Holder(address, grant_id)


def summaries(address: str) -> list[SessionSummary]:
    """The sessions tied to ``address``, oldest first, without their UUIDs."""
    storage = current_storage()
    found = []
    for chat_session in _sessions_of(address):
        try:
            count: int | None = len(session_objects(storage, chat_session.uuid))
        except StorageUnavailable:
            count = None  # the summary still helps; the export says what storage holds
        found.append(
            SessionSummary(
                chat_session.created_at,
                chat_session.last_seen_at,
                chat_session.completed_at,
                chat_session.state.value,
                count,
            )
        )
    return found


def operator_address(raw_email: str) -> str:
    """The address an operator typed, checked and normalised like a request's."""
    return _normalised(raw_email)


def find(address: str, context: AuditContext) -> list[SessionSummary]:
    """The sessions tied to an address, for an operator (audited as such)."""
    found = summaries(address)
    audit.record(
        "data_request_found", context, address_ref=_reference(address)[:16], sessions=len(found)
    )
    db.session.commit()
    return found


def export_all(
    address: str, context: AuditContext, *, by: str = "token"
) -> list[data_rights.SessionExport]:
    """Everything held about each session tied to ``address``, as the per-session export.

    ``by`` says who asked, for the audit trail: the holder of a token, or an operator.
    """
    exports = []
    for session_uuid in [chat_session.uuid for chat_session in _sessions_of(address)]:
        try:
            exports.append(data_rights.export(session_uuid, context))
        except SessionNotFound:
            continue  # erased since it was found: nothing is held there any more
    audit.record(
        "data_request_exported",
        context,
        address_ref=_reference(address)[:16],
        sessions=len(exports),
        by=by,
    )
    db.session.commit()
    return exports


def export_document(address: str, context: AuditContext, *, by: str = "token") -> dict[str, Any]:
    """The export of every session tied to ``address``, as one JSON document to download."""
    return {
        "status": "success",
        "message": "Everything this service holds under this address.",
        "exported_at": utcnow(),
        "sessions": [
            {
                "profile": exported.chat_session,
                "consent_history": exported.consent_history,
                "files": exported.files,
                "audit_events": exported.audit_events,
            }
            for exported in export_all(address, context, by=by)
        ],
    }


def erase_all(
    address: str, context: AuditContext, *, grant_id: str | None = None, by: str = "token"
) -> list[SessionSummary]:
    """Erase every session tied to ``address`` like DELETE /session; every token of it dies.

    Each session is erased on its own. If storage fails part-way, StorageUnavailableError is
    raised, the sessions erased so far stay erased (their rows gone, some files maybe left),
    and the token lives on. The grant remembers which sessions its erasure began, because a
    session without its row is no longer found by its address: the retry finishes each of
    them (deleting the files left), as a repeated DELETE /session does, before the token dies.
    """
    erased = summaries(address)
    begun = _begin_erasure(grant_id, [chat_session.uuid for chat_session in _sessions_of(address)])
    for session_uuid in begun:
        try:
            data_rights.erase(session_uuid, context)
        except SessionNotFound:
            continue  # erased and finished meanwhile, by another tab or a job
    reference = _reference(address)
    db.session.execute(
        update(DataRequest)
        .where(DataRequest.address_hash == reference, DataRequest.revoked_at.is_(None))
        .values(revoked_at=utcnow(), code_hash=None, erasing=None)
    )
    audit.record(
        "data_request_erased", context, address_ref=reference[:16], sessions=len(erased), by=by
    )
    db.session.commit()
    return erased


def _begin_erasure(grant_id: str | None, found: list[uuid.UUID]) -> list[uuid.UUID]:
    """The sessions to erase: those found now and those an earlier attempt began (committed)."""
    if grant_id is None:
        return found
    request = db.session.scalars(
        select(DataRequest).where(DataRequest.grant_id == grant_id).with_for_update()
    ).one()
    begun = [uuid.UUID(value) for value in request.erasing or []]
    pending = begun + [session_uuid for session_uuid in found if session_uuid not in begun]
    request.erasing = [str(session_uuid) for session_uuid in pending]
    db.session.commit()
    return pending


def _sessions_of(address: str) -> list[ChatSession]:
    query = (
        select(ChatSession)
        .where(func.lower(ChatSession.email) == address.lower(), ChatSession.email_verified)
        .order_by(ChatSession.created_at, ChatSession.uuid)
    )
    return list(db.session.scalars(query))


def _refusal(reference: str, mailbox: str, network: str, now: datetime) -> str | None:
    """Why no code may be mailed now (cooldown, a mailbox cap), or None."""
    cooldown = timedelta(seconds=current_app.config["EMAIL_SEND_COOLDOWN_SECONDS"])
    last = db.session.scalar(
        select(func.max(DataRequest.requested_at)).where(DataRequest.address_hash == reference)
    )
    if last is not None and now - last < cooldown:
        return "cooldown"
    return email_verification.mailbox_limit_reached(mailbox, network, now)


def _claim(reference: str, mailbox: str, network: str, code: str, now: datetime) -> int:
    """Record the new code (voiding earlier ones) and its send; the send's id."""
    config = current_app.config
    db.session.execute(
        update(DataRequest)
        .where(DataRequest.address_hash == reference, DataRequest.code_hash.is_not(None))
        .values(code_hash=None)
    )
    db.session.add(
        DataRequest(
            address_hash=reference,
            code_hash=_code_hash(reference, code),
            code_expires_at=now + timedelta(minutes=config["EMAIL_CODE_TTL_MINUTES"]),
            attempts_left=config["EMAIL_CODE_MAX_ATTEMPTS"],
            requested_at=now,
        )
    )
    send = EmailSend(
        session_uuid=None, address_hash=mailbox, network_hash=network, sent_at=now, delivered=False
    )
    db.session.add(send)
    db.session.flush()
    return send.id


def _deliver(app: Flask, address: str, code: str, send_id: int) -> None:
    """Mail the code, then record whether it went (runs on the outbox thread)."""
    with app.app_context():
        try:
            current_mailer().send(_message(address, code))
            delivered = True
        except MailUnavailable:
            log.warning("data-request code not sent: mail server unavailable")
            delivered = False
        try:
            db.session.execute(
                update(EmailSend)
                .where(EmailSend.id == send_id)
                .values(delivered=delivered, failed=not delivered)
            )
            db.session.commit()
        except Exception:
            db.session.rollback()
            log.exception("data-request send not recorded")
        finally:
            db.session.remove()


def _refused(context: AuditContext, reference: str, error: str, message: str) -> CodeRefused:
    """Record a refused code (with what the refusal changed) and build the error to raise."""
    audit.record("data_request_code_refused", context, address_ref=reference[:16], reason=error)
    db.session.commit()
    return CodeRefused(error, message)


def _normalised(raw_email: str) -> str:
    address = chat_sessions.normalise_email(raw_email)
    if address is None:
        raise InvalidRequest(details={"email": ["Missing data for required field."]})
    return address


def _reference(address: str) -> str:
    """The keyed hash a data request keeps of its address (letter case ignored)."""
    return keyed_hash("data-request-address", address.lower())


def _code_hash(reference: str, code: str) -> str:
    return keyed_hash(f"data-request-code:{reference}", code)


@functools.lru_cache(maxsize=4)
def _fernet(secret_key: str) -> Fernet:
    key = hmac.new(secret_key.encode(), b"data-request-tokens", hashlib.sha256).digest()
    return Fernet(base64.urlsafe_b64encode(key))


def _message(address: str, code: str) -> EmailMessage:
    config = current_app.config
    message = EmailMessage()
    message["Subject"] = f"Your code to see or delete your data at {config['SERVICE_NAME']}"
    message["From"] = config["MAIL_FROM"]
    message["To"] = address
    message.set_content(
        f"Someone, hopefully you, asked to see or delete the data {config['SERVICE_NAME']} "
        f"holds under this address.\n\nYour code is {code}. It is valid for "
        f"{config['EMAIL_CODE_TTL_MINUTES']} minutes.\n\nIf it was not you, ignore this "
        "message: nothing happens without the code."
    )
    return message
