"""Domain errors: what the services raise when a business rule says no.

Each carries its HTTP status and stable error code as plain data; app.http_errors turns them
(and every other error) into the contract's JSON shape. This module imports nothing of the app
but its fixed texts, so any layer may raise these.
"""

from __future__ import annotations

from typing import Any

from app.messages import GENERAL_ERROR


class DomainError(Exception):
    """A business rule said no; carries the HTTP status and the stable error code."""

    status_code = 400
    error = "bad_request"
    message = "The request could not be processed."
    # Seconds a client should wait before retrying a 503.
    retry_after = 5

    def __init__(self, message: str | None = None, *, details: dict[str, Any] | None = None):
        super().__init__(message or self.message)
        if message is not None:
            self.message = message
        self.details = details


class InvalidRequest(DomainError):
    """The request is malformed."""

    error = "invalid_request"
    message = "The request is malformed."


class ConsentRequired(DomainError):
    """Personal data was sent without consent to store it."""

    error = "consent_required"
    message = (
        "Consent to store personal data (consent_user_data: true) is required for name or email."
    )


class SessionNotFound(DomainError):
    """The session is unknown or has ended."""

    status_code = 404
    error = "session_not_found"
    message = "This is an invalid session: it does not exist or has ended."


class InvalidFileName(DomainError):
    """Nothing usable is left of the file name after sanitising."""

    error = "invalid_filename"
    message = "The file name is not usable. Please rename the file and try again."


class UnsupportedFileType(DomainError):
    """The upload is not a PDF."""

    status_code = 415
    error = "unsupported_file_type"
    message = "Only PDF files can be uploaded."


class FileTooLarge(DomainError):
    """The upload exceeds the size limit."""

    status_code = 413
    error = "file_too_large"
    message = "The file is too large."


class FileLimitReached(DomainError):
    """The session already holds as many files as allowed."""

    status_code = 409
    error = "file_limit_reached"
    message = "This session already has the maximum number of files."


class FileNotFound(DomainError):
    """The session has no file of that name."""

    status_code = 404
    error = "file_not_found"
    message = "No such file in this session."


class StorageUnavailableError(DomainError):
    """File storage could not be reached; nothing was changed."""

    status_code = 503
    error = "storage_unavailable"
    message = "File storage is temporarily unavailable. Please try again later."


class SessionBusy(DomainError):
    """Another request held the session longer than the lock timeout; retrying will work."""

    status_code = 503
    error = "session_busy"
    message = "This session is busy with another request. Please try again in a moment."
    retry_after = 1


class DependencyTimeout(DomainError):
    """A dependency did not answer within the request's deadline."""

    status_code = 503
    error = "dependency_timeout"
    message = GENERAL_ERROR


class RateLimited(DomainError):
    """The client used up a rate limit; ``retry_after`` is when its window resets."""

    status_code = 429
    error = "rate_limited"
    message = "Too many requests. Please wait before trying again."

    def __init__(self, *, limit: str, retry_after: int) -> None:
        super().__init__()
        self.limit = limit
        self.retry_after = retry_after


class CredentialsMissing(DomainError):
    """A protected endpoint was called without its bearer token."""

    status_code = 401
    error = "unauthorized"
    message = "This endpoint needs a token: send it as Authorization: Bearer <token>."


class TokenRejected(DomainError):
    """A data-request token that is malformed, expired, or dead since an erasure."""

    status_code = 401
    error = "invalid_token"
    message = (
        "This token is not valid: it has expired or was used to erase the data. "
        "Please ask for a new code."
    )


class CodeRefused(DomainError):
    """A data-request code that is wrong, expired or used up; ``error`` says which."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error


class CredentialsRejected(DomainError):
    """A protected endpoint was called with a token it does not accept."""

    status_code = 403
    error = "forbidden"
    message = "This token is not accepted here."


class UuidGenerationFailed(DomainError):
    """Every attempt to issue a fresh UUID collided."""

    status_code = 500
    error = "uuid_generation_failed"
    message = GENERAL_ERROR
