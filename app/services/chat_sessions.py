"""Chat session lifecycle: issuing, validating, describing and locking sessions."""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, cast
from uuid import uuid4

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import (
    Table,
    bindparam,
    delete,
    exists,
    false,
    func,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import ReturningInsert

from app.clock import utcnow
from app.errors import (
    InvalidRequest,
    SessionNotFound,
    StorageUnavailableError,
    UuidGenerationFailed,
)
from app.extensions import advisory_xact_lock, db, execute, has_advisory_locks
from app.models import ChatSession, RetiredSessionUUID, SessionState
from app.services import audit
from app.services.audit import AuditContext
from app.services.erasure import files_lock_name
from app.storage import StorageUnavailable, current_storage, session_objects

GENERATION_ATTEMPTS = 3

# The canonical spelling only: 8-4-4-4-12 hex digits, version nibble 4, RFC 4122 variant.
_UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def parse_uuid4(raw: str) -> uuid.UUID | None:
    """The UUID if ``raw`` spells a version 4 UUID in any letter case, else None."""
    text = raw.strip().lower()
    return uuid.UUID(text) if _UUID4.match(text) else None


class Verdict(enum.StrEnum):
    """What validate-uuid tells the frontend."""

    SUCCESS = "success"
    COLLISION = "collision"
    INVALID = "invalid"


@dataclass(frozen=True)
class ValidationResult:
    """A verdict and the UUID the frontend should hold from now on."""

    verdict: Verdict
    session_uuid: uuid.UUID | None
    registered: bool = False


class _Claim(enum.Enum):
    RESUMED = "resumed"
    REGISTERED = "registered"
    ENDED = "ended"


class SessionBudget(Protocol):
    """The caller's allowance of new sessions (app.rate_limits.NewSessionBudget)."""

    def spend(self) -> None:
        """Count one new session, or raise RateLimited."""
        ...


def generate(context: AuditContext, budget: SessionBudget) -> uuid.UUID:
    """Issue a fresh UUID registered as a pending session."""
    budget.spend()
    session_uuid = _issue_fresh_uuid(context)
    db.session.commit()
    return session_uuid


def validate(raw: str, context: AuditContext, budget: SessionBudget) -> ValidationResult:
    """Resume a live session, register an unknown v4 UUID, or replace an ended one.

    Only registering and replacing spend from ``budget``; resuming is free.
    """
    session_uuid = parse_uuid4(raw)
    if session_uuid is None:
        audit.record("uuid_invalid", context, reason="not_uuid_v4")
        db.session.commit()
        return ValidationResult(Verdict.INVALID, None)

    claim = _resume_or_register(session_uuid, context, budget)
    if claim is _Claim.ENDED:
        replacement = _issue_fresh_uuid(context)
        audit.record("uuid_collision", context, session_uuid, replacement=str(replacement))
        db.session.commit()
        return ValidationResult(Verdict.COLLISION, replacement, registered=True)

    registered = claim is _Claim.REGISTERED
    audit.record("uuid_registered" if registered else "uuid_validated", context, session_uuid)
    db.session.commit()
    return ValidationResult(Verdict.SUCCESS, session_uuid, registered=registered)


@dataclass(frozen=True)
class SessionOverview:
    """A live session and how many files it holds."""

    chat_session: ChatSession
    file_count: int


def describe(session_uuid: uuid.UUID) -> SessionOverview:
    """A live session and its file count, with its last-seen time touched."""
    chat_session = _live_session(session_uuid)
    chat_session.last_seen_at = utcnow()
    db.session.commit()
    try:
        file_count = len(session_objects(current_storage(), session_uuid))
    except StorageUnavailable as exc:
        raise StorageUnavailableError() from exc
    return SessionOverview(chat_session, file_count)


def count_by_state() -> dict[SessionState, int]:
    """How many live sessions are in each state (an index-only scan on PostgreSQL)."""
    rows = db.session.execute(_COUNT_BY_STATE).all()
    db.session.commit()
    counts = dict.fromkeys(SessionState, 0)
    counts.update({SessionState(state): count for state, count in rows})
    return counts


def lock_live_session(session_uuid: uuid.UUID) -> None:
    """Touch a live session and hold its row until the caller commits; SessionNotFound if none.

    On PostgreSQL the UPDATE takes the row lock; on SQLite it takes the database write lock.
    Either way, operations on one session that start with this run one at a time.
    """
    if session_uuid.version != 4 or not _touch(session_uuid, utcnow()):
        raise SessionNotFound()


def is_live(session_uuid: uuid.UUID) -> bool:
    """Whether a session row exists for ``session_uuid`` (no lock, no touch)."""
    return bool(execute(_IS_LIVE, {"session_uuid": session_uuid}).scalar())


def hold_session_files(session_uuid: uuid.UUID) -> None:
    """Serialise this live session's file operations until the caller commits.

    The session is touched first. On PostgreSQL that touch is committed at once, so the row,
    which every other call touches, is free again before storage is called; the file lock is
    an advisory lock that only the session's other file operations (upload, delete, consent
    withdrawal, erasure) wait for. On SQLite the touch takes the database-wide write lock, which
    serialises writers anyway. Call it before anything else in the transaction.
    SessionNotFound if the session is not live.
    """
    if session_uuid.version != 4 or not _touch(session_uuid, utcnow()):
        raise SessionNotFound()
    if has_advisory_locks():
        db.session.commit()
        advisory_xact_lock(files_lock_name(session_uuid))
        # An erasure may have ended the session between the touch and the lock.
        if not is_live(session_uuid):
            raise SessionNotFound()


def session_if_free(session_uuid: uuid.UUID) -> ChatSession | None:
    """The live session, locked until commit, or None if it is gone or another request holds it.

    It never waits for the lock (PostgreSQL's SKIP LOCKED); SQLite takes its write lock at the
    caller's first write, as ever.
    """
    query = (
        select(ChatSession)
        .where(ChatSession.uuid == session_uuid)
        .with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)
    )
    return db.session.scalars(query).one_or_none()


def locked_session(session_uuid: uuid.UUID) -> ChatSession:
    """A live session, touched and locked until the caller commits; SessionNotFound if none."""
    lock_live_session(session_uuid)
    return _live_session(session_uuid)


def _live_session(session_uuid: uuid.UUID) -> ChatSession:
    """The session row, or SessionNotFound for non-v4, unknown and ended UUIDs."""
    if session_uuid.version != 4:
        raise SessionNotFound()
    query = select(ChatSession).where(ChatSession.uuid == session_uuid)
    chat_session = db.session.scalars(query.execution_options(populate_existing=True)).one_or_none()
    if chat_session is None:
        raise SessionNotFound()
    return chat_session


def clean_name(name: str | None) -> str | None:
    if name is None:
        return None
    stripped = " ".join(name.split())
    if not stripped:
        raise InvalidRequest(details={"name": ["Must not be blank."]})
    return stripped


def normalise_email(email: str | None) -> str | None:
    if email is None:
        return None
    try:
        return validate_email(email, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise InvalidRequest(details={"email": [str(exc)]}) from exc


def _issue_fresh_uuid(context: AuditContext) -> uuid.UUID:
    """Register a new random UUID, retrying on collision; audits every attempt.

    No re-check after the claim (unlike a client-supplied UUID): a random UUID
    that wins its insert was not live, so no erasure of it can be in flight.
    """
    for attempt in range(1, GENERATION_ATTEMPTS + 1):
        candidate = uuid4()
        if _claim(candidate, utcnow(), context.client_ip):
            audit.record("uuid_generated", context, candidate, attempt=attempt)
            return candidate
        audit.record("uuid_generation_collision", context, attempt=attempt)
    audit.record("uuid_generation_failed", context, attempts=GENERATION_ATTEMPTS)
    db.session.commit()
    raise UuidGenerationFailed()


def _resume_or_register(
    session_uuid: uuid.UUID, context: AuditContext, budget: SessionBudget
) -> _Claim:
    now = utcnow()
    if _touch(session_uuid, now):
        return _Claim.RESUMED
    # A new session follows either way: this one registered, or a replacement for an ended one.
    budget.spend()
    if _claim(session_uuid, now, context.client_ip):
        # An erasure deletes the row and writes the tombstone in one transaction. If
        # our insert had to wait for such a transaction, its tombstone was invisible
        # to the claim's snapshot but is visible to this later statement.
        if not _is_retired(session_uuid):
            return _Claim.REGISTERED
        execute(_UNCLAIM, {"session_uuid": session_uuid})
        return _Claim.ENDED
    # Another request registered it between our two statements.
    if _touch(session_uuid, now):
        return _Claim.RESUMED
    return _Claim.ENDED


# Statements are built once: building them costs more than running them.
_SESSIONS = cast(Table, ChatSession.__table__)
_RETIRED = cast(Table, RetiredSessionUUID.__table__)

_TOUCH = (
    update(_SESSIONS)
    .where(_SESSIONS.c.uuid == bindparam("session_uuid"))
    .values(last_seen_at=bindparam("now"))
    .returning(_SESSIONS.c.uuid)
)
_IS_RETIRED = select(exists().where(_RETIRED.c.uuid == bindparam("session_uuid")))
_IS_LIVE = select(exists().where(_SESSIONS.c.uuid == bindparam("session_uuid")))
_COUNT_BY_STATE = select(_SESSIONS.c.state, func.count()).group_by(_SESSIONS.c.state)
_UNCLAIM = delete(_SESSIONS).where(_SESSIONS.c.uuid == bindparam("session_uuid"))


def _claim_statement(
    insert: Callable[[Table], postgresql.Insert | sqlite.Insert],
) -> ReturningInsert[uuid.UUID]:
    """INSERT a pending session unless the UUID is live or retired, RETURNING it if inserted."""
    session_uuid = bindparam("session_uuid", type_=_SESSIONS.c.uuid.type)
    now = bindparam("now", type_=_SESSIONS.c.created_at.type)
    not_retired = ~exists().where(_RETIRED.c.uuid == session_uuid)
    row = select(
        session_uuid,
        literal(SessionState.PENDING.value),
        now,
        now,
        bindparam("client_ip", type_=_SESSIONS.c.client_ip.type),
        false(),
        false(),
    ).where(not_retired)
    columns = [
        "uuid",
        "state",
        "created_at",
        "last_seen_at",
        "client_ip",
        "consent_user_data",
        "email_verified",
    ]
    statement = insert(_SESSIONS).from_select(columns, row, include_defaults=False)
    return statement.on_conflict_do_nothing(index_elements=["uuid"]).returning(_SESSIONS.c.uuid)


_CLAIM = {
    "postgresql": _claim_statement(postgresql.insert),
    "sqlite": _claim_statement(sqlite.insert),
}


def _touch(session_uuid: uuid.UUID, now: datetime) -> bool:
    """Mark a live session as seen; False if there is no such row."""
    params = {"session_uuid": session_uuid, "now": now}
    return execute(_TOUCH, params).first() is not None


def _claim(session_uuid: uuid.UUID, now: datetime, client_ip: str | None) -> bool:
    """Insert a pending session unless the UUID is live or retired; True if inserted."""
    statement = _CLAIM[db.session.get_bind().dialect.name]
    params = {"session_uuid": session_uuid, "now": now, "client_ip": client_ip}
    return execute(statement, params).first() is not None


def _is_retired(session_uuid: uuid.UUID) -> bool:
    return bool(execute(_IS_RETIRED, {"session_uuid": session_uuid}).scalar())
