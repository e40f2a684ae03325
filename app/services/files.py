"""A session's uploaded files: storage is the source of truth for which files exist."""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO, NoReturn

from flask import current_app
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from werkzeug.utils import secure_filename

from app import deadline
from app.errors import (
    FileLimitReached,
    FileNotFound,
    FileTooLarge,
    InvalidFileName,
    SessionNotFound,
    StorageUnavailableError,
    UnsupportedFileType,
)
from app.extensions import db
from app.privacy import keyed_hash
from app.services import audit, chat_sessions, download_links
from app.services.audit import AuditContext
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
    """Delete one file from the session's folder."""
    session_uuid = chat_sessions.parse_uuid4(raw_uuid)
    if session_uuid is None:
        raise SessionNotFound()
    chat_sessions.hold_session_files(session_uuid)
    name = safe_filename(filename)
    if name is None:
        raise FileNotFound()
    storage = current_storage()
    key = session_prefix(session_uuid) + name
    try:
        if key not in {stored.key for stored in session_objects(storage, session_uuid)}:
            raise FileNotFound()
        failed = storage.delete_many([key])
    except StorageUnavailable as exc:
        db.session.rollback()
        raise StorageUnavailableError() from exc
    if failed:
        db.session.rollback()
        raise StorageUnavailableError()
    audit.record("file_deleted", context, session_uuid, file_ref=file_ref(name))
    db.session.commit()


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
