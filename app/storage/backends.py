"""The configured storage backend, built once by the app factory."""

from __future__ import annotations

from flask import Flask

from app.storage import Storage
from app.storage.local import LocalStorage


def init_app(app: Flask) -> None:
    """Build the configured backend and keep it on the app."""
    config = app.config
    storage: Storage
    if config["STORAGE_BACKEND"] == "s3":
        # Imported only when chosen: boto3 takes a quarter of a second to import.
        from app.storage.s3 import S3Storage

        storage = S3Storage(
            bucket=config["S3_BUCKET"],
            region=config["S3_REGION"],
            endpoint_url=config["S3_ENDPOINT_URL"],
            connect_timeout=config["S3_CONNECT_TIMEOUT_SECONDS"],
            read_timeout=config["S3_READ_TIMEOUT_SECONDS"],
            max_attempts=config["S3_MAX_ATTEMPTS"],
        )
    else:
        storage = LocalStorage(config["STORAGE_LOCAL_ROOT"])
    app.extensions["storage"] = storage
