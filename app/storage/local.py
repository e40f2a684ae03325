"""A local directory standing in for object storage (the embedded default)."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from app.storage import BATCH_SIZE, StorageUnavailable, StoredObject, StoredVersion

# A file's version is the id of the put that stored it, kept on the file itself as a user
# extended attribute: set on the temporary file before it is renamed into place, it moves with
# the content, and a read takes it from the very file it opened. A file's times cannot serve:
# a coarse clock gives equal bytes written twice equal times, and a deleted file's inode is
# soon reused.
UPLOAD_ID_ATTRIBUTE = "user.upload-id"


class LocalStorage:
    """Keys are paths below ``root``."""

    def __init__(self, root: str) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            # The key is not quoted: it holds a file name, and this lands in a logged traceback.
            raise ValueError("a key escapes the storage root")
        return path

    def list_pages(self, prefix: str) -> Iterator[list[StoredObject]]:
        page: list[StoredObject] = []
        try:
            for key in self._keys_in_order(prefix):
                stored = self._stat(key)
                if stored is None:
                    continue  # deleted while we walked
                page.append(stored)
                if len(page) == BATCH_SIZE:
                    yield page
                    page = []
        except OSError as exc:
            raise StorageUnavailable(f"listing failed: {_reason(exc)}") from None
        if page:
            yield page

    def _keys_in_order(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix`` in the byte order S3 lists them, walking lazily."""
        directory, _, name_start = prefix.rpartition("/")
        base = self._path(directory) if directory else self.root
        if not base.is_dir():
            return
        yield from self._walk(base, f"{directory}/" if directory else "", name_start)

    def _walk(self, directory: Path, key_prefix: str, name_start: str) -> Iterator[str]:
        # A directory sorts as if its name ended in "/", which is where its keys fall.
        entries = sorted(
            (entry.name + ("/" if entry.is_dir() else ""), entry)
            for entry in os.scandir(directory)
            if entry.name.startswith(name_start) and not entry.name.startswith(".")
        )
        for sort_name, entry in entries:
            if sort_name.endswith("/"):
                yield from self._walk(Path(entry.path), f"{key_prefix}{entry.name}/", "")
            else:
                yield f"{key_prefix}{entry.name}"

    def put(self, key: str, body: BinaryIO, content_type: str) -> StoredVersion:
        path = self._path(key)
        try:
            handle, temp_name = self._temp_file_beside(path)
            try:
                with os.fdopen(handle, "wb") as temp:
                    shutil.copyfileobj(body, temp)
                    temp.flush()
                    _tag(temp.fileno(), secrets.token_hex(16))
                    # Described before the rename: afterwards the path may hold a later upload.
                    stored = _describe(key, temp.fileno())
                os.replace(temp_name, path)
            except BaseException:
                os.unlink(temp_name)
                raise
        except OSError as exc:
            raise StorageUnavailable(f"storing failed: {_reason(exc)}") from None
        return stored

    def head(self, key: str) -> StoredVersion | None:
        found = self.read(key)
        if found is None:
            return None
        stored, content = found
        content.close()
        return stored

    def read(self, key: str) -> tuple[StoredVersion, BinaryIO] | None:
        # Opened first, then described from the open file: a version looked up by path could
        # belong to a file that replaced, or was replaced by, the one opened.
        try:
            content = self._path(key).open("rb")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageUnavailable(f"reading failed: {_reason(exc)}") from None
        try:
            return _describe(key, content.fileno()), content
        except OSError as exc:
            content.close()
            raise StorageUnavailable(f"reading failed: {_reason(exc)}") from None

    def _stat(self, key: str) -> StoredObject | None:
        try:
            found = self._path(key).stat()
        except FileNotFoundError:
            return None
        return StoredObject(key, found.st_size, _modified(found), _untagged_version(found))

    def _temp_file_beside(self, path: Path) -> tuple[int, str]:
        """A temporary file in the target's folder: write beside it, then rename into place."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return tempfile.mkstemp(dir=path.parent, prefix=".upload-")
        except FileNotFoundError:
            # A clean-up removed the emptied folder between the two calls: make it again, once.
            path.parent.mkdir(parents=True, exist_ok=True)
            return tempfile.mkstemp(dir=path.parent, prefix=".upload-")

    def delete_many(self, keys: Sequence[str]) -> dict[str, str]:
        failed: dict[str, str] = {}
        for key in keys:
            path = self._path(key)
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                failed[key] = _reason(exc)
                continue
            self._remove_empty_parents(path.parent)
        return failed

    def _remove_empty_parents(self, directory: Path) -> None:
        # The top-level folder (uploads/) stays: other writers create folders inside it.
        while directory.parent != self.root and directory.is_relative_to(self.root):
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".ready-"):
                pass
        except PermissionError as exc:
            raise StorageUnavailable(
                f"storage root unusable: {_reason(exc)}", reason="access_denied"
            ) from None
        except OSError as exc:
            raise StorageUnavailable(f"storage root unusable: {_reason(exc)}") from None

    def create(self) -> bool:
        existed = self.root.is_dir()
        self.check()
        return not existed


def _tag(handle: int, upload_id: str) -> None:
    """Tag an open file with the id of the put storing it, where the file system allows."""
    if not hasattr(os, "setxattr"):
        return  # Not Linux: files go untagged, as on a file system without user attributes.
    try:
        os.setxattr(handle, UPLOAD_ID_ATTRIBUTE, upload_id.encode())
    except OSError as exc:
        if exc.errno != errno.ENOTSUP:
            raise


def _describe(key: str, handle: int) -> StoredVersion:
    """The object an open file holds, with its version, all taken from the open file."""
    found = os.fstat(handle)
    upload_id = None
    if hasattr(os, "getxattr"):
        try:
            upload_id = os.getxattr(handle, UPLOAD_ID_ATTRIBUTE).decode()
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise
    version = upload_id or _untagged_version(found)
    return StoredVersion(key, found.st_size, _modified(found), version)


def _untagged_version(found: os.stat_result) -> str:
    """The version of a file without an upload id, as far as its status tells.

    Such a file was stored before puts were tagged, or where files cannot be tagged. The inode
    tells a replacement apart, as it is written while the old file still exists; a deleted
    file's inode may be reused, but then rarely at the same time and size.
    """
    return f"{found.st_ino:x}-{found.st_mtime_ns:x}-{found.st_size:x}"


def _modified(found: os.stat_result) -> datetime:
    """A file's modification time, as storage reports times."""
    return datetime.fromtimestamp(found.st_mtime, UTC)


def _reason(exc: OSError) -> str:
    """What went wrong, without the path (paths carry file names).

    The original exception is dropped from the chain for the same reason: tracebacks are logged.
    """
    return f"{type(exc).__name__} (errno {exc.errno})"
