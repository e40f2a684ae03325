"""The in-process scheduler: every worker runs one; the database lets one run per interval win."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC

from apscheduler.schedulers.background import BackgroundScheduler
from flask import Flask

from app import jobs
from app.extensions import db
from app.services import admin_alerts

log = logging.getLogger(__name__)


def init_app(app: Flask) -> None:
    """Start the scheduler unless SCHEDULER_ENABLED is off.

    Jobs first fire one interval after start-up, so short-lived processes (``flask db
    upgrade`` and other CLI commands) never start one.
    """
    if not app.config["SCHEDULER_ENABLED"]:
        return
    # A daemon thread: it ends with the process, and every job is safe to cut short.
    scheduler = BackgroundScheduler(daemon=True, timezone=UTC)
    schedule = [
        ("orphan_sweep", "ORPHAN_SWEEP_INTERVAL_MINUTES", jobs.run_orphan_sweep),
        ("abandoned_sessions", "ABANDONED_PURGE_INTERVAL_MINUTES", jobs.run_abandoned_purge),
        ("retention", "RETENTION_INTERVAL_MINUTES", jobs.run_retention),
    ]
    for name, interval_setting, job in schedule:
        scheduler.add_job(
            _in_app_context(app, name, job),
            "interval",
            minutes=app.config[interval_setting],
            id=name,
            # apscheduler names the job in its "Running job" lines.
            name=name,
            max_instances=1,
            coalesce=True,
        )
    scheduler.start()
    app.extensions["scheduler"] = scheduler


def _in_app_context(
    app: Flask, name: str, job: Callable[..., jobs.Report | None]
) -> Callable[[], None]:
    def run() -> None:
        with app.app_context():
            try:
                report = job(scheduled=True)
            except Exception as exc:
                db.session.rollback()
                log.exception("scheduled job failed", extra={"job": name})
                admin_alerts.report_exception(exc)
                return
            if report is not None:
                log.info("scheduled job finished", extra={"job": name, "summary": report.as_dict()})

    return run
