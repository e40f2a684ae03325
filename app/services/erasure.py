"""Ending sessions for good: files, row and personal data gone, the UUID retired."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import cast

from sqlalchemy import ColumnElement, Table, bindparam, delete, insert, select, tuple_, update

from app.clock import utcnow
from app.extensions import advisory_xact_lock, db, has_advisory_locks, try_advisory_xact_locks
from app.models import (
    ChatSession,
    ConsentEvent,
    EmailSend,
    PendingFileDeletion,
    RetiredSessionUUID,
    RetirementReason,
)
from app.services import admin_alerts, audit
from app.services.audit import SYSTEM, AuditContext
from app.storage import Storage, StorageUnavailable, current_storage, session_objects

log = logging.getLogger(__name__)

_SESSIONS = cast(Table, ChatSession.__table__)


def files_lock_name(session_uuid: uuid.UUID) -> str:
    """The advisory lock that serialises one session's file operations."""
    return f"session-files:{session_uuid}"


@dataclass
class Erasure:
    """What one erasure did: files deleted per erased session, and what it could not do."""

    files: dict[uuid.UUID, int] = field(default_factory=dict)
    # Sessions left alone this time (their files could not be listed), with the reason.
    skipped: dict[uuid.UUID, str] = field(default_factory=dict)
    # Erased sessions whose files are still in storage; the orphan sweep removes them later.
    files_left: dict[uuid.UUID, str] = field(default_factory=dict)


def erase_sessions(
    session_uuids: list[uuid.UUID],
    still_eligible: ColumnElement[bool],
    *,
    reason: RetirementReason,
    context: AuditContext,
    wait: bool,
) -> Erasure:
    """Erase those of ``session_uuids`` that still match ``still_eligible``.

    No row lock is held while storage is called. Each session's file lock is taken first
    (``wait`` for it, or skip a session whose files are busy: a background job leaves an
    active session alone), then its files are listed. One transaction then deletes the rows
    that are still eligible, the consent history and the link to send records, and writes
    the tombstones and audit rows. Only after that commit are the files deleted: a file that
    cannot be deleted now belongs to no session, so the orphan sweep deletes it later. A
    session whose files cannot even be listed is left untouched, for a later attempt.
    """
    result = Erasure()
    keys: dict[uuid.UUID, list[str]] = {}
    storage = current_storage()
    held = _hold_files(sorted(session_uuids), wait=wait)
    for position, session_uuid in enumerate(held):
        try:
            keys[session_uuid] = [o.key for o in session_objects(storage, session_uuid)]
        except StorageUnavailable as exc:
            problem = f"files could not be listed ({exc.reason})"
            if exc.reason != "unreachable" or _storage_answers(storage):
                result.skipped[session_uuid] = problem
                continue
            # Storage is not answering at all: every further listing would wait out its timeout.
            result.skipped.update(dict.fromkeys(held[position:], problem))
            break
    erased = _delete_rows(list(keys), still_eligible, reason, keys, context)
    if not erased:
        return result
    result.files = {session_uuid: len(keys[session_uuid]) for session_uuid in erased}
    result.files_left = _delete_files({session_uuid: keys[session_uuid] for session_uuid in erased})
    return result


@dataclass
class ErasureTotals:
    """What erasing every eligible session did, and each session it could not finish."""

    sessions: int = 0
    files: int = 0
    problems: dict[uuid.UUID, str] = field(default_factory=dict)


def erase_all(
    eligible: ColumnElement[bool], *, reason: RetirementReason, batch_size: int
) -> ErasureTotals:
    """Erase every session matching ``eligible``, a batch at a time (background jobs).

    A session whose files another request is working on is in use, so it is left alone. One
    whose files cannot be listed or deleted is recorded in ``problems`` and never holds up the
    others: it is tried again on the next run, or its leftover files (it has ended) are
    removed by the orphan sweep. A batch that erases nothing ends the run: storage is then most
    likely down, and the next run starts over.
    """
    totals = ErasureTotals()
    # Paged by key, so each batch costs the same however many sessions came before it.
    order = (ChatSession.last_seen_at, ChatSession.uuid)
    after: tuple[datetime, uuid.UUID] | None = None
    while True:
        query = select(*order).where(eligible).order_by(*order).limit(batch_size)
        if after is not None:
            query = query.where(tuple_(*order) > after)
        rows = db.session.execute(query).all()
        if not rows:
            return totals
        after = (rows[-1].last_seen_at, rows[-1].uuid)
        batch = [row.uuid for row in rows]
        result = erase_sessions(batch, eligible, reason=reason, context=SYSTEM, wait=False)
        totals.sessions += len(result.files)
        totals.files += sum(
            count for erased, count in result.files.items() if erased not in result.files_left
        )
        totals.problems.update(result.skipped)
        totals.problems.update(result.files_left)
        if not result.files or len(batch) < batch_size:
            return totals


def report_problems(job: str, event_type: str, problems: dict[uuid.UUID, str]) -> None:
    """Audit each session a job could not finish, and tell the admin once per run."""
    if not problems:
        return
    audit.record_many(
        event_type,
        SYSTEM,
        [(session_uuid, {"error": problem}) for session_uuid, problem in problems.items()],
    )
    db.session.commit()
    log.error("%s: %d session(s) not finished", job, len(problems))
    first = next(iter(problems.values()))
    admin_alerts.report_job_error(job, f"{len(problems)} session(s) not finished, e.g. {first}")


def _storage_answers(storage: Storage) -> bool:
    """Whether storage answers at all, after one of its calls did not."""
    try:
        storage.check()
    except StorageUnavailable:
        return False
    return True


def _hold_files(session_uuids: list[uuid.UUID], *, wait: bool) -> list[uuid.UUID]:
    """The sessions whose file locks this transaction now holds, in the order given."""
    if not has_advisory_locks():
        return session_uuids
    names = {session_uuid: files_lock_name(session_uuid) for session_uuid in session_uuids}
    if not wait:
        free = set(try_advisory_xact_locks(list(names.values())))
        return [session_uuid for session_uuid, name in names.items() if name in free]
    return [session_uuid for session_uuid, name in names.items() if advisory_xact_lock(name)]


def _delete_rows(
    session_uuids: list[uuid.UUID],
    still_eligible: ColumnElement[bool],
    reason: RetirementReason,
    keys: dict[uuid.UUID, list[str]],
    context: AuditContext,
) -> list[uuid.UUID]:
    """Delete the still-eligible rows and everything tied to them; commit; the erased UUIDs."""
    erased = list(
        db.session.scalars(
            delete(_SESSIONS)
            .where(_SESSIONS.c.uuid.in_(bindparam("uuids")), still_eligible)
            .returning(_SESSIONS.c.uuid),
            {"uuids": session_uuids},
        )
    )
    if not erased:
        db.session.rollback()
        return []
    for model in (ConsentEvent, PendingFileDeletion):
        db.session.execute(
            delete(model).where(model.session_uuid.in_(bindparam("uuids"))), {"uuids": erased}
        )
    unlink_send_history(erased)
    now = utcnow()
    db.session.execute(
        insert(RetiredSessionUUID),
        [{"uuid": erased_uuid, "retired_at": now, "reason": reason} for erased_uuid in erased],
    )
    audit.record_many(
        "session_erased",
        context,
        [
            (erased_uuid, {"reason": reason.value, "files": len(keys[erased_uuid])})
            for erased_uuid in erased
        ],
    )
    db.session.commit()
    return erased


def delete_leftover_files(session_uuid: uuid.UUID) -> int:
    """Delete whatever is still stored for an ended session; raises StorageUnavailable."""
    keys = [o.key for o in session_objects(current_storage(), session_uuid)]
    left = _delete_files({session_uuid: keys})
    if left:
        raise StorageUnavailable(left[session_uuid])
    return len(keys)


def _delete_files(keys: dict[uuid.UUID, list[str]]) -> dict[uuid.UUID, str]:
    """Delete every listed file; the sessions some of whose files are still stored, and why.

    All keys go in as few requests as storage allows. If such a request is refused as a whole,
    each session's files are tried again on their own, so one bad file cannot keep its
    neighbours.
    """
    by_key = {
        key: session_uuid for session_uuid, session_keys in keys.items() for key in session_keys
    }
    if not by_key:
        return {}
    storage = current_storage()
    try:
        failed = storage.delete_many(list(by_key))
    except StorageUnavailable as exc:
        # Storage that does not answer at all would only make each retry wait out its timeout.
        if len(keys) == 1 or exc.reason == "unreachable":
            return dict.fromkeys(keys, f"storage unavailable ({exc.reason})")
        left: dict[uuid.UUID, str] = {}
        for session_uuid, session_keys in keys.items():
            left.update(_delete_files({session_uuid: session_keys}))
        return left
    return {by_key[key]: f"could not delete a file ({problem})" for key, problem in failed.items()}


def unlink_send_history(session_uuids: list[uuid.UUID]) -> None:
    """Cut the link between sessions and their send records.

    The records (an address HMAC and a time) stay for the per-address daily cap, which
    must survive the session; nothing ties them to the session any more.
    """
    db.session.execute(
        update(EmailSend)
        .where(EmailSend.session_uuid.in_(bindparam("uuids")))
        .values(session_uuid=None),
        {"uuids": session_uuids},
    )
