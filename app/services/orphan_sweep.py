"""The orphan sweep: delete upload folders whose session no longer exists.

Storage is listed once, page by page, in key order, so each folder's objects arrive together.
Folders flow through a pipeline whose every stage holds at most one batch: old-enough UUID
folders are checked against the database a thousand at a time, orphans are packed into delete
batches of at most a thousand keys, and each batch is checked against the database again just
before its one delete request. Only keys that were listed are deleted, so a file uploaded in the
meantime survives. Cost grows with the number of objects, not with the number of sessions.
First, a real run finishes file deletions that a failed request left pending (files.delete).

Nothing the sweep records, reports or sends names a file: keys carry file names, which are
personal data, and audit rows outlive the erasure by a year. Files are named by keyed reference
(``file_ref``) instead, with the size and version a recovery from a backup needs.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, select

from app.extensions import db
from app.models import ChatSession
from app.services import admin_alerts, audit
from app.services.audit import SYSTEM
from app.services.chat_sessions import parse_uuid4
from app.services.files import (
    count_interrupted_deletions,
    file_ref,
    finish_interrupted_deletions,
)
from app.storage import (
    BATCH_SIZE,
    UPLOADS_PREFIX,
    Storage,
    StorageUnavailable,
    StoredObject,
    session_prefix,
)

log = logging.getLogger(__name__)

JOB_NAME = "orphan_sweep"
# Reports name a few examples of what they skipped, never an unbounded list.
MAX_EXAMPLES = 20
MAX_ERROR_TEXT = 500


@dataclass
class SweepReport:
    """What one sweep saw and did."""

    dry_run: bool
    folders_scanned: int = 0
    objects_scanned: int = 0
    folders_deleted: int = 0
    objects_deleted: int = 0
    kept_live: int = 0
    kept_recent: int = 0
    kept_raced: int = 0
    non_uuid_folders: int = 0
    loose_files: int = 0
    # File deletions a failed request left pending (see files.delete), finished or still pending.
    deletions_finished: int = 0
    deletions_pending: int = 0
    errors: int = 0
    duration_seconds: float = 0.0
    examples: dict[str, list[str]] = field(default_factory=dict)

    def note(self, kind: str, name: str) -> None:
        """Keep ``name`` (never a file name) as an example of ``kind`` if there is room."""
        names = self.examples.setdefault(kind, [])
        if len(names) < MAX_EXAMPLES:
            names.append(name)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class OrphanFolder:
    """A session folder with no session, and the objects listed in it."""

    session_uuid: uuid.UUID
    objects: tuple[StoredObject, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        """The listed keys: only these are deleted."""
        return tuple(stored.key for stored in self.objects)

    def recovery(self) -> dict[str, Any]:
        """What restoring the folder from a backup needs, without a file name.

        Each object by the keyed reference of its name within the folder (for the service's
        own files the same ``file_ref`` its upload was audited with), its size, its version
        and its time, which say which backup holds that very content.
        """
        prefix = session_prefix(self.session_uuid)
        return {
            "objects": len(self.objects),
            "bytes": sum(stored.size for stored in self.objects),
            "files": [
                {
                    "file_ref": file_ref(stored.key.removeprefix(prefix)),
                    "size": stored.size,
                    "version": stored.version,
                    "last_modified": stored.last_modified.isoformat(),
                }
                for stored in self.objects
            ],
        }


@dataclass(frozen=True)
class _Folder:
    name: str
    objects: tuple[StoredObject, ...]


def sweep_orphans(
    storage: Storage, *, now: datetime, min_age: timedelta, dry_run: bool
) -> SweepReport:
    """Delete (or, dry, only count) orphaned upload folders; audit and return a summary."""
    report = SweepReport(dry_run=dry_run)
    started = time.perf_counter()
    if dry_run:
        report.deletions_pending = count_interrupted_deletions(requested_before=now - min_age)
    else:
        report.deletions_finished, report.deletions_pending = finish_interrupted_deletions(
            storage, requested_before=now - min_age
        )
    try:
        for batch in find_orphans(storage, report, cutoff=now - min_age):
            delete_orphans(storage, batch, report, dry_run=dry_run)
    except StorageUnavailable as exc:
        report.errors += 1
        _record_error(None, str(exc))
    report.duration_seconds = round(time.perf_counter() - started, 3)
    if not dry_run:
        audit.record("orphan_sweep_completed", SYSTEM, **report.as_dict())
        db.session.commit()
    return report


def find_orphans(
    storage: Storage, report: SweepReport, *, cutoff: datetime
) -> Iterator[list[OrphanFolder]]:
    """Batches of orphan folders, at most BATCH_SIZE keys each (a larger folder goes alone)."""
    candidates = _old_uuid_folders(
        _folders(storage.list_pages(UPLOADS_PREFIX), report), report, cutoff
    )
    return _delete_batches(_without_live_sessions(candidates, report))


def delete_orphans(
    storage: Storage, batch: list[OrphanFolder], report: SweepReport, *, dry_run: bool
) -> None:
    """Re-check ``batch`` against the database, then delete what is still orphaned."""
    live = _live_session_uuids([folder.session_uuid for folder in batch])
    targets = [folder for folder in batch if folder.session_uuid not in live]
    report.kept_raced += len(batch) - len(targets)
    if dry_run:
        report.folders_deleted += len(targets)
        report.objects_deleted += sum(len(folder.keys) for folder in targets)
        return
    try:
        failed = storage.delete_many([key for folder in targets for key in folder.keys])
        outcomes = [(folder, _failures(folder, failed)) for folder in targets]
    except StorageUnavailable:
        # One bad folder must not sink its neighbours: retry each folder on its own.
        outcomes = [(folder, _delete_folder(storage, folder)) for folder in targets]
    deleted = []
    for folder, failures in outcomes:
        if failures:
            report.errors += 1
            # The reasons, not the keys: keys carry file names, and a text free of them lets
            # the admin notice for one storage fault cover every folder it hits.
            _record_error(folder, "; ".join(sorted(set(failures.values()))))
        else:
            report.folders_deleted += 1
            report.objects_deleted += len(folder.keys)
            deleted.append((folder.session_uuid, folder.recovery()))
    if deleted:
        audit.record_many("orphan_folder_deleted", SYSTEM, deleted)
    db.session.commit()


def _folders(pages: Iterable[list[StoredObject]], report: SweepReport) -> Iterator[_Folder]:
    """Group a key-ordered listing into folders; loose files are reported and dropped."""
    name: str | None = None
    objects: list[StoredObject] = []
    for page in pages:
        for stored in page:
            report.objects_scanned += 1
            folder_name, slash, _ = stored.key[len(UPLOADS_PREFIX) :].partition("/")
            if not slash:
                report.loose_files += 1
                # By reference: a loose file's name may be anything, a person's name included.
                report.note("loose_files", file_ref(folder_name))
                continue
            if folder_name != name:
                if name is not None:
                    yield _Folder(name, tuple(objects))
                name, objects = folder_name, []
            objects.append(stored)
    if name is not None:
        yield _Folder(name, tuple(objects))


def _old_uuid_folders(
    folders: Iterable[_Folder], report: SweepReport, cutoff: datetime
) -> Iterator[OrphanFolder]:
    """Folders named by a session UUID whose newest object is older than ``cutoff``."""
    for folder in folders:
        report.folders_scanned += 1
        session_uuid = parse_uuid4(folder.name)
        if session_uuid is None or str(session_uuid) != folder.name:
            report.non_uuid_folders += 1
            report.note("non_uuid_folders", folder.name)
            continue
        # "Older than" the minimum age: a folder exactly that old is still kept.
        if max(stored.last_modified for stored in folder.objects) >= cutoff:
            report.kept_recent += 1
            continue
        yield OrphanFolder(session_uuid, folder.objects)


def _without_live_sessions(
    candidates: Iterable[OrphanFolder], report: SweepReport
) -> Iterator[OrphanFolder]:
    """Drop folders whose session exists, checking a batch at a time."""
    for chunk in _chunks(candidates, BATCH_SIZE):
        live = _live_session_uuids([folder.session_uuid for folder in chunk])
        report.kept_live += len(live)
        yield from (folder for folder in chunk if folder.session_uuid not in live)


def _delete_batches(orphans: Iterable[OrphanFolder]) -> Iterator[list[OrphanFolder]]:
    batch: list[OrphanFolder] = []
    keys = 0
    for folder in orphans:
        if batch and keys + len(folder.keys) > BATCH_SIZE:
            yield batch
            batch, keys = [], 0
        batch.append(folder)
        keys += len(folder.keys)
    if batch:
        yield batch


def _chunks(items: Iterable[OrphanFolder], size: int) -> Iterator[list[OrphanFolder]]:
    chunk: list[OrphanFolder] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_LIVE_SESSIONS = select(ChatSession.uuid).where(ChatSession.uuid.in_(bindparam("uuids")))


def _live_session_uuids(session_uuids: list[uuid.UUID]) -> set[uuid.UUID]:
    if not session_uuids:
        return set()
    live = set(db.session.scalars(_LIVE_SESSIONS, {"uuids": session_uuids}))
    db.session.commit()
    return live


def _failures(folder: OrphanFolder, failed: dict[str, str]) -> dict[str, str]:
    return {key: failed[key] for key in folder.keys if key in failed}


def _delete_folder(storage: Storage, folder: OrphanFolder) -> dict[str, str]:
    try:
        return storage.delete_many(folder.keys)
    except StorageUnavailable as exc:
        return dict.fromkeys(folder.keys, str(exc))


def _record_error(folder: OrphanFolder | None, error: str) -> None:
    """Log, audit and notify one error; ``error`` is built from storage's key-free reasons."""
    session_uuid = folder.session_uuid if folder is not None else None
    described = folder.recovery() if folder is not None else {}
    text = error[:MAX_ERROR_TEXT]
    log.error(
        "orphan sweep error",
        extra={"folder": str(session_uuid)[:8] if session_uuid else None, "error": text},
    )
    audit.record("orphan_sweep_error", SYSTEM, session_uuid, **described, error=text)
    db.session.commit()
    admin_alerts.report_job_error(JOB_NAME, text, session_uuid)
