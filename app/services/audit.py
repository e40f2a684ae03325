"""The audit trail: one row per session event, written inside the caller's transaction."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, insert, select

from app.clock import utcnow
from app.extensions import db
from app.models import AuditEvent


@dataclass(frozen=True)
class AuditContext:
    """Who caused an event: a reduced client address and the request's correlation id."""

    client_ip: str | None = None
    correlation_id: str | None = None


SYSTEM = AuditContext()


def record(
    event_type: str,
    context: AuditContext,
    session_uuid: uuid.UUID | None = None,
    **details: Any,
) -> None:
    """Add an audit row to the current transaction; the caller commits.

    ``details`` must never carry personal data (names, e-mail addresses, codes).
    """
    record_many(event_type, context, [(session_uuid, details)])


def record_many(
    event_type: str,
    context: AuditContext,
    events: Sequence[tuple[uuid.UUID | None, Mapping[str, object]]],
) -> None:
    """Add one audit row per (session UUID, details) pair, in a single statement."""
    occurred_at = utcnow()
    db.session.execute(
        _INSERT,
        [
            {
                "occurred_at": occurred_at,
                "event_type": event_type,
                "session_uuid": session_uuid,
                "client_ip": context.client_ip,
                "correlation_id": context.correlation_id,
                "details": details,
            }
            for session_uuid, details in events
        ],
    )


# Built once: building an INSERT costs more than running it.
_INSERT = insert(cast(Table, AuditEvent.__table__))


def trail(session_uuid: uuid.UUID) -> list[AuditEvent]:
    """A session's audit events, oldest first."""
    return list(
        db.session.scalars(
            select(AuditEvent)
            .where(AuditEvent.session_uuid == session_uuid)
            .order_by(AuditEvent.occurred_at, AuditEvent.id)
        )
    )
