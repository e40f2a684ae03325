"""Database models: chat sessions, retired session UUIDs and the audit trail."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Index,
    Integer,
    String,
    Uuid,
    false,
    func,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from app.extensions import Base


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp that always reads back as UTC.

    PostgreSQL keeps the zone; SQLite stores naive text, so values are
    normalised to UTC on the way in and marked UTC on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use app.clock.utcnow()")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class SessionState(enum.StrEnum):
    """Where a chat session is in its lifecycle."""

    PENDING = "pending"
    VERIFIED = "verified"


class ChatSession(Base):
    """An anonymous chat session, keyed by the UUID the frontend holds."""

    __tablename__ = "chat_sessions"

    uuid: Mapped[uuid.UUID] = mapped_column(Uuid(as_uuid=True), primary_key=True)
    state: Mapped[SessionState] = mapped_column(
        Enum(
            SessionState,
            name="session_state",
            native_enum=False,
            create_constraint=True,
            length=16,
            values_callable=lambda states: [state.value for state in states],
        ),
        default=SessionState.PENDING,
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    consent_user_data: Mapped[bool] = mapped_column(default=False)
    consent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    name: Mapped[str | None] = mapped_column(String(200))
    email: Mapped[str | None] = mapped_column(String(254))
    email_verified: Mapped[bool] = mapped_column(default=False)
    client_ip: Mapped[str | None] = mapped_column(String(45))
    # The current e-mail code, only as a keyed hash; cleared once used.
    verification_code_hash: Mapped[str | None] = mapped_column(String(64))
    verification_code_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    verification_attempts_left: Mapped[int | None] = mapped_column()

    __table_args__ = (
        # The abandoned-session and retention jobs select by state and idle time.
        Index("ix_chat_sessions_state_last_seen_at", "state", "last_seen_at"),
        # A data request finds the sessions that verified an address, in any letter case.
        Index(
            "ix_chat_sessions_verified_email",
            func.lower(email),
            postgresql_where=email_verified.is_(True),
            sqlite_where=email_verified.is_(True),
        ),
    )

    def require_email_verification(self) -> None:
        """The address changed or went: not verified, not complete, and any code sent is void."""
        self.email_verified = False
        self.state = SessionState.PENDING
        self.completed_at = None
        self.verification_code_hash = None
        self.verification_code_expires_at = None
        self.verification_attempts_left = None


class RetirementReason(enum.StrEnum):
    """Why a session UUID was retired."""

    DELETED = "deleted"
    ABANDONED = "abandoned"
    EXPIRED = "expired"


class RetiredSessionUUID(Base):
    """Tombstone of an ended session: its UUID is never issued or accepted again."""

    __tablename__ = "retired_session_uuids"

    uuid: Mapped[uuid.UUID] = mapped_column(Uuid(as_uuid=True), primary_key=True)
    retired_at: Mapped[datetime] = mapped_column(UTCDateTime())
    reason: Mapped[RetirementReason] = mapped_column(
        Enum(
            RetirementReason,
            name="retirement_reason",
            native_enum=False,
            create_constraint=True,
            length=16,
            values_callable=lambda reasons: [reason.value for reason in reasons],
        )
    )

    # Old tombstones are pruned by age; written in time order, a BRIN index finds them.
    __table_args__ = (
        Index("ix_retired_session_uuids_retired_at", "retired_at", postgresql_using="brin"),
    )


class AuditEvent(Base):
    """One row per session event; never holds personal data."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    event_type: Mapped[str] = mapped_column(String(64))
    session_uuid: Mapped[uuid.UUID | None] = mapped_column(Uuid(as_uuid=True))
    client_ip: Mapped[str | None] = mapped_column(String(45))
    correlation_id: Mapped[str | None] = mapped_column(String(36))
    details: Mapped[dict[str, Any]] = mapped_column(
        JSON().with_variant(JSONB(), "postgresql"), default=dict
    )

    __table_args__ = (
        # A session's trail is read newest first by export, the CLI and notifications.
        Index("ix_audit_events_session_uuid_occurred_at", "session_uuid", "occurred_at"),
        # The wrong-code burst check: one client's rejected codes in the last minutes.
        Index(
            "ix_audit_events_rejected_codes",
            "client_ip",
            "occurred_at",
            postgresql_where=event_type == "verification_code_rejected",
            sqlite_where=event_type == "verification_code_rejected",
        ),
    )


# On PostgreSQL audit_events is partitioned by UTC day (migration 0009): a partition per day,
# created and dropped by app.services.audit_partitions, and a default one for any other date.
# They are not described here: the parent table is.
AUDIT_PARTITION_PREFIX = "audit_events_p"
AUDIT_DEFAULT_PARTITION = "audit_events_default"


def is_audit_partition(table_name: str | None) -> bool:
    """Whether ``table_name`` is one of audit_events' partitions."""
    return table_name is not None and (
        table_name == AUDIT_DEFAULT_PARTITION
        or (
            table_name.startswith(AUDIT_PARTITION_PREFIX)
            and table_name.removeprefix(AUDIT_PARTITION_PREFIX).isdigit()
        )
    )


class JobRun(Base):
    """Coordination record of a background job across every worker and host."""

    __tablename__ = "job_runs"

    job_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Where advisory locks are missing (SQLite), a lease row stands in for them.
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_run_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_run_completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_run_summary: Mapped[dict[str, Any] | None] = mapped_column(
        JSON().with_variant(JSONB(), "postgresql")
    )


class EmailSend(Base):
    """One verification e-mail claimed or sent: the history the sending limits are counted from.

    The mailbox (the address with any plus-tag dropped) and the client's network are kept only
    as keyed hashes, enough to cap sends per mailbox and per network.
    """

    __tablename__ = "email_sends"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    session_uuid: Mapped[uuid.UUID | None] = mapped_column(Uuid(as_uuid=True))
    address_hash: Mapped[str] = mapped_column(String(64))
    sent_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    # False from the claim until the mail server accepted the message.
    delivered: Mapped[bool] = mapped_column(server_default=true())
    # The IPv4 /24 or IPv6 /64 that asked; None for sends recorded before networks were counted.
    network_hash: Mapped[str | None] = mapped_column(String(64))
    # The message did not go out and the session's row could not be had to take the code back:
    # the code on the session was never received, and the session's next step voids it.
    failed: Mapped[bool] = mapped_column(server_default=false())

    __table_args__ = (
        Index("ix_email_sends_session_uuid_sent_at", "session_uuid", "sent_at"),
        Index("ix_email_sends_address_hash_sent_at", "address_hash", "sent_at"),
    )


class ConsentEvent(Base):
    """One consent decision: given or withdrawn, when, from where, under which wording."""

    __tablename__ = "consent_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    session_uuid: Mapped[uuid.UUID] = mapped_column(Uuid(as_uuid=True), index=True)
    granted: Mapped[bool] = mapped_column()
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime())
    client_ip: Mapped[str | None] = mapped_column(String(45))
    wording_version: Mapped[str] = mapped_column(String(32))


class AdminNotice(Base):
    """When a kind of admin notification last went out, so each goes out once per window.

    Shared by every worker and host; the signature is stored only as a hash (it may name a
    client network).
    """

    __tablename__ = "admin_notices"

    signature_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_sent_at: Mapped[datetime] = mapped_column(UTCDateTime())


class DataRequest(Base):
    """A request to see or erase what is held under one verified address, by a mailed code.

    The address is kept only as a keyed hash. The code lives until it is used, expires or runs
    out of attempts; a verified request becomes the grant behind one bearer token, which dies
    with it (``revoked_at``) after an erasure.
    """

    __tablename__ = "data_requests"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    address_hash: Mapped[str] = mapped_column(String(64), index=True)
    code_hash: Mapped[str | None] = mapped_column(String(64))
    code_expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    attempts_left: Mapped[int] = mapped_column(Integer())
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    # Set when the code was verified: the id the bearer token names.
    grant_id: Mapped[str | None] = mapped_column(String(32), unique=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The sessions an erasure through this grant began, until it finished them all.
    erasing: Mapped[list[str] | None] = mapped_column(JSON())


class PendingFileDeletion(Base):
    """A file deletion asked for and not yet known to be done.

    Committed before storage is asked, so a failure after that point (storage or the database)
    leaves this row, not a file gone without its ``file_deleted`` audit row. Whoever finishes it
    deletes the file if it is still stored, records ``file_deleted`` and removes the row. The file
    is named by its audit reference, never by its name.
    """

    __tablename__ = "pending_file_deletions"

    session_uuid: Mapped[uuid.UUID] = mapped_column(Uuid(as_uuid=True), primary_key=True)
    file_ref: Mapped[str] = mapped_column(String(16), primary_key=True)
    # The orphan sweep finishes only deletions older than a request can take.
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
