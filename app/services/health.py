"""Reachability of the service's dependencies."""

from __future__ import annotations

import logging

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from app.extensions import db

log = logging.getLogger(__name__)


def check_dependencies() -> dict[str, str]:
    """``ok`` or ``unavailable`` for each dependency."""
    return {"database": _check_database()}


def _check_database() -> str:
    try:
        db.session.execute(text("SELECT 1"))
        return "ok"
    except SQLAlchemyError:
        log.warning("readiness: database unreachable", exc_info=True)
        return "unavailable"
    finally:
        db.session.rollback()
