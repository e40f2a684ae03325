"""The audit trail's daily partitions on PostgreSQL: made ahead, dropped once past retention.

Migration 0009 partitions ``audit_events`` by UTC day, with a default partition that takes rows
of any day without one of its own (a restore of old rows, a clock far ahead). Retiring a day is
then a catalogue change (DETACH and DROP) instead of deleting and vacuuming millions of rows.
Each step runs in its own short transaction, so a lock not granted in time costs one step, and
the next run tries again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import BigInteger, Column, MetaData, Table, func, select, text

from app.extensions import db, execute
from app.models import AUDIT_DEFAULT_PARTITION, AUDIT_PARTITION_PREFIX, UTCDateTime
from app.services.pruning import delete_in_batches

# Partitions exist this many days ahead, so a missed run or two never sends today's rows to the
# default partition.
DAYS_AHEAD = 7
# DDL on a partition briefly takes a lock every insert into audit_events waits behind; waiting
# longer than this for it is given up (and tried again on the next run), not queued for.
DDL_LOCK_TIMEOUT = "2s"


@dataclass(frozen=True)
class DroppedDays:
    """What retiring old partitions removed: how many days, and about how many rows."""

    partitions: int
    estimated_rows: int


def partition_name(day: date) -> str:
    """The partition holding ``day``'s rows."""
    return f"{AUDIT_PARTITION_PREFIX}{day:%Y%m%d}"


def existing_days() -> list[date]:
    """The days that have a partition of their own, oldest first."""
    names = execute(_PARTITIONS, {"prefix": AUDIT_PARTITION_PREFIX + "%"}).scalars()
    days = sorted(
        datetime.strptime(name.removeprefix(AUDIT_PARTITION_PREFIX), "%Y%m%d").date()
        for name in names
    )
    db.session.commit()
    return days


def prepare_days(now: datetime) -> int:
    """Make the partitions of today and the next DAYS_AHEAD days that are missing; how many.

    Rows the default partition holds for such a day move into it, in the same transaction.
    """
    today = now.astimezone(UTC).date()
    have = set(existing_days())
    made = 0
    for offset in range(DAYS_AHEAD + 1):
        day = today + timedelta(days=offset)
        if day not in have:
            _make_day(day)
            made += 1
    return made


def day_start(moment: datetime) -> datetime:
    """The start of ``moment``'s UTC day: rows before it lie in older days' partitions."""
    return datetime.combine(moment.astimezone(UTC).date(), time(), UTC)


def days_before(cutoff: datetime) -> list[date]:
    """The days with a partition whose whole day is older than ``cutoff``, oldest first."""
    first_kept = cutoff.astimezone(UTC).date()
    return [day for day in existing_days() if day < first_kept]


def estimated_rows(day: date) -> int:
    """About how many rows ``day``'s partition holds, from the statistics autovacuum keeps.

    Counting them would read the whole day.
    """
    estimate = execute(_ROW_ESTIMATE, {"name": partition_name(day)}).scalar()
    db.session.commit()
    return max(0, int(estimate or 0))


def drop_days_before(cutoff: datetime) -> DroppedDays:
    """Drop every partition whose whole day is older than ``cutoff``, a day per transaction."""
    dropped, rows = 0, 0
    for day in days_before(cutoff):
        rows += estimated_rows(day)
        name = partition_name(day)
        _ddl_lock_timeout()
        execute(text(f'ALTER TABLE audit_events DETACH PARTITION "{name}"'))
        execute(text(f'DROP TABLE "{name}"'))
        db.session.commit()
        dropped += 1
    return DroppedDays(dropped, rows)


def delete_undated_rows_before(cutoff: datetime) -> int:
    """Delete, in batches, the rows older than ``cutoff`` that no day's partition holds."""
    return delete_in_batches(_DEFAULT, _DEFAULT.c.occurred_at < cutoff)


def count_undated_rows_before(cutoff: datetime) -> int:
    """How many rows older than ``cutoff`` no day's partition holds."""
    query = select(func.count()).select_from(_DEFAULT).where(_DEFAULT.c.occurred_at < cutoff)
    return int(db.session.scalar(query) or 0)


def _make_day(day: date) -> None:
    name = partition_name(day)
    start = datetime.combine(day, time(), UTC)
    bounds = {"start": start, "end": start + timedelta(days=1)}
    _ddl_lock_timeout()
    # Made apart and attached: attaching locks only the default partition (which it checks for
    # rows of the new day), not audit_events, whose inserts go on meanwhile.
    execute(text(f'CREATE TABLE "{name}" (LIKE audit_events INCLUDING DEFAULTS)'))
    execute(text(_MOVE_FROM_DEFAULT.format(source=AUDIT_DEFAULT_PARTITION, target=name)), bounds)
    execute(
        text(
            f'ALTER TABLE audit_events ATTACH PARTITION "{name}" FOR VALUES FROM (:start) TO (:end)'
        ),
        bounds,
    )
    db.session.commit()


def _ddl_lock_timeout() -> None:
    execute(text(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'"))


# The default partition, as much of it as pruning needs.
_DEFAULT = Table(
    AUDIT_DEFAULT_PARTITION,
    MetaData(),
    Column("id", BigInteger, primary_key=True),
    Column("occurred_at", UTCDateTime(), primary_key=True),
)
# Table names are made from dates here, never from input.
_MOVE_FROM_DEFAULT = (
    'WITH moved AS (DELETE FROM "{source}" WHERE occurred_at >= :start AND occurred_at < :end'
    ' RETURNING *) INSERT INTO "{target}" SELECT * FROM moved'
)
_PARTITIONS = text(
    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
    " WHERE i.inhparent = CAST('audit_events' AS regclass) AND c.relname LIKE :prefix"
)
_ROW_ESTIMATE = text("SELECT reltuples FROM pg_class WHERE oid = CAST(:name AS regclass)")
