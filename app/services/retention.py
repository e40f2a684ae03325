"""Retention: completed sessions and audit rows are kept only for their configured time."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, delete, func, select

from app.extensions import db
from app.models import AuditEvent, ChatSession, RetirementReason, SessionState
from app.services import admin_alerts, audit
from app.services.audit import SYSTEM
from app.services.erasure import erase_all, report_problems

JOB_NAME = "retention"
BATCH = 200


@dataclass
class RetentionReport:
    """What one retention run erased."""

    dry_run: bool
    sessions_erased: int = 0
    files_deleted: int = 0
    audit_rows_deleted: int = 0
    errors: int = 0
    duration_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def apply_retention(
    *, now: datetime, data_retention: timedelta, audit_retention: timedelta, dry_run: bool
) -> RetentionReport:
    """Erase verified sessions idle past their retention, and audit rows past theirs."""
    report = RetentionReport(dry_run=dry_run)
    started = time.perf_counter()
    expired = (ChatSession.state == SessionState.VERIFIED) & (
        ChatSession.last_seen_at < now - data_retention
    )
    old_audit = AuditEvent.occurred_at < now - audit_retention
    if dry_run:
        report.sessions_erased = _count(select(ChatSession.uuid).where(expired))
        report.audit_rows_deleted = _count(select(AuditEvent.id).where(old_audit))
        db.session.rollback()
    else:
        _erase_expired(expired, report)
        result = db.session.execute(delete(AuditEvent).where(old_audit))
        report.audit_rows_deleted = int(result.rowcount or 0)  # type: ignore[attr-defined]
        admin_alerts.forget_old_notices(now)
        audit.record("retention_completed", SYSTEM, **report.as_dict())
        db.session.commit()
    report.duration_seconds = round(time.perf_counter() - started, 3)
    return report


def _erase_expired(expired: ColumnElement[bool], report: RetentionReport) -> None:
    totals = erase_all(expired, reason=RetirementReason.EXPIRED, batch_size=BATCH)
    report.sessions_erased = totals.sessions
    report.files_deleted = totals.files
    report_problems(JOB_NAME, "retention_error", totals.problems)
    report.errors = len(totals.problems)


def _count(query: Any) -> int:
    return int(db.session.scalar(select(func.count()).select_from(query.subquery())) or 0)
