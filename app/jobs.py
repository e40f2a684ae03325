"""Background jobs as thin shells around service functions, shared by the scheduler and the CLI."""

from __future__ import annotations

from datetime import timedelta

from flask import current_app

from app.clock import utcnow
from app.services.job_runs import exclusive_run
from app.services.orphan_sweep import JOB_NAME as ORPHAN_SWEEP
from app.services.orphan_sweep import SweepReport, sweep_orphans
from app.storage import current_storage


def run_orphan_sweep(*, dry_run: bool = False, scheduled: bool = False) -> SweepReport | None:
    """Sweep orphaned upload folders; None if another run has the job or (scheduled) just ran."""
    config = current_app.config
    now = utcnow()
    min_age = timedelta(minutes=config["ORPHAN_MIN_AGE_MINUTES"])
    if dry_run:
        # A dry run changes nothing, so it needs no lock and leaves no record.
        return sweep_orphans(current_storage(), now=now, min_age=min_age, dry_run=True)
    interval = timedelta(minutes=config["ORPHAN_SWEEP_INTERVAL_MINUTES"]) if scheduled else None
    with exclusive_run(ORPHAN_SWEEP, now=now, interval=interval) as slot:
        if slot is None:
            return None
        report = sweep_orphans(current_storage(), now=now, min_age=min_age, dry_run=False)
        slot.summary = report.as_dict()
        return report
