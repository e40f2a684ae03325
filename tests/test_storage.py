"""The storage adapters, directly: S3 over HTTP (moto server) and the local directory."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app.storage import BATCH_SIZE, Storage, StorageUnavailable
from app.storage.local import LocalStorage
from app.storage.s3 import S3Storage
from tests.conftest import s3_env
from tests.servers import free_port


def make_s3(endpoint: str) -> S3Storage:
    bucket = s3_env(endpoint)["S3_BUCKET"]
    return S3Storage(
        bucket=bucket,
        region="us-east-1",
        endpoint_url=endpoint,
        connect_timeout=2,
        read_timeout=5,
        max_attempts=2,
    )


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(str(tmp_path / "root"))
    return make_s3(request.getfixturevalue("s3_endpoint"))


def keys(storage: Storage, prefix: str = "uploads/") -> list[str]:
    return [stored.key for page in storage.list_pages(prefix) for stored in page]


def test_listing_is_in_key_order_with_sizes_and_times(storage: Storage) -> None:
    # "abc-def/" sorts before "abc/" because "-" < "/": folders stay contiguous.
    for key in [
        "uploads/abc/2.pdf",
        "uploads/abc-def/1.pdf",
        "uploads/loose.pdf",
        "uploads/abc/1.pdf",
    ]:
        storage.put(key, io.BytesIO(b"%PDF-" + key.encode()), "application/pdf")
    storage.put("other/x.pdf", io.BytesIO(b"x"), "application/pdf")

    listed = [stored for page in storage.list_pages("uploads/") for stored in page]

    assert [stored.key for stored in listed] == [
        "uploads/abc-def/1.pdf",
        "uploads/abc/1.pdf",
        "uploads/abc/2.pdf",
        "uploads/loose.pdf",
    ]
    assert listed[0].size == len(b"%PDF-uploads/abc-def/1.pdf")
    assert all(stored.last_modified.tzinfo is not None for stored in listed)
    assert keys(storage, "uploads/abc/") == ["uploads/abc/1.pdf", "uploads/abc/2.pdf"]


def test_put_replaces_and_delete_many_is_idempotent(storage: Storage) -> None:
    storage.put("uploads/s/a.pdf", io.BytesIO(b"one"), "application/pdf")
    storage.put("uploads/s/a.pdf", io.BytesIO(b"three"), "application/pdf")
    storage.put("uploads/s/b.pdf", io.BytesIO(b"b"), "application/pdf")

    [[replaced, _]] = list(storage.list_pages("uploads/s/"))
    failed = storage.delete_many(["uploads/s/a.pdf", "uploads/s/b.pdf", "uploads/s/missing.pdf"])

    assert replaced.size == 5
    assert failed == {}
    assert keys(storage) == []
    storage.check()


def test_local_delete_keeps_the_top_level_folder(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path))
    storage.put("uploads/s/a.pdf", io.BytesIO(b"x"), "application/pdf")

    assert storage.delete_many(["uploads/s/a.pdf"]) == {}

    assert not (tmp_path / "uploads" / "s").exists()
    assert (tmp_path / "uploads").is_dir()


def test_local_listing_pages_by_the_batch_size(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path))
    for index in range(BATCH_SIZE + 1):
        storage.put(f"uploads/f/{index:05d}.pdf", io.BytesIO(b"x"), "application/pdf")

    pages = list(storage.list_pages("uploads/"))

    assert [len(page) for page in pages] == [BATCH_SIZE, 1]


def test_local_keys_cannot_escape_the_root(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path / "root"))

    with pytest.raises(ValueError, match="escapes"):
        storage.put("../outside.pdf", io.BytesIO(b"x"), "application/pdf")
    assert not (tmp_path / "outside.pdf").exists()


def test_local_put_leaves_nothing_half_written(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path))

    class Broken(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            raise OSError("disk went away")

    with pytest.raises(StorageUnavailable):
        storage.put("uploads/s/a.pdf", Broken(), "application/pdf")
    assert [path.name for path in (tmp_path / "uploads" / "s").iterdir()] == []


def test_every_put_is_a_new_version_even_of_equal_bytes_at_an_equal_time(
    storage: Storage,
) -> None:
    key = "uploads/s/a.pdf"
    first = storage.put(key, io.BytesIO(b"%PDF-same"), "application/pdf")
    first_times = os.stat(storage.root / key) if isinstance(storage, LocalStorage) else None
    replaced = storage.put(key, io.BytesIO(b"%PDF-same"), "application/pdf")
    storage.delete_many([key])
    again = storage.put(key, io.BytesIO(b"%PDF-same"), "application/pdf")
    if isinstance(storage, LocalStorage) and first_times is not None:
        # A coarse clock, or a file system keeping whole seconds, gives equal bytes equal times.
        os.utime(storage.root / key, ns=(first_times.st_atime_ns, first_times.st_mtime_ns))

    found = storage.read(key)
    assert found is not None
    stored, content = found
    content.close()

    assert len({first.version, replaced.version, again.version}) == 3
    assert stored.version == again.version
    assert storage.head(key) == stored
    assert storage.head("uploads/s/missing.pdf") is None


def store_as_before_upload_ids(storage: Storage, key: str, content: bytes) -> None:
    """Write an object the way the adapters did before they tagged uploads: no tag at all."""
    if isinstance(storage, LocalStorage):
        (storage.root / key).parent.mkdir(parents=True, exist_ok=True)
        (storage.root / key).write_bytes(content)
    else:
        assert isinstance(storage, S3Storage)
        storage._client.put_object(Bucket=storage.bucket, Key=key, Body=content)


def test_an_object_stored_without_an_upload_id_has_a_stable_version_until_replaced(
    storage: Storage,
) -> None:
    key = "uploads/s/old.pdf"
    store_as_before_upload_ids(storage, key, b"%PDF-old")

    before = storage.head(key)
    found = storage.read(key)
    assert before is not None
    assert found is not None
    stored, content = found

    assert content.read() == b"%PDF-old"
    content.close()
    assert stored == before
    assert storage.head(key) == before
    storage.delete_many([key])
    assert storage.put(key, io.BytesIO(b"%PDF-old"), "application/pdf").version != before.version


# Python's audit hooks cannot be removed, so one hook serves every test through this slot.
_on_open: list[Callable[[str], None]] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _on_open and isinstance(args[0], str | os.PathLike):
        _on_open[-1](os.fspath(args[0]))


sys.addaudithook(_audit)


def test_local_read_reports_the_version_of_the_content_it_opened(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path))
    key = "uploads/s/a.pdf"
    storage.put(key, io.BytesIO(b"%PDF-old"), "application/pdf")
    replacements = []

    def replace_just_before_opening(path: str) -> None:
        # Runs inside the adapter's open call, before the file is opened: the moment a
        # replacement from another request could slip in.
        if path == str(storage.root / key):
            _on_open.clear()
            replacements.append(storage.put(key, io.BytesIO(b"%PDF-new"), "application/pdf"))

    _on_open.append(replace_just_before_opening)
    try:
        found = storage.read(key)
    finally:
        _on_open.clear()
    assert found is not None
    stored, content = found
    read = content.read()
    content.close()

    assert len(replacements) == 1
    assert (stored.version, read) == (replacements[0].version, b"%PDF-new")


def test_unreachable_s3_raises_storage_unavailable() -> None:
    storage = S3Storage(
        bucket="b",
        region="us-east-1",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        connect_timeout=1,
        read_timeout=1,
        max_attempts=1,
    )

    with pytest.raises(StorageUnavailable):
        storage.check()
    with pytest.raises(StorageUnavailable):
        keys(storage)
    with pytest.raises(StorageUnavailable):
        storage.delete_many(["uploads/x/a.pdf"])
