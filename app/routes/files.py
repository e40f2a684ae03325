"""File endpoints: upload, delete, list, and downloads of locally stored files."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import current_app, request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wrappers import Response

from app import deadline
from app.middleware import request_audit_context
from app.rate_limits import limited_per_ip
from app.routes import ApiBlueprint
from app.schemas import (
    DeleteFileRequestSchema,
    MessageSchema,
    SessionFilesSchema,
    UploadedFileSchema,
    UploadSchema,
)
from app.services import download_links, files

files_bp = ApiBlueprint(
    "files", __name__, url_prefix="/api/v1", description="PDF files tied to a session."
)

# Room for the multipart framing and the session_uuid field around the file itself.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


def bounded_upload(view: Callable[..., Any]) -> Callable[..., Any]:
    """Refuse a body larger than the upload limit before reading it, as file_too_large."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        max_bytes = current_app.config["MAX_UPLOAD_MB"] * 1024 * 1024
        request.max_content_length = max_bytes + MULTIPART_OVERHEAD_BYTES
        try:
            return view(*args, **kwargs)
        except RequestEntityTooLarge:
            files.refuse_oversized_body(request_audit_context())

    return wrapper


@files_bp.route("/upload", methods=["POST"])
@limited_per_ip("UPLOAD_RATE_LIMIT")
@bounded_upload
@files_bp.arguments(UploadSchema(), location="multipart")
@files_bp.response(200, UploadedFileSchema)
@files_bp.alt_response(404, response="NOT_FOUND")
@files_bp.alt_response(409, response="CONFLICT")
@files_bp.alt_response(413, response="REQUEST_ENTITY_TOO_LARGE")
@files_bp.alt_response(415, response="UNSUPPORTED_MEDIA_TYPE")
@files_bp.alt_response(429, response="TOO_MANY_REQUESTS")
@files_bp.alt_response(503, response="SERVICE_UNAVAILABLE")
def upload(form: dict[str, Any]) -> dict[str, Any]:
    """Upload a PDF to the session's folder; re-uploading a name replaces that file."""
    stored = files.upload(
        form["session_uuid"],
        form["file"].filename or "",
        form["file"].stream,
        context=request_audit_context(),
    )
    return {
        "status": "success",
        "message": "File uploaded.",
        "filename": stored.filename,
        "url": stored.url,
        "size": stored.size,
        "content_type": stored.content_type,
    }


@files_bp.route("/delete", methods=["DELETE"])
@limited_per_ip("UPLOAD_RATE_LIMIT")
@files_bp.arguments(DeleteFileRequestSchema())
@files_bp.response(200, MessageSchema)
@files_bp.alt_response(404, response="NOT_FOUND")
@files_bp.alt_response(429, response="TOO_MANY_REQUESTS")
@files_bp.alt_response(503, response="SERVICE_UNAVAILABLE")
def delete(body: dict[str, Any]) -> dict[str, Any]:
    """Delete one of the session's files."""
    files.delete(body["session_uuid"], body["filename"], context=request_audit_context())
    return {"status": "success", "message": "File deleted."}


@files_bp.route("/session/<uuid:session_uuid>/files", methods=["GET"])
@limited_per_ip("SESSION_RESOURCE_RATE_LIMIT")
@files_bp.response(200, SessionFilesSchema)
@files_bp.alt_response(404, response="NOT_FOUND")
@files_bp.alt_response(429, response="TOO_MANY_REQUESTS")
@files_bp.alt_response(503, response="SERVICE_UNAVAILABLE")
def list_files(session_uuid: uuid.UUID) -> dict[str, Any]:
    """The session's files, each with a time-limited download URL."""
    stored = files.list_files(session_uuid)
    return {
        "status": "success",
        "message": f"{len(stored)} file(s).",
        "files": [
            {
                "filename": item.filename,
                "size": item.size,
                "content_type": item.content_type,
                "uploaded_at": item.uploaded_at,
                "url": item.url,
            }
            for item in stored
        ],
    }


@files_bp.route("/files/<token>", methods=["GET"])
@limited_per_ip("SESSION_RESOURCE_RATE_LIMIT")
@files_bp.response(200, content_type="application/pdf", description="The file, as an attachment")
@files_bp.alt_response(404, response="NOT_FOUND")
@files_bp.alt_response(429, response="TOO_MANY_REQUESTS")
@files_bp.alt_response(503, response="SERVICE_UNAVAILABLE")
def download(token: str) -> Response:
    """Download a file through its link; the link names neither the session nor the file's key."""
    found = download_links.resolve(token)
    response = Response(
        download_links.stream(found, deadline.expires_at()),
        mimetype=files.PDF_CONTENT_TYPE,
        direct_passthrough=True,
    )
    response.headers["Content-Length"] = str(found.size)
    response.headers.set("Content-Disposition", "attachment", filename=found.name)
    return response
