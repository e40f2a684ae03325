"""Reachability of the service's dependencies."""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from app.extensions import db
from app.services import job_runs
from app.services.orphan_sweep import JOB_NAME as ORPHAN_SWEEP
from app.storage import StorageUnavailable, current_storage

log = logging.getLogger(__name__)


def check_dependencies() -> dict[str, str]:
    """``ok`` or ``unavailable`` for each dependency."""
    return {"database": _check_database(), "storage": _check_storage()}


def last_orphan_sweep() -> datetime | None:
    """When the orphan sweep last completed anywhere in the deployment."""
    try:
        return job_runs.last_completed(ORPHAN_SWEEP)
    except SQLAlchemyError:
        return None
    finally:
        db.session.rollback()


def _check_storage() -> str:
    try:
        current_storage().check()
        return "ok"
    except StorageUnavailable:
        log.warning("readiness: storage unreachable", exc_info=True)
        return "unavailable"


def _check_database() -> str:
    try:
        db.session.execute(text("SELECT 1"))
        return "ok"
    except SQLAlchemyError:
        log.warning("readiness: database unreachable", exc_info=True)
        return "unavailable"
    finally:
        db.session.rollback()
