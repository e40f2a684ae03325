"""Download links that hand over one file and nothing else.

A session's UUID is its only credential, so a link that showed it (or the storage key that
contains it) would hand the whole session to whoever received the link. A link is therefore
``/api/v1/files/<token>``, where the token is encrypted (Fernet: AES with an HMAC, keyed from
SECRET_KEY): it reveals nothing without the key, and the app resolves it and streams the file
itself, on both backends (a redirect to object storage would show the key, and so the
session, to whoever follows it). It names the file and the version of the file it was issued
for (the one put that stored it, never its content: see ``StoredVersion``), and lives
DOWNLOAD_URL_EXPIRES_SECONDS; it dies earlier when the file is deleted or replaced, even by the
same bytes, or the session ends, because the app checks all three whenever the link is used.

A download is answered only once storage has produced the object's head and first bytes, so a
storage that stalls before that costs a JSON 503; the rest is streamed after the view returns,
under the same request deadline, and a stall there ends the response short of its
Content-Length, which the client can tell from a complete file.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography.fernet import Fernet, InvalidToken
from flask import current_app, url_for

from app import deadline
from app.errors import FileNotFound, StorageUnavailableError
from app.services import chat_sessions
from app.storage import Content, StorageUnavailable, StoredVersion, current_storage, session_prefix

log = logging.getLogger(__name__)

# A token for the longest file name kept (200 characters) is about 500 characters; anything
# past twice that is not a link.
MAX_TOKEN_LENGTH = 1024
CHUNK_BYTES = 64 * 1024


class DownloadCut(Exception):
    """Storage stopped sending a file part-way; the response ends short of its length."""


@dataclass
class Download:
    """A file ready to be sent: its name, size, first bytes and the content still to read."""

    name: str
    size: int
    first: bytes
    rest: Content


@functools.lru_cache(maxsize=4)
def _fernet(secret_key: str) -> Fernet:
    key = hmac.new(secret_key.encode(), b"download-links", hashlib.sha256).digest()
    return Fernet(base64.urlsafe_b64encode(key))


def link(session_uuid: uuid.UUID, stored: StoredVersion) -> str:
    """The download link for one stored file of a session."""
    claims = {
        "s": str(session_uuid),
        "n": stored.key.rpartition("/")[2],
        "v": stored.version,
    }
    token = _fernet(current_app.config["SECRET_KEY"]).encrypt(json.dumps(claims).encode())
    return url_for("files.download", token=token.decode(), _external=True)


def resolve(token: str) -> Download:
    """The file a link names, with its first bytes read; FileNotFound if the link is dead."""
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
        if found is None:
            raise FileNotFound()
        stored, content = found
        if stored.version != version:
            content.close()
            raise FileNotFound()
        first = content.read(CHUNK_BYTES)
    except StorageUnavailable as exc:
        raise StorageUnavailableError() from exc
    return Download(name=name, size=stored.size, first=first, rest=content)


def stream(download: Download, expires: float | None) -> Iterator[bytes]:
    """The file's content in pieces, each read under the request's deadline ``expires``.

    A storage failure or stall raises DownloadCut, so the server drops the connection short of
    the announced length instead of ending a truncated file as if it were whole.
    """
    sent = len(download.first)
    try:
        yield download.first
        while sent < download.size:
            with deadline.until(expires):
                piece = download.rest.read(CHUNK_BYTES)
            if not piece:
                raise StorageUnavailable(f"the object ended after {sent} of {download.size} bytes")
            sent += len(piece)
            yield piece
    except StorageUnavailable as exc:
        log.warning("download cut short: %s", exc)
        raise DownloadCut(str(exc)) from None
    finally:
        download.rest.close()
