"""Audit rows by day on PostgreSQL, and every prune on its own, in batches, on both databases.

Each PostgreSQL test here has a database of its own: they make and drop the partitions of
days far from today.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import UTC, date, datetime, timedelta
from typing import cast

import psycopg2
import time_machine
from flask import Flask
from flask_migrate import downgrade, upgrade
from sqlalchemy import Table, insert, select, text
from sqlalchemy.engine import make_url

from app import jobs
from app.clock import utcnow
from app.extensions import db
from app.models import AdminNotice, AuditEvent, RetiredSessionUUID, RetirementReason
from app.services import audit_partitions
from app.services.pruning import delete_in_batches
from tests.conftest import build_app

NOW = datetime(2031, 3, 10, 12, 0, tzinfo=UTC)
RETENTION_DAYS = 30


def add_audit_rows(app: Flask, *moments: datetime) -> None:
    with app.app_context():
        db.session.execute(
            insert(AuditEvent),
            [{"occurred_at": moment, "event_type": "test", "details": {}} for moment in moments],
        )
        db.session.commit()


def rows_by_table(app: Flask) -> dict[datetime, str]:
    """Each audit row's time, and the partition that holds it."""
    with app.app_context():
        query = text("SELECT occurred_at, tableoid::regclass::text FROM audit_events")
        return {moment.astimezone(UTC): table for moment, table in db.session.execute(query)}


def days_with_partitions(app: Flask) -> list[date]:
    with app.app_context():
        return audit_partitions.existing_days()


def retention(app: Flask, moment: datetime) -> jobs.RetentionReport:
    with time_machine.travel(moment, tick=False), app.app_context():
        report = jobs.run_retention()
    assert report is not None
    return report


@contextmanager
def table_locked_elsewhere(database_url: str, table: str) -> Iterator[None]:
    dsn = make_url(database_url).render_as_string(hide_password=False)
    with closing(psycopg2.connect(dsn)) as holder:
        holder.cursor().execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        yield
        holder.rollback()


def test_the_migration_keeps_every_row_and_gives_each_day_a_partition(
    fresh_database: str,
) -> None:
    app = build_app(fresh_database)
    today = utcnow().date()
    with app.app_context():
        downgrade(revision="0008")
    old, recent, ahead = (utcnow() + timedelta(days=days) for days in (-20, -1, 40))
    add_audit_rows(app, old, recent, ahead)
    with app.app_context():
        before = db.session.execute(select(AuditEvent.id, AuditEvent.occurred_at)).all()
        db.session.commit()
        upgrade()
    add_audit_rows(app, utcnow())

    with app.app_context():
        after = db.session.execute(select(AuditEvent.id, AuditEvent.occurred_at)).all()
    assert set(before) < set(after)
    newest = max(after)
    assert newest.id > max(row.id for row in before), "ids go on from the old table's sequence"
    first = old.date()
    assert days_with_partitions(app) == [
        first + timedelta(days=n) for n in range((today - first).days + 8)
    ]
    held_by = rows_by_table(app)
    assert held_by[old] == audit_partitions.partition_name(old.date())
    assert held_by[ahead] == "audit_events_default"


def test_retention_drops_whole_days_and_deletes_the_rows_no_day_holds(
    fresh_database: str,
) -> None:
    app = build_app(fresh_database, AUDIT_RETENTION_DAYS=str(RETENTION_DAYS))
    cutoff = NOW - timedelta(days=RETENTION_DAYS)
    with time_machine.travel(datetime(2031, 2, 1, tzinfo=UTC), tick=False), app.app_context():
        assert audit_partitions.prepare_days(utcnow()) == 8  # 1 to 8 February
    in_an_old_day = datetime(2031, 2, 1, 10, tzinfo=UTC)
    before_the_cutoff_that_day = cutoff - timedelta(hours=6)
    after_the_cutoff = cutoff + timedelta(hours=6)
    undated_old = datetime(2031, 1, 1, tzinfo=UTC)
    undated_kept = NOW - timedelta(days=18)
    add_audit_rows(
        app, in_an_old_day, before_the_cutoff_that_day, after_the_cutoff, undated_old, undated_kept
    )
    past = [day for day in days_with_partitions(app) if day < cutoff.date()]

    report = retention(app, NOW)

    assert report.audit_days_dropped == len(past)  # 1 to 7 February, and this week's
    kept = rows_by_table(app)
    assert in_an_old_day not in kept
    assert undated_old not in kept
    # The day the cutoff falls in goes whole, the next day: a row leaves at most a day late.
    assert {before_the_cutoff_that_day, after_the_cutoff, undated_kept} <= set(kept)
    assert kept[undated_kept] == "audit_events_default"
    assert days_with_partitions(app)[0] == cutoff.date()

    report = retention(app, NOW + timedelta(days=1))

    assert report.audit_days_dropped == 1
    assert {before_the_cutoff_that_day, after_the_cutoff} & set(rows_by_table(app)) == set()


def test_a_row_of_a_day_without_a_partition_moves_into_it_when_the_day_is_made(
    fresh_database: str,
) -> None:
    app = build_app(fresh_database)
    restored = datetime(2001, 5, 3, 8, tzinfo=UTC)
    early = datetime(2032, 5, 3, 8, tzinfo=UTC)
    add_audit_rows(app, restored, early)
    assert rows_by_table(app) == dict.fromkeys((restored, early), "audit_events_default")

    with time_machine.travel(datetime(2032, 5, 1, tzinfo=UTC), tick=False), app.app_context():
        audit_partitions.prepare_days(utcnow())

    held_by = rows_by_table(app)
    assert held_by[early] == "audit_events_p20320503"
    assert held_by[restored] == "audit_events_default"


def test_a_prune_that_cannot_get_its_lock_leaves_the_others_to_run(fresh_database: str) -> None:
    app = build_app(
        fresh_database, AUDIT_RETENTION_DAYS=str(RETENTION_DAYS), DATABASE_LOCK_TIMEOUT_MS="500"
    )
    long_ago = NOW - timedelta(days=400)
    add_audit_rows(app, long_ago)
    with app.app_context():
        db.session.add(
            RetiredSessionUUID(
                uuid=uuid.uuid4(), retired_at=long_ago, reason=RetirementReason.DELETED
            )
        )
        db.session.add(AdminNotice(signature_hash="x" * 64, last_sent_at=long_ago))
        db.session.commit()

    with table_locked_elsewhere(fresh_database, "admin_notices"):
        report = retention(app, NOW)

    assert report.errors == 1
    assert (report.tombstones_deleted, long_ago in rows_by_table(app)) == (1, False)
    with app.app_context():
        assert db.session.get(AdminNotice, "x" * 64) is not None


def test_tombstones_outlive_every_audit_row_of_their_uuid_then_go(database_url: str) -> None:
    app = build_app(database_url, AUDIT_RETENTION_DAYS=str(RETENTION_DAYS))
    oldest_kept = NOW - timedelta(days=RETENTION_DAYS + 1)
    with app.app_context():
        for retired_at in (oldest_kept - timedelta(seconds=1), oldest_kept):
            db.session.add(
                RetiredSessionUUID(
                    uuid=uuid.uuid4(), retired_at=retired_at, reason=RetirementReason.ABANDONED
                )
            )
        db.session.commit()

    report = retention(app, NOW)

    assert report.tombstones_deleted == 1
    with app.app_context():
        assert db.session.scalars(select(RetiredSessionUUID.retired_at)).all() == [oldest_kept]


def test_rows_are_deleted_a_batch_at_a_time_until_none_is_left(database_url: str) -> None:
    app = build_app(database_url)
    add_audit_rows(app, *(NOW - timedelta(days=n) for n in range(5)))
    with app.app_context():
        table = cast(Table, AuditEvent.__table__)
        deleted = delete_in_batches(table, AuditEvent.occurred_at < NOW, batch=2)
        left = db.session.scalars(select(AuditEvent.occurred_at)).all()

    assert (deleted, [moment.astimezone(UTC) for moment in left]) == (4, [NOW])
