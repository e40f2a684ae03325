"""A session's uploaded files: storage is the source of truth for which files exist."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO, NoReturn

from flask import current_app
from sqlalchemy import delete as delete_rows
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from werkzeug.utils import secure_filename

from app import deadline
from app.clock import utcnow
from app.errors import (
    FileLimitReached,
    FileNotFound,
    FileTooLarge,
    InvalidFileName,
    SessionNotFound,
    StorageUnavailableError,
    UnsupportedFileType,
)
from app.extensions import advisory_xact_lock, db, execute, has_advisory_locks, upsert
from app.models import PendingFileDeletion
from app.privacy import keyed_hash
from app.services import audit, chat_sessions, download_links
from app.services.audit import SYSTEM, AuditContext
from app.services.erasure import files_lock_name
from app.storage import (
    Storage,
    StorageUnavailable,
    current_storage,
    session_objects,
    session_prefix,
)

PDF_MAGIC = b"%PDF-"
PDF_CONTENT_TYPE = "application/pdf"
MAX_FILENAME_LENGTH = 200

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionFile:
    """A stored file as the API shows it."""

    filename: str
    size: int
    uploaded_at: datetime
    url: str
    content_type: str = PDF_CONTENT_TYPE


def upload(raw_uuid: str, filename: str, body: BinaryIO, *, context: AuditContext) -> SessionFile:
    """Store a PDF in the session's folder, within the size and file-count limits."""
    session_uuid = chat_sessions.parse_uuid4(raw_uuid)
    rejected = _Rejection(context, session_uuid)
    if session_uuid is None:
        rejected("session_not_found", SessionNotFound())
    try:
        chat_sessions.hold_session_files(session_uuid)
    except SessionNotFound as exc:
        rejected("session_not_found", exc)

    name = safe_filename(filename)
    if name is None:
        rejected("invalid_filename", InvalidFileName())
    size = _size(body)
    if not name.lower().endswith(".pdf") or body.read(len(PDF_MAGIC)) != PDF_MAGIC:
        rejected("unsupported_file_type", UnsupportedFileType())
    body.seek(0)
    max_bytes = current_app.config["MAX_UPLOAD_MB"] * 1024 * 1024
    if size > max_bytes:
        rejected("file_too_large", FileTooLarge())

    storage = current_storage()
    key = session_prefix(session_uuid) + name
    try:
        existing = {stored.key for stored in session_objects(storage, session_uuid)}
    except StorageUnavailable as exc:
        rejected("storage_unavailable", StorageUnavailableError(), cause=exc)
    if key not in existing and len(existing) >= current_app.config["MAX_FILES_PER_SESSION"]:
        rejected("file_limit_reached", FileLimitReached())
    try:
        stored = storage.put(key, body, PDF_CONTENT_TYPE)
    except StorageUnavailable as exc:
        if exc.reason == "unreachable":
            # Given up on, not refused: storage may have the object all the same (its answer
            # was what stalled), and the client is told it has not. The session's file lock is
            # still held, so no other upload of this name is under way.
            _undo_unrecorded_upload(storage, key, replaced=key in existing)
        rejected("storage_unavailable", StorageUnavailableError(), cause=exc)
    committing = False
    try:
        _supersede_pending_deletion(session_uuid, file_ref(name), context)
        audit.record(
            "file_uploaded",
            context,
            session_uuid,
            file_ref=file_ref(name),
            size=size,
            replaced=key in existing,
        )
        committing = True
        db.session.commit()
    except SQLAlchemyError as exc:
        db.session.rollback()
        if committing and _connection_lost(exc):
            # The COMMIT may have reached the server with only its answer lost, so the audit
            # row may stand. A file the trail says was stored must be there; a file stored
            # without its row is the lesser harm (its folder is listed and erased like any).
            log.error(
                "an upload's record may have been committed: its file is kept",
                extra={"file": file_ref(name)},
            )
        else:
            _undo_unrecorded_upload(storage, key, replaced=key in existing)
        raise
    return SessionFile(name, size, stored.last_modified, download_links.link(session_uuid, stored))


def _supersede_pending_deletion(
    session_uuid: uuid.UUID, reference: str, context: AuditContext
) -> None:
    """End a pending deletion of the name just stored: its earlier content is gone either way.

    Left pending, it would later delete the new upload.
    """
    ended = execute(
        delete_rows(PendingFileDeletion).where(
            PendingFileDeletion.session_uuid == session_uuid,
            PendingFileDeletion.file_ref == reference,
        )
    )
    if ended.rowcount:
        audit.record("file_deleted", context, session_uuid, file_ref=reference)


def _connection_lost(exc: SQLAlchemyError) -> bool:
    """Whether the database connection was lost (a disconnect, or no answer in time)."""
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def _undo_unrecorded_upload(storage: Storage, key: str, *, replaced: bool) -> None:
    """Remove a file whose upload was (or may have been) stored but not recorded, before answering.

    The client is told the upload failed, so the file must not stay without its audit row. It
    is removed before the answer goes out, while the client waits, so no retry of the same
    upload can be under way. A replaced file cannot be put back (its earlier content is gone),
    so it keeps the new content the person sent, and the gap in the audit trail is logged.
    """
    reference = file_ref(key.rpartition("/")[2])
    if replaced:
        log.error(
            "a replaced file was stored but its upload not audited", extra={"file": reference}
        )
        return
    with deadline.grace():
        try:
            failed = storage.delete_many([key])
        except StorageUnavailable as exc:
            failed = {key: exc.reason}
    if failed:
        log.error(
            "a file was stored but its upload could not be audited nor the file removed",
            extra={"file": reference, "reason": failed[key]},
        )


def refuse_oversized_body(context: AuditContext) -> NoReturn:
    """Audit and refuse an upload whose body was too large to read (its session is unknown)."""
    _Rejection(context, None)("file_too_large", FileTooLarge())


def delete(raw_uuid: str, filename: str, *, context: AuditContext) -> None:
    """Delete one file from the session's folder.

    Two transactions under the session's file lock: the first records the deletion as pending
    and commits, the second asks storage, then records ``file_deleted`` and ends the pending
    row. Storage and the database cannot change together; this order means a failure anywhere
    after the first commit leaves the pending row, which a retry (or the orphan sweep) finishes,
    never a file gone without its audit row. StorageUnavailableError if it is left pending.
    """
    session_uuid = chat_sessions.parse_uuid4(raw_uuid)
    if session_uuid is None:
        raise SessionNotFound()
    chat_sessions.hold_session_files(session_uuid)
    name = safe_filename(filename)
    if name is None:
        raise FileNotFound()
    storage = current_storage()
    ref = file_ref(name)
    try:
        stored = ref in stored_refs(storage, session_uuid)
    except StorageUnavailable as exc:
        db.session.rollback()
        raise StorageUnavailableError() from exc
    # A file already pending deletion may be gone from storage: a retry finishes its deletion.
    if not stored and ref not in _pending_refs(session_uuid):
        db.session.rollback()
        raise FileNotFound()
    request_deletion(session_uuid, [ref])
    db.session.commit()
    # That commit released the file lock; an upload or delete that ran in between finished
    # this deletion already, and leaves nothing pending.
    chat_sessions.hold_session_files(session_uuid)
    try:
        _, unfinished = finish_deletions(storage, session_uuid, context)
    except StorageUnavailable as exc:
        db.session.rollback()
        raise StorageUnavailableError() from exc
    db.session.commit()
    if ref in unfinished:
        raise StorageUnavailableError()


def request_deletion(session_uuid: uuid.UUID, refs: Collection[str]) -> None:
    """Record the deletion of these files as pending; the caller holds the file lock and commits.

    Commit before storage is asked; then finish_deletions does the rest.
    """
    if not refs:
        return
    requested_at = utcnow()
    execute(
        upsert(PendingFileDeletion).on_conflict_do_nothing(),
        [
            {"session_uuid": session_uuid, "file_ref": ref, "requested_at": requested_at}
            for ref in refs
        ],
    )


def finish_deletions(
    storage: Storage, session_uuid: uuid.UUID, context: AuditContext
) -> tuple[list[str], set[str]]:
    """Finish the session's pending deletions: the references finished, and those still pending.

    The caller holds the session's file lock. A pending file still stored is deleted; one already
    gone was deleted by an attempt whose record failed. Either way ``file_deleted`` is recorded
    now. The caller commits. Raises StorageUnavailable if storage cannot be listed or refuses the
    delete request.
    """
    pending = _pending_refs(session_uuid)
    if not pending:
        return [], set()
    keys = {ref: key for ref, key in stored_refs(storage, session_uuid).items() if ref in pending}
    failed = storage.delete_many(list(keys.values()))
    finished = sorted(ref for ref in pending if keys.get(ref) not in failed)
    if finished:
        execute(
            delete_rows(PendingFileDeletion).where(
                PendingFileDeletion.session_uuid == session_uuid,
                PendingFileDeletion.file_ref.in_(finished),
            )
        )
        audit.record_many(
            "file_deleted", context, [(session_uuid, {"file_ref": ref}) for ref in finished]
        )
    return finished, pending - set(finished)


def finish_interrupted_deletions(
    storage: Storage, *, requested_before: datetime
) -> tuple[int, int]:
    """Finish the deletions pending since before ``requested_before``: (finished, still pending).

    The request that left one answered 503, and its person may never retry. A session whose
    file lock another request holds is left for the next run; each session commits on its own.
    """
    query = select(PendingFileDeletion.session_uuid).where(
        PendingFileDeletion.requested_at < requested_before
    )
    finished = left = 0
    sessions = query.distinct().order_by(PendingFileDeletion.session_uuid)
    for session_uuid in list(db.session.scalars(sessions)):
        if has_advisory_locks() and not advisory_xact_lock(
            files_lock_name(session_uuid), wait=False
        ):
            left += len(_pending_refs(session_uuid))
            db.session.rollback()
            continue
        try:
            done, unfinished = finish_deletions(storage, session_uuid, SYSTEM)
        except StorageUnavailable:
            left += len(_pending_refs(session_uuid))
            db.session.rollback()
            continue
        db.session.commit()
        finished += len(done)
        left += len(unfinished)
    return finished, left


def count_interrupted_deletions(*, requested_before: datetime) -> int:
    """How many deletions have been pending since before ``requested_before``."""
    query = select(func.count()).where(PendingFileDeletion.requested_at < requested_before)
    return db.session.execute(query).scalar_one()


def _pending_refs(session_uuid: uuid.UUID) -> set[str]:
    """The references of the session's files whose deletion is pending."""
    query = select(PendingFileDeletion.file_ref).where(
        PendingFileDeletion.session_uuid == session_uuid
    )
    return set(db.session.scalars(query))


def stored_refs(storage: Storage, session_uuid: uuid.UUID) -> dict[str, str]:
    """The session's stored keys by their files' audit references; raises StorageUnavailable."""
    return {
        file_ref(stored.key.rpartition("/")[2]): stored.key
        for stored in session_objects(storage, session_uuid)
    }


def list_files(session_uuid: uuid.UUID) -> list[SessionFile]:
    """The session's files with time-limited download links."""
    chat_sessions.lock_live_session(session_uuid)
    db.session.commit()
    storage = current_storage()
    try:
        # A listing does not say which upload each object holds (S3 lists no metadata), and a
        # link must name one: each file is asked (a session holds a handful).
        found = [
            storage.head(listed.key)
            for listed in session_objects(storage, session_uuid)
            if listed.key.rpartition("/")[2]
        ]
    except StorageUnavailable as exc:
        raise StorageUnavailableError() from exc
    return [
        SessionFile(
            stored.key.rpartition("/")[2],
            stored.size,
            stored.last_modified,
            download_links.link(session_uuid, stored),
        )
        for stored in found
        if stored is not None  # deleted since it was listed
    ]


def safe_filename(filename: str) -> str | None:
    """A name safe as the last part of a key, or None if nothing usable remains.

    Stem and extension are cleaned apart, so a stem that cleans away entirely
    (``日本.pdf``) is refused rather than leaving a file called ``pdf``.
    """
    base, extension = os.path.splitext(filename.replace("\\", "/").rpartition("/")[2])
    stem = secure_filename(base)
    if not stem:
        return None
    extension = "." + secure_filename(extension[1:]) if extension[1:] else ""
    return stem[: MAX_FILENAME_LENGTH - len(extension)] + extension


def file_ref(name: str) -> str:
    """A stable reference to a file name for the audit trail, which keeps no names.

    Keyed: audit rows outlive the session by a year, and an unkeyed hash of a name is
    recovered by hashing a list of likely names.
    """
    return keyed_hash("file-name", name)[:16]


def _size(body: BinaryIO) -> int:
    body.seek(0, os.SEEK_END)
    size = body.tell()
    body.seek(0)
    return size


class _Rejection:
    """Audit why an upload was refused, commit that record, and raise the matching error."""

    def __init__(self, context: AuditContext, session_uuid: uuid.UUID | None) -> None:
        self.context = context
        self.session_uuid = session_uuid

    def __call__(self, reason: str, error: Exception, cause: Exception | None = None) -> NoReturn:
        db.session.rollback()
        audit.record("file_upload_rejected", self.context, self.session_uuid, reason=reason)
        db.session.commit()
        raise error from cause
