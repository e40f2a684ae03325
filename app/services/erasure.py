"""Ending sessions for good: files, row and personal data gone, the UUID retired."""

from __future__ import annotations

import uuid
from typing import cast

from sqlalchemy import ColumnElement, Table, bindparam, delete, insert, update

from app.clock import utcnow
from app.extensions import db
from app.models import ChatSession, ConsentEvent, EmailSend, RetiredSessionUUID, RetirementReason
from app.services import audit
from app.services.audit import AuditContext
from app.storage import StorageUnavailable, current_storage, session_objects

_SESSIONS = cast(Table, ChatSession.__table__)


def erase_sessions(
    session_uuids: list[uuid.UUID],
    still_eligible: ColumnElement[bool],
    *,
    reason: RetirementReason,
    context: AuditContext,
) -> dict[uuid.UUID, int]:
    """Erase those of ``session_uuids`` that still match ``still_eligible``; commit.

    The rows are deleted first, which locks them, so a request touching one of these
    sessions waits and then finds it gone. Then the files go, then the transaction
    commits, removing the consent history and adding tombstones and audit rows. If
    storage fails the transaction is rolled back (nothing in the database changes) and
    StorageUnavailable is raised, so a retry finishes the job. Returns the number of
    files erased per erased session.
    """
    if not session_uuids:
        return {}
    erased = list(
        db.session.scalars(
            delete(_SESSIONS)
            .where(_SESSIONS.c.uuid.in_(bindparam("uuids", expanding=True)), still_eligible)
            .returning(_SESSIONS.c.uuid),
            {"uuids": session_uuids},
        )
    )
    if not erased:
        db.session.rollback()
        return {}
    try:
        files = _delete_files(erased)
    except StorageUnavailable:
        db.session.rollback()
        raise
    db.session.execute(
        delete(ConsentEvent).where(
            ConsentEvent.session_uuid.in_(bindparam("uuids", expanding=True))
        ),
        {"uuids": erased},
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
            (erased_uuid, {"reason": reason.value, "files": files[erased_uuid]})
            for erased_uuid in erased
        ],
    )
    db.session.commit()
    return files


def unlink_send_history(session_uuids: list[uuid.UUID]) -> None:
    """Cut the link between sessions and their send records.

    The records (an address HMAC and a time) stay for the per-address daily cap, which
    must survive the session; nothing ties them to the session any more.
    """
    db.session.execute(
        update(EmailSend)
        .where(EmailSend.session_uuid.in_(bindparam("uuids", expanding=True)))
        .values(session_uuid=None),
        {"uuids": session_uuids},
    )


def _delete_files(session_uuids: list[uuid.UUID]) -> dict[uuid.UUID, int]:
    storage = current_storage()
    keys = {
        session_uuid: [o.key for o in session_objects(storage, session_uuid)]
        for session_uuid in session_uuids
    }
    failed = storage.delete_many([key for session_keys in keys.values() for key in session_keys])
    if failed:
        raise StorageUnavailable(f"{len(failed)} file(s) could not be deleted")
    return {session_uuid: len(session_keys) for session_uuid, session_keys in keys.items()}
