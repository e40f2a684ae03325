"""Download links that hand over one file and nothing else.

A session's UUID is its only credential, so a link that showed it (or the storage key that
contains it) would hand the whole session to whoever received the link. A link is therefore
``/api/v1/files/<token>``, where the token is encrypted (Fernet: AES with an HMAC, keyed from
SECRET_KEY): it reveals nothing without the key, and the app resolves it and streams the file
itself, on both backends (a redirect to object storage would show the key, and so the
session, to whoever follows it). It names the file and the version of the file it was issued
for, and lives DOWNLOAD_URL_EXPIRES_SECONDS; it dies earlier when the file is deleted or
replaced or the session ends, because the app checks all three whenever the link is used.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import uuid
from typing import BinaryIO

from cryptography.fernet import Fernet, InvalidToken
from flask import current_app, url_for

from app.errors import FileNotFound, StorageUnavailableError
from app.services import chat_sessions
from app.storage import StorageUnavailable, StoredObject, current_storage, session_prefix

# A token for the longest file name kept (200 characters) is about 500 characters, and an S3
# store with longer version tags adds a few dozen; anything past twice that is not a link.
MAX_TOKEN_LENGTH = 1024


@functools.lru_cache(maxsize=4)
def _fernet(secret_key: str) -> Fernet:
    key = hmac.new(secret_key.encode(), b"download-links", hashlib.sha256).digest()
    return Fernet(base64.urlsafe_b64encode(key))


def link(session_uuid: uuid.UUID, stored: StoredObject) -> str:
    """The download link for one stored file of a session."""
    claims = {
        "s": str(session_uuid),
        "n": stored.key.rpartition("/")[2],
        "v": stored.version,
    }
    token = _fernet(current_app.config["SECRET_KEY"]).encrypt(json.dumps(claims).encode())
    return url_for("files.download", token=token.decode(), _external=True)


def resolve(token: str) -> tuple[BinaryIO, str]:
    """The content of the file a link names, and its name; FileNotFound if the link is dead."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise FileNotFound()
    config = current_app.config
    try:
        plain = _fernet(config["SECRET_KEY"]).decrypt(
            token.encode(), ttl=config["DOWNLOAD_URL_EXPIRES_SECONDS"]
        )
        claims = json.loads(plain)
        session_uuid, name, version = uuid.UUID(claims["s"]), claims["n"], claims["v"]
    except (InvalidToken, ValueError, KeyError, TypeError):
        raise FileNotFound() from None
    if not chat_sessions.is_live(session_uuid):
        raise FileNotFound()
    try:
        found = current_storage().read(session_prefix(session_uuid) + name)
    except StorageUnavailable as exc:
        raise StorageUnavailableError() from exc
    if found is None:
        raise FileNotFound()
    stored, content = found
    if stored.version != version:
        content.close()
        raise FileNotFound()
    return content, name
