"""S3 (or any S3-compatible server) through boto3."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, BinaryIO

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from app.storage import BATCH_SIZE, StorageUnavailable, StoredObject


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
        pages = paginator.paginate(
            Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": BATCH_SIZE}
        )
        try:
            for page in pages:
                yield [
                    StoredObject(item["Key"], item["Size"], item["LastModified"], item["ETag"])
                    for item in page.get("Contents", [])
                ]
        except (BotoCoreError, ClientError) as exc:
            raise StorageUnavailable(
                f"listing failed: {_reason(exc)}", reason=_classify(exc)
            ) from None

    def put(self, key: str, body: BinaryIO, content_type: str) -> StoredObject:
        size = body.seek(0, os.SEEK_END)
        body.seek(0)
        try:
            stored = self._client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentType=content_type
            )
        except (BotoCoreError, ClientError) as exc:
            raise StorageUnavailable(
                f"storing failed: {_reason(exc)}", reason=_classify(exc)
            ) from None
        return StoredObject(key, size, datetime.now(UTC), stored["ETag"])

    def read(self, key: str) -> tuple[StoredObject, BinaryIO] | None:
        try:
            found = self._client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey"):
                return None
            raise StorageUnavailable(
                f"reading failed: {_reason(exc)}", reason=_classify(exc)
            ) from None
        except BotoCoreError as exc:
            raise StorageUnavailable(
                f"reading failed: {_reason(exc)}", reason=_classify(exc)
            ) from None
        stored = StoredObject(key, found["ContentLength"], found["LastModified"], found["ETag"])
        return stored, found["Body"]

    def delete_many(self, keys: Sequence[str]) -> dict[str, str]:
        failed: dict[str, str] = {}
        for start in range(0, len(keys), BATCH_SIZE):
            chunk = keys[start : start + BATCH_SIZE]
            try:
                response = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": key} for key in chunk], "Quiet": True},
                )
            except (BotoCoreError, ClientError) as exc:
                raise StorageUnavailable(
                    f"delete failed: {_reason(exc)}", reason=_classify(exc)
                ) from None
            for error in response.get("Errors", []):
                failed[error["Key"]] = str(error.get("Code"))
        return failed

    def check(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise StorageUnavailable(
                f"bucket check failed: {_reason(exc)}", reason=_classify(exc)
            ) from None

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
        try:
            self._client.create_bucket(
                Bucket=self.bucket,
                **({"CreateBucketConfiguration": location} if location else {}),
            )
        except (BotoCoreError, ClientError) as exc:
            raise StorageUnavailable(
                f"creating the bucket failed: {_reason(exc)}", reason=_classify(exc)
            ) from None
        return True


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
