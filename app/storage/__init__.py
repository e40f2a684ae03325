"""Object storage behind one small interface, in the service's own vocabulary.

Two backends implement it: S3 (``s3.py``, the only module that imports boto3) and a
local directory (``local.py``); ``backends.py`` builds the configured one. Keys look like
``uploads/<session uuid>/<file name>``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO, Protocol

from flask import current_app

UPLOADS_PREFIX = "uploads/"
# S3 deletes at most this many keys per request; both backends page and batch by it.
BATCH_SIZE = 1000


class StorageUnavailable(Exception):
    """The storage backend could not be reached or refused the operation.

    ``reason`` says which, in a word an operator can act on: ``unreachable``,
    ``missing_bucket``, ``access_denied`` or ``failed`` (anything else).
    """

    def __init__(self, message: str, *, reason: str = "failed") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class StoredObject:
    """One object as a listing reports it.

    ``version`` tells stored objects apart only as far as a listing can: on S3 it is the ETag,
    a hash of the content, so equal bytes stored again list alike. See StoredVersion.
    """

    key: str
    size: int
    last_modified: datetime
    version: str


@dataclass(frozen=True)
class StoredVersion(StoredObject):
    """One object as put, head and read report it: its ``version`` names the put that stored it.

    Every put makes a new version, even of equal bytes at an equal time, so a download link
    naming one dies with the upload it was issued for. An object stored before puts were
    tagged has a version derived from what the backend reports (S3's ETag; the local file's
    inode, time and size), which also changes whenever it is replaced.
    """


class Content(Protocol):
    """A stored object's content, read in pieces."""

    def read(self, size: int = -1, /) -> bytes:
        """Up to ``size`` bytes (all that is left if negative); empty at the end."""
        ...

    def close(self) -> None:
        """Release the connection or file behind the content."""
        ...


class Storage(Protocol):
    """What the service needs from object storage."""

    def list_pages(self, prefix: str) -> Iterator[list[StoredObject]]:
        """Objects under ``prefix`` in key order, at most ``BATCH_SIZE`` per page."""
        ...

    def put(self, key: str, body: BinaryIO, content_type: str) -> StoredVersion:
        """Store ``body`` at ``key`` atomically: readers see the old object or the whole new one."""
        ...

    def head(self, key: str) -> StoredVersion | None:
        """The object at ``key`` with its version, or None if there is none."""
        ...

    def read(self, key: str) -> tuple[StoredVersion, Content] | None:
        """The object at ``key`` and its content, of that very version, or None if there is none."""
        ...

    def delete_many(self, keys: Sequence[str]) -> dict[str, str]:
        """Delete ``keys``; returns the keys that could not be deleted, with the reason."""
        ...

    def check(self) -> None:
        """Raise StorageUnavailable unless the backend answers and the bucket is usable."""
        ...

    def create(self) -> bool:
        """Create the bucket or directory unless it exists; True if it was created."""
        ...


def session_prefix(session_uuid: object) -> str:
    """The folder holding one session's files."""
    return f"{UPLOADS_PREFIX}{session_uuid}/"


def session_objects(storage: Storage, session_uuid: object) -> list[StoredObject]:
    """Every object in one session's folder (a handful: the file limit is small)."""
    return [stored for page in storage.list_pages(session_prefix(session_uuid)) for stored in page]


def current_storage() -> Storage:
    """The storage backend of the current app."""
    storage: Storage = current_app.extensions["storage"]
    return storage
