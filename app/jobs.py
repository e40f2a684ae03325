"""Background jobs as thin shells around service functions, shared by the scheduler and the CLI."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from flask import current_app

from app import metrics
from app.clock import utcnow
from app.services.abandoned_sessions import JOB_NAME as ABANDONED_PURGE
from app.services.abandoned_sessions import PurgeReport, purge_abandoned
from app.services.job_runs import exclusive_run
from app.services.orphan_sweep import JOB_NAME as ORPHAN_SWEEP
from app.services.orphan_sweep import SweepReport, sweep_orphans
from app.services.retention import JOB_NAME as RETENTION
from app.services.retention import RetentionReport, apply_retention
from app.storage import current_storage

# Every job's name, as its runs are recorded and counted.
JOB_NAMES = (ORPHAN_SWEEP, ABANDONED_PURGE, RETENTION)


class Report(Protocol):
    def as_dict(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=Report)


def run_orphan_sweep(*, dry_run: bool = False, scheduled: bool = False) -> SweepReport | None:
    """Sweep orphaned upload folders; None if another run has the job or (scheduled) just ran."""
    min_age = timedelta(minutes=current_app.config["ORPHAN_MIN_AGE_MINUTES"])
    return _run(
        ORPHAN_SWEEP,
        "ORPHAN_SWEEP_INTERVAL_MINUTES",
        lambda now: sweep_orphans(current_storage(), now=now, min_age=min_age, dry_run=dry_run),
        dry_run=dry_run,
        scheduled=scheduled,
    )


def run_abandoned_purge(*, dry_run: bool = False, scheduled: bool = False) -> PurgeReport | None:
    """Purge abandoned pending sessions; None if another run has the job or (scheduled) just ran."""
    idle = timedelta(minutes=current_app.config["ABANDONED_SESSION_MINUTES"])
    return _run(
        ABANDONED_PURGE,
        "ABANDONED_PURGE_INTERVAL_MINUTES",
        lambda now: purge_abandoned(now=now, idle=idle, dry_run=dry_run),
        dry_run=dry_run,
        scheduled=scheduled,
    )


def run_retention(*, dry_run: bool = False, scheduled: bool = False) -> RetentionReport | None:
    """Apply data and audit retention; None if another run has the job or (scheduled) just ran."""
    config = current_app.config
    data_retention = timedelta(days=config["DATA_RETENTION_DAYS"])
    audit_retention = timedelta(days=config["AUDIT_RETENTION_DAYS"])
    return _run(
        RETENTION,
        "RETENTION_INTERVAL_MINUTES",
        lambda now: apply_retention(
            now=now,
            data_retention=data_retention,
            audit_retention=audit_retention,
            dry_run=dry_run,
        ),
        dry_run=dry_run,
        scheduled=scheduled,
    )


def _run(
    job_name: str,
    interval_setting: str,
    work: Callable[[datetime], R],
    *,
    dry_run: bool,
    scheduled: bool,
) -> R | None:
    now = utcnow()
    if dry_run:
        # A dry run changes nothing, so it needs no lock and leaves no record.
        return work(now)
    interval = timedelta(minutes=current_app.config[interval_setting]) if scheduled else None
    started = time.monotonic()
    try:
        with exclusive_run(job_name, now=now, interval=interval) as slot:
            if slot is None:
                metrics.observe_job(job_name, "skipped", None, {})
                return None
            report = work(now)
            slot.summary = report.as_dict()
    except Exception:
        # Taking the job, the work or recording the run: a run that did not complete failed.
        metrics.observe_job(job_name, "failed", time.monotonic() - started, {})
        raise
    metrics.observe_job(job_name, "completed", time.monotonic() - started, slot.summary)
    return report
