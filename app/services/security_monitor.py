"""Watching for bursts: many failed codes or rate-limit refusals from one source in a window."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

from flask import current_app
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.exc import SQLAlchemyError

from app.clock import utcnow
from app.extensions import db, limiter
from app.models import AuditEvent
from app.privacy import client_key
from app.services import audit
from app.services.admin_alerts import Alert, current_alerts
from app.services.audit import AuditContext

log = logging.getLogger(__name__)

FAILED_CODE = "verification_code_rejected"
RATE_LIMITED = "rate_limited"
RATE_LIMIT_BURST = "rate_limit_burst"


def watch_failed_codes(context: AuditContext, session_uuid: uuid.UUID) -> None:
    """After a wrong code: alert if this IP, or else this session, has failed too often lately.

    The IP is checked first; a burst it explains is not reported again per session.
    """
    if context.client_ip is not None and _failed_codes_burst(
        AuditEvent.client_ip == context.client_ip, f"IP {context.client_ip}"
    ):
        return
    _failed_codes_burst(
        AuditEvent.session_uuid == session_uuid, f"session {session_uuid}", session_uuid
    )


def on_rate_limited(limit: str, context: AuditContext) -> None:
    """A request was refused by a rate limit: count it, and tell the database only of bursts.

    ``context`` is the refused request's, read by the HTTP layer that answers the 429.

    A flood of refusals must not become a flood of writes. Refusals are counted per client (as
    the limits count it) and window in the rate limiter's own storage (Redis when configured, so
    shared by every worker). The first refusal of a window is audited (``rate_limited``, with the
    limit), and so is the one that makes it a burst (``rate_limit_burst``), which is also
    notified: at most two rows per client per window, however many requests are refused.
    """
    config = current_app.config
    window = timedelta(minutes=config["SUSPICIOUS_WINDOW_MINUTES"])
    threshold = config["SUSPICIOUS_RATE_LIMIT_HITS"]
    try:
        # The limiter's current storage: its in-memory fallback while Redis is failing.
        refusals = limiter.limiter.storage.incr(
            f"{config['RATELIMIT_KEY_PREFIX']}/refusals/{client_key()}",
            int(window.total_seconds()),
        )
    except Exception:
        # The 429 must still go out when the counters' storage is the thing that is down.
        log.warning("rate-limit refusal not counted", exc_info=True)
        return
    if refusals not in (1, threshold):
        return
    try:
        if refusals == 1:
            audit.record(RATE_LIMITED, context, limit=limit)
        if refusals == threshold:
            audit.record(RATE_LIMIT_BURST, context, limit=limit, refusals=refusals)
        db.session.commit()
    except SQLAlchemyError:
        db.session.rollback()
        log.warning("rate-limit refusal not audited", exc_info=True)
    if refusals == threshold:
        _notify(f"{refusals} rate-limit refusals", f"IP {context.client_ip}", window, RATE_LIMITED)


def _failed_codes_burst(
    who: ColumnElement[bool], label: str, session_uuid: uuid.UUID | None = None
) -> bool:
    """Alert (deduplicated) if ``who`` failed SUSPICIOUS_FAILED_CODES codes in the window.

    Every wrong code is audited anyway, so the audit trail is what is counted.
    """
    config = current_app.config
    window = timedelta(minutes=config["SUSPICIOUS_WINDOW_MINUTES"])
    count = db.session.scalar(
        select(func.count())
        .select_from(AuditEvent)
        .where(
            AuditEvent.event_type == FAILED_CODE, who, AuditEvent.occurred_at > utcnow() - window
        )
    )
    db.session.rollback()
    if (count or 0) < config["SUSPICIOUS_FAILED_CODES"]:
        return False
    _notify(f"{count} failed e-mail codes", label, window, FAILED_CODE, session_uuid)
    return True


def _notify(
    what: str,
    label: str,
    window: timedelta,
    kind: str,
    session_uuid: uuid.UUID | None = None,
) -> None:
    """One suspicious-activity notification (deduplicated per kind and source)."""
    current_alerts().send(
        Alert(
            subject=f"Suspicious activity: {what} from {label}",
            signature=f"burst:{kind}:{label}",
            facts={"Time": utcnow().isoformat(), "What": f"{what} within {window}", "From": label},
            session_uuid=session_uuid,
        )
    )
