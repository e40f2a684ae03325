"""The storage adapters, directly: S3 over HTTP (moto server) and the local directory."""

from __future__ import annotations

import io
from pathlib import Path

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
