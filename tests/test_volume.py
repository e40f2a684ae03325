"""A small year of data (bench/volume.py's fill): the jobs finish and the hot path never scans.

bench/volume.py measures the app on tens of millions of rows; this is its CI version, on about
two million. Every job runs at the default settings (statement and lock timeouts included) and
must finish without an error, and every statement of an ordinary visit is planned against the
filled tables: none may read a large table sequentially.
"""

from __future__ import annotations

import re
import subprocess
import sys
from contextlib import closing
from typing import Any

import psycopg2
from sqlalchemy import event
from sqlalchemy.engine import make_url

from app import jobs
from app.extensions import db
from app.services import chat_sessions, security_monitor
from app.services.audit import AuditContext
from bench.volume import VISIT_EVENTS, ordinary_visit, visit_settings
from tests.conftest import build_app, smtp_server
from tests.servers import PROJECT_ROOT

VISITS = 80_000
ABANDONED = 2_000
# A sequential scan of a table this small is the planner's right choice, not a missing index.
SMALL_TABLE_ROWS = 10_000


def test_at_volume_every_job_finishes_and_no_visit_statement_scans_a_large_table(
    fresh_database: str,
) -> None:
    dsn = make_url(fresh_database).render_as_string(hide_password=False)
    with smtp_server() as (port, inbox):
        app = build_app(fresh_database, **visit_settings(port))
        # In a process of its own: the app bounds every psycopg2 wait in this one (app.db_deadline).
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"from bench.volume import fill; fill({dsn!r}, "
                f"visits={VISITS}, audit_per_visit={len(VISIT_EVENTS)}, abandoned={ABANDONED})",
            ],
            cwd=PROJECT_ROOT,
            check=True,
        )
        statements: list[tuple[str, Any]] = []

        def capture(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
            if not executemany:
                statements.append((statement, parameters))

        with app.app_context():
            # Every engine: the commonest requests run on the autocommit one.
            for engine in db.engines.values():
                event.listen(engine, "before_cursor_execute", capture)
        client = app.test_client()
        ordinary_visit(client, inbox)
        with app.app_context():
            session_uuid = chat_sessions.parse_uuid4(
                client.post("/api/v1/generate-uuid").json["uuid"]
            )
            assert session_uuid is not None
            security_monitor.watch_failed_codes(AuditContext(client_ip="10.1.1.0"), session_uuid)
            for engine in db.engines.values():
                event.remove(engine, "before_cursor_execute", capture)
            # Below COUNT_UP_TO sessions the gauge counts, by design (test_observability.py has
            # the estimate above it); here it must simply answer.
            assert sum(chat_sessions.count_by_state().values()) > ABANDONED

            purge = jobs.run_abandoned_purge()
            retention = jobs.run_retention()
            sweep = jobs.run_orphan_sweep()

    assert purge is not None
    assert (purge.sessions_purged, purge.errors) == (ABANDONED, 0)
    assert retention is not None
    # The fill's year spans 366 days and a bit: its two oldest days are past the 365-day default.
    assert (retention.errors, retention.audit_days_dropped) == (0, 2)
    assert sweep is not None
    assert sweep.errors == 0
    # The visit ran, its resumes (one statement each, on the autocommit engine) included.
    assert len(statements) > 60
    assert any(statement.startswith("WITH touched AS") for statement, _ in statements)
    assert scans_of_large_tables(dsn, statements) == []


def scans_of_large_tables(dsn: str, statements: list[tuple[str, Any]]) -> list[str]:
    """Each statement whose plan reads a table of more than SMALL_TABLE_ROWS rows sequentially."""
    found = []
    with closing(psycopg2.connect(dsn)) as conn:
        cursor = conn.cursor()
        cursor.execute("SELECT relname, reltuples FROM pg_class WHERE relkind = 'r'")
        rows = dict(cursor.fetchall())
        for statement, parameters in statements:
            if not re.match(r"\s*(SELECT|UPDATE|DELETE|INSERT|WITH)\b", statement):
                continue
            cursor.execute("EXPLAIN " + statement, parameters)
            plan = "\n".join(line for (line,) in cursor.fetchall())
            for table in re.findall(r"Seq Scan on (\w+)", plan):
                if rows.get(table, 0) > SMALL_TABLE_ROWS:
                    found.append(f"{table}: {statement[:200]}")
        conn.rollback()
    return found
