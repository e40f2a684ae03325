"""A local directory standing in for object storage (the embedded default)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from app.storage import BATCH_SIZE, StorageUnavailable, StoredObject


class LocalStorage:
    """Keys are paths below ``root``."""

    def __init__(self, root: str) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"key {key!r} escapes the storage root")
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

    def put(self, key: str, body: BinaryIO, content_type: str) -> StoredObject:
        path = self._path(key)
        try:
            handle, temp_name = self._temp_file_beside(path)
            try:
                with os.fdopen(handle, "wb") as temp:
                    shutil.copyfileobj(body, temp)
                os.replace(temp_name, path)
            except BaseException:
                os.unlink(temp_name)
                raise
            stored = self._stat(key)
        except OSError as exc:
            raise StorageUnavailable(f"storing failed: {_reason(exc)}") from None
        if stored is None:
            raise StorageUnavailable("stored file vanished at once")
        return stored

    def read(self, key: str) -> tuple[StoredObject, BinaryIO] | None:
        try:
            stored = self._stat(key)
            return None if stored is None else (stored, self._path(key).open("rb"))
        except FileNotFoundError:
            return None  # deleted between the two calls
        except OSError as exc:
            raise StorageUnavailable(f"reading failed: {_reason(exc)}") from None

    def _stat(self, key: str) -> StoredObject | None:
        try:
            found = self._path(key).stat()
        except FileNotFoundError:
            return None
        modified = datetime.fromtimestamp(found.st_mtime, UTC)
        # A replaced file gets a new modification time (nanoseconds) even at the same size.
        return StoredObject(
            key, found.st_size, modified, f"{found.st_mtime_ns:x}-{found.st_size:x}"
        )

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


def _reason(exc: OSError) -> str:
    """What went wrong, without the path (paths carry file names).

    The original exception is dropped from the chain for the same reason: tracebacks are logged.
    """
    return f"{type(exc).__name__} (errno {exc.errno})"
