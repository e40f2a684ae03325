"""E-mail verification: a 6-digit code by mail completes the session.

Outcomes the frontend must act on are returned, not raised: the route answers them with
HTTP 200 and the screen to show next. Codes and addresses never reach the logs or the
audit trail; the database keeps a code only as a keyed hash.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import math
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage

from email_validator import EmailNotValidError, validate_email
from flask import current_app, has_request_context, render_template, request
from sqlalchemy import ColumnElement, delete, func, insert, or_, select, update

from app import metrics
from app.clock import utcnow
from app.errors import SessionNotFound
from app.extensions import advisory_xact_lock, db, has_advisory_locks
from app.mail import MailUnavailable, current_mailer
from app.messages import SESSION_RESET
from app.models import ChatSession, EmailSend, SessionState
from app.privacy import IPV4_KEPT_PREFIX, IPV6_SUBSCRIBER_PREFIX, keyed_hash, mask_email
from app.services import audit, chat_sessions, security_monitor
from app.services.audit import AuditContext

CODE_DIGITS = 6


class Transition(enum.StrEnum):
    """The screen the frontend shows next."""

    EMAIL_INPUT = "EMAIL_INPUT"
    CODE_INPUT = "CODE_INPUT"
    SESSION_RESET = "SESSION_RESET"
    CHAT_READY = "CHAT_READY"


@dataclass(frozen=True)
class Outcome:
    """What happened, in the frontend's terms."""

    success: bool
    message: str
    next_transition: Transition
    error: str | None = None


def _failure(error: str, message: str, transition: Transition) -> Outcome:
    return Outcome(False, message, transition, error)


SESSION_GONE = _failure("session_not_found", SESSION_RESET, Transition.SESSION_RESET)
ALREADY_VERIFIED = Outcome(True, "Your e-mail address is verified.", Transition.CHAT_READY)


def request_code(session_uuid: uuid.UUID, raw_email: str, context: AuditContext) -> Outcome:
    """Store the address as the session's unverified e-mail and send it a code."""
    chat_session = _locked_session(session_uuid)
    if chat_session is None:
        return SESSION_GONE
    try:
        email = validate_email(raw_email, check_deliverability=False).normalized
    except EmailNotValidError:
        db.session.commit()
        return _failure(
            "invalid_email", "Please enter a valid e-mail address.", Transition.EMAIL_INPUT
        )
    if chat_session.email_verified and chat_session.email == email:
        db.session.commit()
        return ALREADY_VERIFIED
    now = utcnow()
    if (
        chat_session.email == email
        and _code_is_live(chat_session, now)
        and _cooldown_left(_last_send(session_uuid, now), now) is not None
    ):
        # A retry of the same request: the code just sent still stands; send nothing.
        db.session.commit()
        return _code_sent(email)
    return _send_code(chat_session, email, now, context, Transition.EMAIL_INPUT)


def resend_code(session_uuid: uuid.UUID, context: AuditContext) -> Outcome:
    """Send a fresh code to the stored address."""
    chat_session = _locked_session(session_uuid)
    if chat_session is None:
        return SESSION_GONE
    if chat_session.email_verified:
        db.session.commit()
        return ALREADY_VERIFIED
    if chat_session.email is None:
        db.session.commit()
        return _failure(
            "no_email", "Please enter your e-mail address first.", Transition.EMAIL_INPUT
        )
    return _send_code(chat_session, chat_session.email, utcnow(), context, Transition.CODE_INPUT)


def verify_code(session_uuid: uuid.UUID, code: str, context: AuditContext) -> Outcome:
    """Check a code; the right one verifies the e-mail and completes the session."""
    chat_session = _locked_session(session_uuid)
    if chat_session is None:
        return SESSION_GONE
    if chat_session.email_verified:
        db.session.commit()
        return ALREADY_VERIFIED
    now = utcnow()
    stored_hash = chat_session.verification_code_hash
    if stored_hash is None:
        db.session.commit()
        if chat_session.email is None:
            return _failure(
                "no_code", "Please enter your e-mail address first.", Transition.EMAIL_INPUT
            )
        return _failure(
            "no_code", "There is no valid code. Please request a new one.", Transition.CODE_INPUT
        )
    expires_at = chat_session.verification_code_expires_at
    if expires_at is None or now >= expires_at:
        _clear_code(chat_session)
        audit.record("verification_code_expired", context, session_uuid)
        db.session.commit()
        return _failure(
            "code_expired",
            "This code has expired. Please request a new one.",
            Transition.CODE_INPUT,
        )
    candidate = code.strip()
    if len(candidate) != CODE_DIGITS or not candidate.isdigit():
        db.session.commit()
        return _failure(
            "invalid_code", f"Please enter the {CODE_DIGITS}-digit code.", Transition.CODE_INPUT
        )
    if hmac.compare_digest(_code_hash(session_uuid, candidate), stored_hash):
        _clear_code(chat_session)
        chat_session.email_verified = True
        chat_session.state = SessionState.VERIFIED
        chat_session.completed_at = now
        audit.record("email_verified", context, session_uuid)
        db.session.commit()
        return ALREADY_VERIFIED
    attempts_left = max((chat_session.verification_attempts_left or 1) - 1, 0)
    chat_session.verification_attempts_left = attempts_left
    if attempts_left == 0:
        _clear_code(chat_session)
    audit.record("verification_code_rejected", context, session_uuid, attempts_left=attempts_left)
    db.session.commit()
    security_monitor.watch_failed_codes(context, session_uuid)
    if attempts_left == 0:
        return _failure(
            "too_many_attempts",
            "Too many wrong codes. Please request a new code.",
            Transition.CODE_INPUT,
        )
    return _failure(
        "invalid_code",
        f"That code is not right. {_count(attempts_left, 'attempt')} left.",
        Transition.CODE_INPUT,
    )


@dataclass(frozen=True)
class _VerificationFields:
    """The session's e-mail and verification state, as it was before a send was claimed."""

    email: str | None
    email_verified: bool
    state: SessionState
    completed_at: datetime | None
    code_hash: str | None
    code_expires_at: datetime | None
    attempts_left: int | None

    @classmethod
    def of(cls, chat_session: ChatSession) -> _VerificationFields:
        return cls(
            chat_session.email,
            chat_session.email_verified,
            chat_session.state,
            chat_session.completed_at,
            chat_session.verification_code_hash,
            chat_session.verification_code_expires_at,
            chat_session.verification_attempts_left,
        )

    def restore(self, chat_session: ChatSession) -> None:
        chat_session.email = self.email
        chat_session.email_verified = self.email_verified
        chat_session.state = self.state
        chat_session.completed_at = self.completed_at
        chat_session.verification_code_hash = self.code_hash
        chat_session.verification_code_expires_at = self.code_expires_at
        chat_session.verification_attempts_left = self.attempts_left


@dataclass(frozen=True)
class _ClaimedSend:
    """A code issued and counted, committed before the message goes out."""

    session_uuid: uuid.UUID
    send_id: int
    code: str = field(repr=False)
    previous: _VerificationFields = field(repr=False)

    @property
    def code_hash(self) -> str:
        return _code_hash(self.session_uuid, self.code)


def _send_code(
    chat_session: ChatSession,
    email: str,
    now: datetime,
    context: AuditContext,
    stay_on: Transition,
) -> Outcome:
    """Claim a send under the session's lock, commit, mail with no lock held, record the outcome.

    The claim (the new code on the session and an undelivered row in ``email_sends``) is
    committed first, so a retry that arrives while the mail server is slow finds the code live
    and the send in flight, and sends nothing. A send still undelivered once the mail deadline
    has passed (the process died, or its outcome could not be recorded) stops counting, so a
    later request sends again.
    """
    code = f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"
    # Built before anything is claimed: a message that cannot be built claims nothing.
    message = _verification_message(email, code)
    claim = _claim_send(chat_session, email, code, now, context, stay_on)
    if isinstance(claim, Outcome):
        return claim
    try:
        current_mailer().send(message)
    except MailUnavailable:
        metrics.count_email(metrics.VERIFICATION_CODE_MAIL, sent=False)
        _undo_claim(claim, context)
        current_app.logger.warning("verification e-mail not sent: mail server unavailable")
        return _failure(
            "mail_unavailable",
            "We could not send the e-mail just now. Please try again in a few minutes.",
            stay_on,
        )
    except Exception:
        metrics.count_email(metrics.VERIFICATION_CODE_MAIL, sent=False)
        _undo_claim(claim, context)
        raise
    metrics.count_email(metrics.VERIFICATION_CODE_MAIL, sent=True)
    db.session.execute(
        update(EmailSend).where(EmailSend.id == claim.send_id).values(delivered=True)
    )
    audit.record("verification_code_sent", context, claim.session_uuid)
    db.session.commit()
    return _code_sent(email)


def _claim_send(
    chat_session: ChatSession,
    email: str,
    code: str,
    now: datetime,
    context: AuditContext,
    stay_on: Transition,
) -> Outcome | _ClaimedSend:
    """Within the locked transaction: refuse (committed), or put ``code`` on the session, commit."""
    session_uuid = chat_session.uuid
    address_hash = mailbox_hash(email)
    client_network = network_hash(context)
    hold_mailbox(address_hash)
    refused = _limit_refusal(session_uuid, address_hash, client_network, now, stay_on)
    if refused is not None:
        limit, refusal = refused
        audit.record("verification_limit_hit", context, session_uuid, limit=limit)
        db.session.commit()
        return refusal
    previous = _VerificationFields.of(chat_session)
    address_changed = chat_session.email != email
    if address_changed:
        chat_session.email = email
        chat_session.require_email_verification()
    chat_session.verification_code_hash = _code_hash(session_uuid, code)
    chat_session.verification_code_expires_at = now + timedelta(
        minutes=current_app.config["EMAIL_CODE_TTL_MINUTES"]
    )
    chat_session.verification_attempts_left = current_app.config["EMAIL_CODE_MAX_ATTEMPTS"]
    send_id = db.session.scalar(
        insert(EmailSend)
        .values(
            session_uuid=session_uuid,
            address_hash=address_hash,
            network_hash=client_network,
            sent_at=now,
            delivered=False,
        )
        .returning(EmailSend.id)
    )
    audit.record("verification_code_issued", context, session_uuid, address_changed=address_changed)
    db.session.commit()
    return _ClaimedSend(session_uuid, int(send_id or 0), code, previous)


def _undo_claim(claim: _ClaimedSend, context: AuditContext) -> None:
    """The message did not go out: the send stops counting, and the previous code comes back.

    Nothing here waits for the session's row. If another request holds it, the claimed code
    stays on the session and the send record stays too, marked failed: it counts against no
    limit, and the session's next verification step sees it and voids that code.
    """
    chat_session = chat_sessions.session_if_free(claim.session_uuid)
    if chat_session is None:
        db.session.execute(
            update(EmailSend).where(EmailSend.id == claim.send_id).values(failed=True)
        )
    else:
        # Only if nothing replaced the claimed code meanwhile (a newer send, a withdrawal).
        if chat_session.verification_code_hash == claim.code_hash:
            claim.previous.restore(chat_session)
        db.session.execute(delete(EmailSend).where(EmailSend.id == claim.send_id))
    audit.record("verification_send_failed", context, claim.session_uuid)
    db.session.commit()


_ADDRESS_DAILY_LIMIT = "Too many codes were sent to this address today. Please try again tomorrow."


def _limit_refusal(
    session_uuid: uuid.UUID,
    address_hash: str,
    network_hash: str,
    now: datetime,
    stay_on: Transition,
) -> tuple[str, Outcome] | None:
    """The limit a send would break (as the audit trail names it) and the answer, or None."""
    config = current_app.config
    wait_for = _cooldown_left(_last_send(session_uuid, now), now)
    if wait_for is not None:
        wait = max(1, math.ceil(wait_for.total_seconds()))
        return "cooldown", _failure(
            "cooldown",
            f"A code was sent moments ago. Please wait {_count(wait, 'second')} before asking "
            "again.",
            stay_on,
        )
    hourly = _count_sends(EmailSend.session_uuid == session_uuid, now - timedelta(hours=1), now)
    if hourly >= config["EMAIL_SENDS_PER_SESSION_PER_HOUR"]:
        return "hourly_limit", _failure(
            "hourly_limit",
            "Too many codes were requested for this session. Please try again in an hour.",
            stay_on,
        )
    limit = mailbox_limit_reached(address_hash, network_hash, now)
    if limit is not None:
        # Both mailbox caps answer the user alike; the audit trail tells them apart.
        return limit, _failure("address_daily_limit", _ADDRESS_DAILY_LIMIT, stay_on)
    return None


def mailbox_limit_reached(address_hash: str, network_hash: str, now: datetime) -> str | None:
    """The daily cap of the mailbox that one more send to it would break, or None.

    The mailbox's allowance is counted per network first, so a stranger's network uses up only
    its own share; the ceiling across networks still bounds the mail one inbox gets in a day.
    Every code mailed counts, whatever it is for. The caller holds ``hold_mailbox``.
    """
    config = current_app.config
    caps = [
        (
            "address_network_daily_limit",
            (EmailSend.address_hash == address_hash) & (EmailSend.network_hash == network_hash),
            "EMAIL_SENDS_PER_ADDRESS_PER_NETWORK_PER_DAY",
        ),
        (
            "address_daily_limit",
            EmailSend.address_hash == address_hash,
            "EMAIL_SENDS_PER_ADDRESS_PER_DAY",
        ),
    ]
    for limit, sender, setting in caps:
        if _count_sends(sender, now - timedelta(days=1), now) >= config[setting]:
            return limit
    return None


def hold_mailbox(address_hash: str) -> None:
    """Hold a lock on this address until commit, so concurrent sessions count its sends in turn.

    SQLite already runs one writer at a time, and the session touch before this took the
    write lock.
    """
    if has_advisory_locks():
        advisory_xact_lock(f"email-address:{address_hash}")


def _counted(now: datetime) -> ColumnElement[bool]:
    """Sends that count: delivered, or claimed recently enough to be still on their way.

    A claim is on its way for at most the mail deadline plus the statement that records its
    outcome; one undelivered after that failed without saying so.
    """
    config = current_app.config
    in_flight = timedelta(
        seconds=config["SMTP_TIMEOUT_SECONDS"] + config["DATABASE_STATEMENT_TIMEOUT_MS"] / 1000
    )
    in_time = or_(EmailSend.delivered, EmailSend.sent_at > now - in_flight)
    return in_time & EmailSend.failed.is_(False)


def _count_sends(condition: ColumnElement[bool], since: datetime, now: datetime) -> int:
    query = (
        select(func.count())
        .select_from(EmailSend)
        .where(condition, EmailSend.sent_at > since, _counted(now))
    )
    return int(db.session.scalar(query) or 0)


def _last_send(session_uuid: uuid.UUID, now: datetime) -> datetime | None:
    return db.session.scalar(
        select(func.max(EmailSend.sent_at)).where(
            EmailSend.session_uuid == session_uuid, _counted(now)
        )
    )


def _cooldown_left(last_sent: datetime | None, now: datetime) -> timedelta | None:
    """How long until another code may be sent, or None if it may be sent now."""
    cooldown = timedelta(seconds=current_app.config["EMAIL_SEND_COOLDOWN_SECONDS"])
    if last_sent is None or now - last_sent >= cooldown:
        return None
    return cooldown - (now - last_sent)


def _locked_session(session_uuid: uuid.UUID) -> ChatSession | None:
    """The live session, locked until commit (one verification step at a time)."""
    try:
        chat_session = chat_sessions.locked_session(session_uuid)
    except SessionNotFound:
        db.session.rollback()
        return None
    _void_unreceived_code(chat_session)
    return chat_session


def _void_unreceived_code(chat_session: ChatSession) -> None:
    """Clear the code a failed send left on the session because its row was held elsewhere.

    Every code is put on the session together with its send record, under the row lock, so the
    session's latest record tells whether its code went out. Left in place, a code nobody
    received would take guesses that no sending limit counted.
    """
    if chat_session.verification_code_hash is None:
        return
    latest_failed = db.session.scalar(
        select(EmailSend.failed)
        .where(EmailSend.session_uuid == chat_session.uuid)
        .order_by(EmailSend.id.desc())
        .limit(1)
    )
    if latest_failed:
        _clear_code(chat_session)


def _code_is_live(chat_session: ChatSession, now: datetime) -> bool:
    expires_at = chat_session.verification_code_expires_at
    return (
        chat_session.verification_code_hash is not None
        and expires_at is not None
        and now < expires_at
    )


def _clear_code(chat_session: ChatSession) -> None:
    chat_session.verification_code_hash = None
    chat_session.verification_code_expires_at = None
    chat_session.verification_attempts_left = None


def _code_sent(email: str) -> Outcome:
    return Outcome(
        True,
        f"We sent a {CODE_DIGITS}-digit code to {mask_email(email)}.",
        Transition.CODE_INPUT,
    )


def _count(number: int, noun: str) -> str:
    """``1 attempt``, ``2 attempts``: the user reads these sentences."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _code_hash(session_uuid: uuid.UUID, code: str) -> str:
    return keyed_hash(f"code:{session_uuid}", code)


def mailbox_hash(email: str) -> str:
    """The keyed hash the caps count a mailbox by (see ``_mailbox``)."""
    return keyed_hash("address", _mailbox(email))


def _mailbox(email: str) -> str:
    """The mailbox an address delivers to: lower case, any plus-tag dropped.

    ``Ann+1@x`` and ``ann+2@x`` reach the inbox of ``ann@x``; counted apart, each tag would be a
    fresh allowance for flooding it. A local part that starts with ``+`` has no tag to drop.
    """
    local, _, domain = email.lower().rpartition("@")
    untagged = local.split("+", 1)[0]
    return f"{untagged or local}@{domain}"


def network_hash(context: AuditContext) -> str:
    """The keyed hash of the asking client's network: its IPv4 /24 or IPv6 /64."""
    # The audit context keeps an IPv6 client only to its /48, too coarse to tell subscribers
    # apart; the request has the whole address. Outside a request the context is all there is.
    address = request.remote_addr if has_request_context() else context.client_ip
    return keyed_hash("network", _client_network(address))


def _client_network(address: str | None) -> str:
    """``198.51.100.0/24`` or ``2001:db8:1:2::/64``; ``unknown`` if not an IP address."""
    try:
        ip = ipaddress.ip_address((address or "").strip())
    except ValueError:
        return "unknown"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = IPV4_KEPT_PREFIX if ip.version == 4 else IPV6_SUBSCRIBER_PREFIX
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def _verification_message(email: str, code: str) -> EmailMessage:
    config = current_app.config
    values = {
        "service_name": config["SERVICE_NAME"],
        "code": code,
        "ttl_minutes": config["EMAIL_CODE_TTL_MINUTES"],
    }
    message = EmailMessage()
    message["Subject"] = f"Your {config['SERVICE_NAME']} verification code"
    message["From"] = config["MAIL_FROM"]
    message["To"] = email
    message.set_content(render_template("email/verification.txt", **values))
    message.add_alternative(render_template("email/verification.html", **values), subtype="html")
    return message
