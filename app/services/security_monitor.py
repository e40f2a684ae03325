"""Watching the audit trail for bursts: many failed codes or rate-limit hits in a short window."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

from flask import current_app
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.exc import SQLAlchemyError

from app.clock import utcnow
from app.extensions import db
from app.middleware import request_audit_context
from app.models import AuditEvent
from app.services import audit
from app.services.admin_alerts import Alert, current_alerts
from app.services.audit import AuditContext

log = logging.getLogger(__name__)

FAILED_CODE = "verification_code_rejected"
RATE_LIMITED = "rate_limited"


def watch_failed_codes(context: AuditContext, session_uuid: uuid.UUID) -> None:
    """After a wrong code: alert if this IP, or else this session, has failed too often lately.

    The IP is checked first; a burst it explains is not reported again per session.
    """
    threshold = current_app.config["SUSPICIOUS_FAILED_CODES"]
    if context.client_ip is not None and _check(
        FAILED_CODE, AuditEvent.client_ip == context.client_ip, f"IP {context.client_ip}", threshold
    ):
        return
    _check(
        FAILED_CODE,
        AuditEvent.session_uuid == session_uuid,
        f"session {session_uuid}",
        threshold,
        session_uuid,
    )


def on_rate_limited(limit: str) -> None:
    """A request was refused by a rate limit: audit it and watch for a burst from this IP."""
    context = request_audit_context()
    try:
        audit.record(RATE_LIMITED, context, limit=limit)
        db.session.commit()
        if context.client_ip is not None:
            _check(
                RATE_LIMITED,
                AuditEvent.client_ip == context.client_ip,
                f"IP {context.client_ip}",
                current_app.config["SUSPICIOUS_RATE_LIMIT_HITS"],
            )
    except SQLAlchemyError:
        # The 429 must still go out when the database is the thing that is down.
        db.session.rollback()
        log.warning("rate-limit hit not audited", exc_info=True)


def _check(
    event_type: str,
    who: ColumnElement[bool],
    label: str,
    threshold: int,
    session_uuid: uuid.UUID | None = None,
) -> bool:
    """Alert (deduplicated) if ``who`` has at least ``threshold`` such events in the window."""
    window = timedelta(minutes=current_app.config["SUSPICIOUS_WINDOW_MINUTES"])
    count = db.session.scalar(
        select(func.count())
        .select_from(AuditEvent)
        .where(AuditEvent.event_type == event_type, who, AuditEvent.occurred_at > utcnow() - window)
    )
    db.session.rollback()
    if (count or 0) < threshold:
        return False
    kind = "failed e-mail codes" if event_type == FAILED_CODE else "rate-limit hits"
    current_alerts().send(
        Alert(
            subject=f"Suspicious activity: {count} {kind} from {label}",
            signature=f"burst:{event_type}:{label}",
            facts={
                "Time": utcnow().isoformat(),
                "What": f"{count} {kind} within {window}",
                "From": label,
            },
            session_uuid=session_uuid,
        )
    )
    return True
