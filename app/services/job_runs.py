"""At most one run of a background job at a time, and one per interval, across the deployment.

Every gunicorn worker on every host runs its own scheduler; they agree through the database.
On PostgreSQL a session-level advisory lock, held on a dedicated connection for the length of
the run, excludes concurrent runs; the server drops it if the process dies. SQLite has no
advisory locks, so a lease in the ``job_runs`` row stands in: a killed run blocks the job until
its lease expires. Either way the row records the last completed run, and a run that finds the
last one started less than an interval ago stands down.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, or_, select, text, update

from app.clock import utcnow
from app.extensions import db, has_advisory_locks, lock_key, upsert
from app.models import JobRun

# Longest a SQLite lease may outlive a killed run; far above any real run time.
SQLITE_LEASE = timedelta(hours=1)


@dataclass
class RunSlot:
    """The right to run a job now; the job fills in its summary."""

    job_name: str
    started_at: datetime
    summary: dict[str, Any] = field(default_factory=dict)


@contextmanager
def exclusive_run(
    job_name: str, *, now: datetime | None = None, interval: timedelta | None = None
) -> Iterator[RunSlot | None]:
    """Yield a RunSlot if this process may run ``job_name`` now, else None.

    With ``interval``, a run is skipped when the last completed one started less than
    ``interval`` ago (minus a little slack for scheduler jitter). A run that raises is
    not recorded as completed.
    """
    started_at = now or utcnow()
    _ensure_row(job_name)
    with _lock(job_name, started_at) as locked:
        if not locked or (interval is not None and not _is_due(job_name, started_at, interval)):
            yield None
            return
        slot = RunSlot(job_name, started_at)
        yield slot
        db.session.execute(
            update(JobRun)
            .where(JobRun.job_name == job_name)
            .values(
                last_run_started_at=slot.started_at,
                last_run_completed_at=utcnow(),
                last_run_summary=slot.summary,
            )
        )
        db.session.commit()


def last_completed(job_name: str) -> datetime | None:
    """When the last run of ``job_name`` completed, if ever."""
    return db.session.scalar(
        select(JobRun.last_run_completed_at).where(JobRun.job_name == job_name)
    )


def _is_due(job_name: str, now: datetime, interval: timedelta) -> bool:
    last_start = db.session.scalar(
        select(JobRun.last_run_started_at).where(JobRun.job_name == job_name)
    )
    db.session.commit()
    slack = min(interval / 10, timedelta(minutes=1))
    return last_start is None or now - last_start >= interval - slack


def _ensure_row(job_name: str) -> None:
    db.session.execute(
        upsert(JobRun).values(job_name=job_name).on_conflict_do_nothing(index_elements=["job_name"])
    )
    db.session.commit()


@contextmanager
def _lock(job_name: str, now: datetime) -> Iterator[bool]:
    if has_advisory_locks():
        with db.engine.connect() as connection:
            yield from _advisory_lock(connection, job_name)
    else:
        yield from _lease(job_name, now)


def _advisory_lock(connection: Connection, job_name: str) -> Iterator[bool]:
    key = lock_key(job_name)
    locked = bool(connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}))
    connection.commit()
    try:
        yield locked
    finally:
        if locked:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            connection.commit()


def _lease(job_name: str, now: datetime) -> Iterator[bool]:
    claimed = db.session.execute(
        update(JobRun)
        .where(JobRun.job_name == job_name)
        .where(or_(JobRun.lease_until.is_(None), JobRun.lease_until < now))
        .values(lease_until=now + SQLITE_LEASE)
        .returning(JobRun.job_name)
    ).first()
    db.session.commit()
    try:
        yield claimed is not None
    finally:
        if claimed is not None:
            db.session.rollback()  # whatever the run left half-done is not ours to commit
            db.session.execute(
                update(JobRun).where(JobRun.job_name == job_name).values(lease_until=None)
            )
            db.session.commit()
