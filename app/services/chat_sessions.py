"""Chat session lifecycle: issuing, validating, describing and locking sessions."""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
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
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import ReturningInsert
from sqlalchemy.sql.selectable import CTE, Select

from app.clock import utcnow
from app.errors import (
    InvalidRequest,
    SessionNotFound,
    StorageUnavailableError,
    UuidGenerationFailed,
)
from app.extensions import (
    advisory_xact_lock,
    db,
    execute,
    has_advisory_locks,
    on_postgresql,
    scalar_alone,
)
from app.models import ChatSession, RetiredSessionUUID, SessionState
from app.services import audit
from app.services.audit import AuditContext
from app.services.erasure import files_lock_name
from app.storage import StorageUnavailable, current_storage, session_objects

GENERATION_ATTEMPTS = 3

# How stale ``last_seen_at`` may be. A session seen again within this time is not written:
# rewriting an indexed column on every request costs a dead tuple, index entries and WAL, and
# what reads the column (the abandoned purge, retention) counts in hours and days.
TOUCH_EVERY = timedelta(minutes=5)

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


class Budget(Protocol):
    """An allowance of the caller's, spent before the service acts (app.rate_limits.Budget)."""

    def spend(self) -> None:
        """Count one use, or raise RateLimited."""
        ...


def generate(context: AuditContext, budget: Budget) -> uuid.UUID:
    """Issue a fresh UUID registered as a pending session."""
    budget.spend()
    session_uuid = _issue_fresh_uuid(context, alone=True)
    db.session.commit()
    return session_uuid


def validate(
    raw: str, context: AuditContext, new_sessions: Budget, resumes: Budget
) -> ValidationResult:
    """Resume a live session, register an unknown v4 UUID, or replace an ended one.

    Every call spends from ``resumes``; only registering and replacing spend from
    ``new_sessions``.
    """
    resumes.spend()
    session_uuid = parse_uuid4(raw)
    if session_uuid is None:
        audit.record("uuid_invalid", context, reason="not_uuid_v4")
        db.session.commit()
        return ValidationResult(Verdict.INVALID, None)

    if on_postgresql() and _resumed_and_audited(session_uuid, context):
        return ValidationResult(Verdict.SUCCESS, session_uuid)
    claim = _resume_or_register(session_uuid, context, new_sessions)
    if claim is _Claim.ENDED:
        replacement = _issue_fresh_uuid(context, alone=False)
        audit.record("uuid_collision", context, session_uuid, replacement=str(replacement))
        db.session.commit()
        return ValidationResult(Verdict.COLLISION, replacement, registered=True)

    registered = claim is _Claim.REGISTERED
    audit.record("uuid_registered" if registered else "uuid_validated", context, session_uuid)
    db.session.commit()
    return ValidationResult(Verdict.SUCCESS, session_uuid, registered=registered)


@dataclass(frozen=True)
class SessionOverview:
    """A live session, how many files it holds, and when it was last seen (now)."""

    chat_session: ChatSession
    file_count: int
    # The stored last_seen_at may lag by up to TOUCH_EVERY; this call is the latest sighting.
    seen_at: datetime


def describe(session_uuid: uuid.UUID) -> SessionOverview:
    """A live session and its file count, with its last-seen time touched."""
    now = utcnow()
    if session_uuid.version != 4 or not _mark_seen(session_uuid, now, lock=False):
        raise SessionNotFound()
    chat_session = _live_session(session_uuid)
    db.session.commit()
    try:
        file_count = len(session_objects(current_storage(), session_uuid))
    except StorageUnavailable as exc:
        raise StorageUnavailableError() from exc
    return SessionOverview(chat_session, file_count, seen_at=now)


def count_by_state() -> dict[SessionState, int]:
    """How many live sessions are in each state: counted, or on a large table estimated.

    Counting reads the whole table, which at millions of sessions takes longer than a scrape
    should, and at tens of millions longer than the statement timeout. Above COUNT_UP_TO rows
    PostgreSQL's own statistics answer instead: the table's size and each state's share as of
    its last ANALYZE, which autovacuum repeats after every tenth of the table has changed.
    """
    counts = dict.fromkeys(SessionState, 0)
    estimate = _estimated_by_state() if on_postgresql() else None
    if estimate is not None:
        counts.update(estimate)
    else:
        rows = db.session.execute(_COUNT_BY_STATE).all()
        counts.update({SessionState(state): count for state, count in rows})
    db.session.commit()
    return counts


# Below this many rows (by the planner's statistics) an exact count costs a few milliseconds.
COUNT_UP_TO = 100_000


def _estimated_by_state() -> dict[SessionState, int] | None:
    """Sessions per state from PostgreSQL's statistics; None if the table is small or unanalysed."""
    row = execute(_STATE_STATISTICS).one()
    if row.reltuples < COUNT_UP_TO or row.states is None:
        return None
    return {
        SessionState(state): round(row.reltuples * share)
        for state, share in zip(row.states, row.shares, strict=True)
    }


def lock_live_session(session_uuid: uuid.UUID) -> None:
    """Touch a live session and hold its row until the caller commits; SessionNotFound if none.

    On PostgreSQL it takes the row lock; on SQLite it writes, which takes the database write
    lock. Either way, operations on one session that start with this run one at a time.
    """
    if session_uuid.version != 4 or not _mark_seen(session_uuid, utcnow(), lock=True):
        raise SessionNotFound()


def is_live(session_uuid: uuid.UUID) -> bool:
    """Whether a session row exists for ``session_uuid`` (no lock, no touch)."""
    return bool(execute(_IS_LIVE, {"session_uuid": session_uuid}).scalar())


def hold_session_files(session_uuid: uuid.UUID) -> None:
    """Serialise this live session's file operations until the caller commits.

    The session is touched first, without holding its row: on PostgreSQL the file lock is an
    advisory lock that only the session's other file operations (upload, delete, consent
    withdrawal, erasure) wait for. On SQLite the touch writes, which takes the database-wide
    write lock that serialises writers anyway. Call it before anything else in the transaction.
    SessionNotFound if the session is not live.
    """
    postgres = has_advisory_locks()
    if session_uuid.version != 4 or not _mark_seen(session_uuid, utcnow(), lock=not postgres):
        raise SessionNotFound()
    if postgres:
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


def _issue_fresh_uuid(context: AuditContext, *, alone: bool) -> uuid.UUID:
    """Register a new random UUID, retrying on collision; audits every attempt.

    With ``alone``, the claim commits by itself; else it joins the caller's transaction.

    No re-check after the claim (unlike a client-supplied UUID): a random UUID
    that wins its insert was not live, so no erasure of it can be in flight.
    """
    for attempt in range(1, GENERATION_ATTEMPTS + 1):
        candidate = uuid4()
        if _claimed_and_audited(candidate, context, attempt, alone=alone):
            return candidate
        audit.record("uuid_generation_collision", context, attempt=attempt)
    audit.record("uuid_generation_failed", context, attempts=GENERATION_ATTEMPTS)
    db.session.commit()
    raise UuidGenerationFailed()


def _resume_or_register(session_uuid: uuid.UUID, context: AuditContext, budget: Budget) -> _Claim:
    now = utcnow()
    if _mark_seen(session_uuid, now, lock=False):
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
    if _mark_seen(session_uuid, now, lock=False):
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
_LAST_SEEN = select(_SESSIONS.c.last_seen_at).where(_SESSIONS.c.uuid == bindparam("session_uuid"))
# FOR NO KEY UPDATE: the lock an UPDATE of the row takes, without writing a new row version.
_LAST_SEEN_LOCKED = _LAST_SEEN.with_for_update(key_share=True)
_IS_RETIRED = select(exists().where(_RETIRED.c.uuid == bindparam("session_uuid")))
_IS_LIVE = select(exists().where(_SESSIONS.c.uuid == bindparam("session_uuid")))
_COUNT_BY_STATE = select(_SESSIONS.c.state, func.count()).group_by(_SESSIONS.c.state)
# reltuples is -1 until the table is first vacuumed or analysed. most_common_vals is anyarray,
# which only casts through text.
_STATE_STATISTICS = text(
    "SELECT c.reltuples, s.most_common_vals::text::text[] AS states,"
    " s.most_common_freqs AS shares"
    " FROM pg_class c LEFT JOIN pg_stats s"
    " ON s.schemaname = current_schema() AND s.tablename = c.relname AND s.attname = 'state'"
    " WHERE c.oid = CAST('chat_sessions' AS regclass)"
)
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


def _audited(sessions: Select[tuple[uuid.UUID]], change: CTE) -> ReturningInsert[int]:
    """The audit rows of the session UUIDs ``sessions`` selects, written with the CTE ``change``.

    It returns a row per audit row written, so "none" means nothing was written.
    """
    return audit.insert_for_each(sessions).add_cte(change).returning(literal(1))


# Statements that write a change and its audit row in one round trip: the commonest requests
# (a generated UUID, a resume) cost one statement instead of two. PostgreSQL only: SQLite has
# no data-modifying CTEs.
_CLAIMED = _CLAIM["postgresql"].cte("claimed")
_CLAIM_AUDITED = _audited(select(_CLAIMED.c.uuid), _CLAIMED)
_TOUCHED = (
    update(_SESSIONS)
    .where(
        _SESSIONS.c.uuid == bindparam("session_uuid"),
        _SESSIONS.c.last_seen_at <= bindparam("stale_before"),
    )
    .values(last_seen_at=bindparam("now"))
    .returning(_SESSIONS.c.uuid)
    .cte("touched")
)
# The audit row's SELECT sees the row as it was before the touch. A fresh session is audited as
# it is; a stale one only if its touch found the row, so that a session erased while the
# statement ran is neither audited nor reported resumed.
_RESUME_AUDITED = _audited(
    select(_SESSIONS.c.uuid).where(
        _SESSIONS.c.uuid == bindparam("session_uuid"),
        or_(
            _SESSIONS.c.last_seen_at > bindparam("stale_before"),
            exists(select(_TOUCHED.c.uuid)),
        ),
    ),
    _TOUCHED,
)


def _mark_seen(session_uuid: uuid.UUID, now: datetime, *, lock: bool) -> bool:
    """Mark a live session as seen (written only once per TOUCH_EVERY); False if there is none.

    With ``lock``, the row is held until the caller commits. SQLite has no row locks: there
    the row is written every time, which takes the database write lock.
    """
    params = {"session_uuid": session_uuid, "now": now}
    if lock and not on_postgresql():
        return execute(_TOUCH, params).first() is not None
    last_seen = execute(_LAST_SEEN_LOCKED if lock else _LAST_SEEN, params).scalar()
    if last_seen is None:
        return False
    if last_seen > now - TOUCH_EVERY:
        return True
    # None if an erasure deleted the row after it was read: the session has just ended.
    return execute(_TOUCH, params).first() is not None


def _claimed_and_audited(
    session_uuid: uuid.UUID, context: AuditContext, attempt: int, *, alone: bool
) -> bool:
    """Claim a generated UUID and audit it; False, with nothing written, if it was taken.

    On PostgreSQL both rows are written by one statement, committed by itself with ``alone``.
    """
    now = utcnow()
    if on_postgresql():
        params = {
            "session_uuid": session_uuid,
            "now": now,
            "client_ip": context.client_ip,
            **audit.bound_values("uuid_generated", context, now, attempt=attempt),
        }
        if alone:
            return bool(scalar_alone(_CLAIM_AUDITED, params))
        return bool(execute(_CLAIM_AUDITED, params).scalar())
    if not _claim(session_uuid, now, context.client_ip):
        return False
    audit.record("uuid_generated", context, session_uuid, attempt=attempt)
    return True


def _resumed_and_audited(session_uuid: uuid.UUID, context: AuditContext) -> bool:
    """Resume a live session on PostgreSQL in one statement, committed by itself: audited,
    and touched if stale.

    False, with nothing written, if the session is not live or ended while the statement ran;
    the caller then takes the general path.
    """
    now = utcnow()
    params = {
        "session_uuid": session_uuid,
        "now": now,
        "stale_before": now - TOUCH_EVERY,
        **audit.bound_values("uuid_validated", context, now),
    }
    return bool(scalar_alone(_RESUME_AUDITED, params))


def _claim(session_uuid: uuid.UUID, now: datetime, client_ip: str | None) -> bool:
    """Insert a pending session unless the UUID is live or retired; True if inserted."""
    statement = _CLAIM[db.session.get_bind().dialect.name]
    params = {"session_uuid": session_uuid, "now": now, "client_ip": client_ip}
    return execute(statement, params).first() is not None


def _is_retired(session_uuid: uuid.UUID) -> bool:
    return bool(execute(_IS_RETIRED, {"session_uuid": session_uuid}).scalar())
