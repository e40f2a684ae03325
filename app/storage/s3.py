"""S3 (or any S3-compatible server) through boto3.

botocore's timeouts bound each connect and each socket read, not a call: a server that sends
a byte every few seconds, or a name that takes long to resolve, would hold a call without
limit. Every call therefore runs through ``deadline.call_within``, bounded as a whole by its
own worst case (attempts x (connect + read) plus back-off) and the time the request has left.
"""

from __future__ import annotations

import functools
import io
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, BinaryIO, TypeVar

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from app import deadline
from app.storage import BATCH_SIZE, Content, StorageUnavailable, StoredObject, StoredVersion

T = TypeVar("T")
# User metadata naming the put that stored an object: its version. The ETag cannot serve, being
# a hash of the content: equal bytes stored again would revive the links to the earlier upload.
UPLOAD_ID_METADATA = "upload-id"
# botocore's standard retry mode waits up to 2 ** (retry - 1) seconds before a retry, at most 20.
MAX_BACKOFF_SECONDS = 20


class S3Storage:
    """Objects in one bucket; every call bounded by timeouts and standard retries."""

    def __init__(
        self,
        *,
        bucket: str,
        region: str | None,
        endpoint_url: str | None,
        connect_timeout: int,
        read_timeout: int,
        max_attempts: int,
    ) -> None:
        self.bucket = bucket
        backoff = sum(
            min(2 ** (retry - 1), MAX_BACKOFF_SECONDS) for retry in range(1, max_attempts)
        )
        self.call_timeout = max_attempts * (connect_timeout + read_timeout) + backoff
        self.read_timeout = read_timeout
        self._client: Any = boto3.client(
            "s3",
            region_name=region,
            endpoint_url=endpoint_url,
            config=BotoConfig(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"mode": "standard", "total_max_attempts": max_attempts},
                signature_version="s3v4",
            ),
        )

    def list_pages(self, prefix: str) -> Iterator[list[StoredObject]]:
        paginator = self._client.get_paginator("list_objects_v2")
        pages = iter(
            paginator.paginate(
                Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": BATCH_SIZE}
            )
        )
        while (page := self._call("listing", lambda: next(pages, None))) is not None:
            yield [
                StoredObject(item["Key"], item["Size"], item["LastModified"], item["ETag"])
                for item in page.get("Contents", [])
            ]

    def put(self, key: str, body: BinaryIO, content_type: str) -> StoredVersion:
        size = body.seek(0, os.SEEK_END)
        body.seek(0)
        upload_id = secrets.token_hex(16)
        self._call(
            "storing",
            lambda: self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentType=content_type,
                Metadata={UPLOAD_ID_METADATA: upload_id},
            ),
        )
        return StoredVersion(key, size, datetime.now(UTC), upload_id)

    def head(self, key: str) -> StoredVersion | None:
        try:
            found = self._call(
                "reading", lambda: self._client.head_object(Bucket=self.bucket, Key=key)
            )
        except _Missing:
            return None
        return _described(key, found)

    def read(self, key: str) -> tuple[StoredVersion, Content] | None:
        try:
            found = self._call(
                "reading", lambda: self._client.get_object(Bucket=self.bucket, Key=key)
            )
        except _Missing:
            return None
        return _described(key, found), _BoundedBody(found["Body"], self.read_timeout)

    def delete_many(self, keys: Sequence[str]) -> dict[str, str]:
        failed: dict[str, str] = {}
        for start in range(0, len(keys), BATCH_SIZE):
            chunk = keys[start : start + BATCH_SIZE]
            objects = {"Objects": [{"Key": key} for key in chunk], "Quiet": True}
            response = self._call(
                "delete",
                functools.partial(self._client.delete_objects, Bucket=self.bucket, Delete=objects),
            )
            for error in response.get("Errors", []):
                failed[error["Key"]] = str(error.get("Code"))
        return failed

    def check(self) -> None:
        self._call("bucket check", lambda: self._client.head_bucket(Bucket=self.bucket))

    def create(self) -> bool:
        try:
            self.check()
            return False
        except StorageUnavailable as exc:
            if exc.reason != "missing_bucket":
                raise
        region = self._client.meta.region_name
        # us-east-1 is S3's default location and the one region that refuses to be named.
        location = {} if region in (None, "us-east-1") else {"LocationConstraint": region}
        self._call(
            "creating the bucket",
            lambda: self._client.create_bucket(
                Bucket=self.bucket,
                **({"CreateBucketConfiguration": location} if location else {}),
            ),
        )
        return True

    def _call(self, action: str, call: Callable[[], T]) -> T:
        """Run one S3 call bounded as a whole; StorageUnavailable if it fails or takes too long.

        A missing key on a read is no failure: it raises ``_Missing`` for the caller to answer.
        """
        try:
            return deadline.call_within(self.call_timeout, call)
        except deadline.DeadlineExceeded as exc:
            raise StorageUnavailable(f"{action} failed: {exc}", reason="unreachable") from None
        except ClientError as exc:
            if action == "reading" and _error_code(exc) in ("404", "NoSuchKey"):
                raise _Missing() from None
            raise StorageUnavailable(
                f"{action} failed: {_reason(exc)}", reason=_classify(exc)
            ) from None
        except BotoCoreError as exc:
            raise StorageUnavailable(
                f"{action} failed: {_reason(exc)}", reason=_classify(exc)
            ) from None


class _Missing(Exception):
    """The object asked for does not exist."""


class _BoundedBody(io.RawIOBase):
    """An object's content whose every read ends within the read timeout and the deadline.

    The caller compares what it read with the object's size: a connection that ends early is
    not detected here.

    A read abandoned at its bound shuts the connection down under it, so the thread that was
    reading ends at once instead of following the server's trickle.
    """

    def __init__(self, body: Any, read_timeout: float) -> None:
        self._body = body
        self._read_timeout = read_timeout

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        """What has arrived, up to ``size`` bytes, waiting only until the first arrives."""
        amount = None if size is None or size < 0 else size
        # urllib3's own response under botocore's wrapper: read1 returns as soon as some bytes
        # are there, and shutdown interrupts a read blocked in another thread.
        raw = self._body._raw_stream
        try:
            chunk: bytes = deadline.call_within(
                self._read_timeout, lambda: raw.read1(amount), on_abandon=raw.shutdown
            )
        except deadline.DeadlineExceeded as exc:
            raise StorageUnavailable(f"reading failed: {exc}", reason="unreachable") from None
        except (BotoCoreError, OSError) as exc:
            raise StorageUnavailable(
                f"reading failed: {_reason(exc)}", reason="unreachable"
            ) from None
        return chunk

    def close(self) -> None:
        self._body.close()
        super().close()


def _described(key: str, found: dict[str, Any]) -> StoredVersion:
    """The object a HeadObject or GetObject answer describes, with its version."""
    # An object stored before puts were tagged falls back to its ETag: its links still work,
    # and die when it is replaced or deleted, since whatever is stored next carries an id.
    version = found.get("Metadata", {}).get(UPLOAD_ID_METADATA) or found["ETag"]
    return StoredVersion(key, found["ContentLength"], found["LastModified"], version)


def _reason(exc: Exception) -> str:
    """What went wrong, without the URL or key botocore quotes (keys carry file names).

    The original exception is dropped from the chain for the same reason: tracebacks are logged.
    """
    if isinstance(exc, ClientError):
        return f"{_error_code(exc)} from S3"
    return type(exc).__name__


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "error"))


def _classify(exc: Exception) -> str:
    """The StorageUnavailable reason for a botocore error."""
    if not isinstance(exc, ClientError):
        return "unreachable"
    code = _error_code(exc)
    if code in ("404", "NoSuchBucket"):
        return "missing_bucket"
    if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return "access_denied"
    return "failed"
