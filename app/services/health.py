"""Reachability of the service's dependencies."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime

from flask import current_app
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from app import deadline
from app.extensions import db
from app.services import admin_alerts, job_runs
from app.services.orphan_sweep import JOB_NAME as ORPHAN_SWEEP
from app.storage import StorageUnavailable, current_storage

log = logging.getLogger(__name__)

# What each storage failure means to the operator who reads /ready.
STORAGE_REASONS = {
    "unreachable": "unreachable: the storage endpoint did not answer in time",
    "missing_bucket": (
        "missing_bucket: the bucket does not exist; create it with "
        "`flask --app wsgi storage create` or your own tooling"
    ),
    "access_denied": "access_denied: the credentials may not use the bucket or directory",
    "failed": "failed: the storage backend refused the check",
}
DATABASE_UNREACHABLE = "unreachable: the database did not answer"


@dataclass
class Readiness:
    """Each dependency's state, why the failing ones fail, and the last orphan sweep."""

    checks: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    last_orphan_sweep_at: datetime | None = None

    @property
    def ready(self) -> bool:
        return all(state == "ok" for state in self.checks.values())


@dataclass
class _Verdict:
    result: Readiness
    at: float


def readiness() -> Readiness:
    """The readiness verdict, checked at most once per READY_CACHE_SECONDS in this process.

    Probes come often and from anywhere; each check costs a query and a storage call, and a
    hung dependency holds a worker for the check's bound. A recent verdict answers instead.
    """
    config = current_app.config
    cached: _Verdict | None = current_app.extensions.get("readiness")
    now = time.monotonic()
    if cached is not None and now - cached.at < config["READY_CACHE_SECONDS"]:
        return cached.result
    with deadline.until(now + config["READY_TIMEOUT_SECONDS"]):
        result = _check_all()
    current_app.extensions["readiness"] = _Verdict(result, time.monotonic())
    return result


def _check_all() -> Readiness:
    """Check every dependency; a failing one is logged and notified to the admin."""
    result = Readiness()
    for name, check in (("database", _check_database), ("storage", _check_storage)):
        reason = check()
        result.checks[name] = "ok" if reason is None else "unavailable"
        if reason is not None:
            result.reasons[name] = reason
    result.last_orphan_sweep_at = _last_orphan_sweep()
    if not result.ready:
        admin_alerts.notify(
            "Readiness check failing",
            signature="readiness:" + ",".join(sorted(result.reasons)),
            facts={f"{name.capitalize()}": reason for name, reason in result.reasons.items()},
        )
    return result


def _last_orphan_sweep() -> datetime | None:
    """When the orphan sweep last completed anywhere in the deployment."""
    try:
        return job_runs.last_completed(ORPHAN_SWEEP)
    except SQLAlchemyError:
        return None
    finally:
        db.session.rollback()


def _check_storage() -> str | None:
    try:
        current_storage().check()
        return None
    except StorageUnavailable as exc:
        log.warning("readiness: storage unavailable", extra={"reason": exc.reason})
        return STORAGE_REASONS.get(exc.reason, STORAGE_REASONS["failed"])


def _check_database() -> str | None:
    try:
        db.session.execute(text("SELECT 1"))
        return None
    except SQLAlchemyError:
        log.warning("readiness: database unreachable", exc_info=True)
        return DATABASE_UNREACHABLE
    finally:
        db.session.rollback()
