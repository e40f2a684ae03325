"""Retention: completed sessions, audit rows and tombstones are kept only for their set time."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, select

from app.extensions import db, on_postgresql
from app.models import (
    AuditEvent,
    ChatSession,
    RetiredSessionUUID,
    RetirementReason,
    SessionState,
)
from app.services import admin_alerts, audit, audit_partitions
from app.services.audit import SYSTEM
from app.services.erasure import erase_all, report_problems
from app.services.pruning import Steps, delete_in_batches

JOB_NAME = "retention"
BATCH = 200
# Audit rows are retired a whole day at a time; a tombstone outlives every row naming its UUID.
TOMBSTONE_MARGIN = timedelta(days=1)


@dataclass
class RetentionReport:
    """What one retention run erased, and how many of its steps failed."""

    dry_run: bool
    sessions_erased: int = 0
    files_deleted: int = 0
    audit_rows_deleted: int = 0
    audit_days_dropped: int = 0
    tombstones_deleted: int = 0
    errors: int = 0
    duration_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def apply_retention(
    *, now: datetime, data_retention: timedelta, audit_retention: timedelta, dry_run: bool
) -> RetentionReport:
    """Erase verified sessions idle past retention, then audit rows and tombstones past theirs.

    Each kind of row is pruned on its own, in batches: one that fails (a lock not granted, a
    timeout) is reported and leaves the others to go ahead. On PostgreSQL audit rows go a day
    (a partition) at a time, so a row leaves at most a day after its retention ends; the days
    ahead are prepared in the same run.
    """
    report = RetentionReport(dry_run=dry_run)
    started = time.perf_counter()
    expired = (ChatSession.state == SessionState.VERIFIED) & (
        ChatSession.last_seen_at < now - data_retention
    )
    audit_cutoff = now - audit_retention
    old_tombstones = RetiredSessionUUID.retired_at < audit_cutoff - TOMBSTONE_MARGIN
    if dry_run:
        report.sessions_erased = _count(select(ChatSession.uuid).where(expired))
        _count_old_audit(audit_cutoff, report)
        report.tombstones_deleted = _count(select(RetiredSessionUUID.uuid).where(old_tombstones))
        db.session.rollback()
        report.duration_seconds = round(time.perf_counter() - started, 3)
        return report

    steps = Steps(JOB_NAME)
    steps.run("sessions", lambda: _erase_expired(expired, report))
    steps.run("audit rows", lambda: _prune_audit(audit_cutoff, report))
    if on_postgresql():
        steps.run("audit days ahead", lambda: audit_partitions.prepare_days(now))
    steps.run("tombstones", lambda: _prune_tombstones(old_tombstones, report))
    steps.run("admin notices", lambda: admin_alerts.forget_old_notices(now))
    report.errors += len(steps.failed)
    report.duration_seconds = round(time.perf_counter() - started, 3)
    audit.record("retention_completed", SYSTEM, **report.as_dict())
    db.session.commit()
    for step, error in steps.failed.items():
        admin_alerts.report_job_error(JOB_NAME, f"{step} not pruned ({error})")
    return report


def _erase_expired(expired: ColumnElement[bool], report: RetentionReport) -> None:
    totals = erase_all(expired, reason=RetirementReason.EXPIRED, batch_size=BATCH)
    report.sessions_erased = totals.sessions
    report.files_deleted = totals.files
    report_problems(JOB_NAME, "retention_error", totals.problems)
    report.errors = len(totals.problems)


def _prune_audit(cutoff: datetime, report: RetentionReport) -> None:
    if not on_postgresql():
        report.audit_rows_deleted = delete_in_batches(AuditEvent, AuditEvent.occurred_at < cutoff)
        return
    # Whole days go as partitions; the rows of the day the cutoff falls in go with theirs the
    # next day. Rows of days without a partition (restored ones) go to the second.
    dropped = audit_partitions.drop_days_before(cutoff)
    report.audit_days_dropped = dropped.partitions
    report.audit_rows_deleted = dropped.estimated_rows
    report.audit_rows_deleted += audit_partitions.delete_undated_rows_before(cutoff)


def _count_old_audit(cutoff: datetime, report: RetentionReport) -> None:
    if not on_postgresql():
        old = select(AuditEvent.id).where(AuditEvent.occurred_at < cutoff)
        report.audit_rows_deleted = _count(old)
        return
    days = audit_partitions.days_before(cutoff)
    report.audit_days_dropped = len(days)
    report.audit_rows_deleted = sum(audit_partitions.estimated_rows(day) for day in days)
    report.audit_rows_deleted += audit_partitions.count_undated_rows_before(cutoff)


def _prune_tombstones(old: ColumnElement[bool], report: RetentionReport) -> None:
    report.tombstones_deleted = delete_in_batches(RetiredSessionUUID, old)


def _count(query: Any) -> int:
    return int(db.session.scalar(select(func.count()).select_from(query.subquery())) or 0)
