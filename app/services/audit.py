"""The audit trail: one row per session event, written inside the caller's transaction."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import BindParameter, Insert, Select, Table, bindparam, insert, select

from app.clock import utcnow
from app.extensions import db, execute
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
    """Add one audit row per (session UUID, details) pair, in a single statement.

    Through the connection: the rows are plain table rows, and the ORM's bulk-insert path would
    cost more than the INSERT itself. A single row goes as one set of parameters, not a batch.
    """
    occurred_at = utcnow()
    rows = [
        {"session_uuid": session_uuid, **_values(event_type, context, occurred_at, details)}
        for session_uuid, details in events
    ]
    if not rows:
        return
    execute(_INSERT, rows[0] if len(rows) == 1 else rows)


def bound_values(
    event_type: str, context: AuditContext, occurred_at: datetime, **details: Any
) -> dict[str, Any]:
    """The parameters of ``insert_for_each``: an audit row's values but its session UUID."""
    values = _values(event_type, context, occurred_at, details)
    return {f"audit_{column}": value for column, value in values.items()}


def _values(
    event_type: str, context: AuditContext, occurred_at: datetime, details: Mapping[str, object]
) -> dict[str, Any]:
    return {
        "occurred_at": occurred_at,
        "event_type": event_type,
        "client_ip": context.client_ip,
        "correlation_id": context.correlation_id,
        "details": details,
    }


def insert_for_each(sessions: Select[tuple[uuid.UUID]]) -> Insert:
    """An INSERT of one audit row per session UUID that ``sessions`` selects (its one column).

    For a statement that writes a change and its audit rows at once (with a data-modifying CTE,
    on PostgreSQL); the other values are bound parameters, given by ``bound_values``. Their
    names carry a prefix, so that they never meet a parameter of the change they are written with.
    """
    values = sessions.with_only_columns(
        _bound("occurred_at"),
        _bound("event_type"),
        *sessions.selected_columns,
        _bound("client_ip"),
        _bound("correlation_id"),
        _bound("details"),
    )
    columns = ["occurred_at", "event_type", "session_uuid", "client_ip", "correlation_id"]
    return insert(_TABLE).from_select([*columns, "details"], values)


def _bound(column: str) -> BindParameter[Any]:
    return bindparam(f"audit_{column}", type_=_TABLE.c[column].type)


_TABLE = cast(Table, AuditEvent.__table__)
# Built once: building an INSERT costs more than running it.
_INSERT = insert(_TABLE)


def trail(session_uuid: uuid.UUID) -> list[AuditEvent]:
    """A session's audit events, oldest first."""
    return list(
        db.session.scalars(
            select(AuditEvent)
            .where(AuditEvent.session_uuid == session_uuid)
            .order_by(AuditEvent.occurred_at, AuditEvent.id)
        )
    )
