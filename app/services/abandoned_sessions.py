"""Purging pending sessions nobody has touched for ABANDONED_SESSION_MINUTES."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, select

from app.extensions import db
from app.models import ChatSession, EmailSend, RetirementReason, SessionState
from app.services import admin_alerts, audit
from app.services.audit import SYSTEM
from app.services.chat_sessions import TOUCH_EVERY
from app.services.erasure import erase_all, report_problems
from app.services.pruning import Steps, delete_in_batches
from app.storage import current_storage, session_objects

JOB_NAME = "abandoned_sessions"
BATCH = 200
# Send records only feed the per-day address cap; older ones are dead weight.
SEND_HISTORY = timedelta(days=1)


@dataclass
class PurgeReport:
    """What one purge saw and did."""

    dry_run: bool
    sessions_purged: int = 0
    files_deleted: int = 0
    send_records_pruned: int = 0
    errors: int = 0
    duration_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def purge_abandoned(*, now: datetime, idle: timedelta, dry_run: bool) -> PurgeReport:
    """Erase pending sessions idle since before ``now - idle``: files, row, UUID retired.

    ``last_seen_at`` may lag the last request by up to TOUCH_EVERY, so that much more idle
    time is asked for: a session seen within ``idle`` is never purged.
    """
    report = PurgeReport(dry_run=dry_run)
    started = time.perf_counter()
    eligible = _abandoned(now - idle - TOUCH_EVERY)
    if dry_run:
        _count(eligible, report)
        report.duration_seconds = round(time.perf_counter() - started, 3)
        return report
    # Each step on its own: send records are pruned even when storage holds up the sessions.
    steps = Steps(JOB_NAME)
    steps.run("sessions", lambda: _purge(eligible, report))
    steps.run("send records", lambda: _prune_send_history(report, now))
    report.errors += len(steps.failed)
    report.duration_seconds = round(time.perf_counter() - started, 3)
    audit.record("abandoned_purge_completed", SYSTEM, **report.as_dict())
    db.session.commit()
    for step, error in steps.failed.items():
        admin_alerts.report_job_error(JOB_NAME, f"{step} not pruned ({error})")
    return report


def _abandoned(cutoff: datetime) -> ColumnElement[bool]:
    return (ChatSession.state == SessionState.PENDING) & (ChatSession.last_seen_at < cutoff)


def _purge(eligible: ColumnElement[bool], report: PurgeReport) -> None:
    totals = erase_all(eligible, reason=RetirementReason.ABANDONED, batch_size=BATCH)
    report.sessions_purged = totals.sessions
    report.files_deleted = totals.files
    report_problems(JOB_NAME, "abandoned_purge_error", totals.problems)
    report.errors = len(totals.problems)


def _count(eligible: ColumnElement[bool], report: PurgeReport) -> None:
    storage = current_storage()
    for session_uuid in db.session.scalars(select(ChatSession.uuid).where(eligible)):
        report.sessions_purged += 1
        report.files_deleted += len(session_objects(storage, session_uuid))
    db.session.rollback()


def _prune_send_history(report: PurgeReport, now: datetime) -> None:
    old = EmailSend.sent_at < now - SEND_HISTORY
    report.send_records_pruned = delete_in_batches(EmailSend, old)
