"""The app on a year of data: every job and the hot path on PostgreSQL filled with generate_series.

A scratch database gets the app's migrations, then a year of visits made in SQL: each visit a
session (still live if pending from the last day or verified within the data retention, else
ended and left as a tombstone) and its audit rows, spread over 366 days in daily partitions as
the retention job would have made them, plus a backlog of abandoned pending sessions. Then each
item runs against it and the script prints, per item: statements, rows read (tuples returned by
scans, from PostgreSQL's statistics), sequential scans of the large tables, WAL bytes and time.

    python bench/volume.py [--visits 2200000] [--audit-per-visit 23] [--abandoned 20000]
                           [--visit-samples 10]

Needs PostgreSQL at BENCH_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
from sqlalchemy import event

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.session_throughput import migrate, scratch_database  # noqa: E402

# Tables whose sequential scan on the hot path or in a job would grow with the data.
LARGE_TABLES = ("chat_sessions", "retired_session_uuids", "audit_events", "consent_events")

# One visit's audit rows in the order they happen (the frontend's call pattern, CONTRACT.md
# section 0): mostly validations, three uploads, a removal, a re-upload, an e-mail code.
VISIT_EVENTS = (
    ["uuid_generated", "uuid_validated", "uuid_validated", "uuid_validated", "consent_granted"]
    + ["uuid_validated", "uuid_validated", "file_uploaded"] * 3
    + ["uuid_validated", "uuid_validated", "file_deleted", "uuid_validated", "file_uploaded"]
    + ["email_code_sent", "verification_code_rejected", "email_verified", "uuid_validated"]
)

_VISITS = """
    SELECT g, md5('visit-' || g)::uuid AS id,
           now() - (g::float8 / %(visits)s) * interval '366 days' AS at,
           g %% 10 < 3 AS verified
    FROM generate_series(%(first)s, %(last)s) AS g
"""
_LIVE = "(v.at > now() - interval '1 day' OR (v.verified AND v.at > now() - interval '180 days'))"


def fill(
    dsn: str, *, visits: int, audit_per_visit: int, abandoned: int, chunk: int = 100_000
) -> None:
    """Fill the migrated database at ``dsn`` with a year of ``visits`` visits."""
    with closing(psycopg2.connect(dsn)) as conn:
        conn.autocommit = True
        cursor = conn.cursor()
        cursor.execute(_PAST_DAYS)
        for first in range(1, visits + 1, chunk):
            params = {"visits": visits, "first": first, "last": min(visits, first + chunk - 1)}
            visits_sql = _VISITS
            cursor.execute(_SESSIONS.format(visits=visits_sql, live=_LIVE), params)
            cursor.execute(_TOMBSTONES.format(visits=visits_sql, live=_LIVE), params)
            cursor.execute(_CONSENTS.format(visits=visits_sql, live=_LIVE), params)
            cursor.execute(
                _AUDIT.format(visits=visits_sql),
                {**params, "per_visit": audit_per_visit, "events": VISIT_EVENTS},
            )
        cursor.execute(_ABANDONED, {"abandoned": abandoned})
        cursor.execute("VACUUM ANALYZE")


_PAST_DAYS = """
DO $$
DECLARE day date := (now() AT TIME ZONE 'UTC')::date - 367;
BEGIN
    WHILE day < (now() AT TIME ZONE 'UTC')::date LOOP
        IF to_regclass('audit_events_p' || to_char(day, 'YYYYMMDD')) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF audit_events FOR VALUES FROM (%L) TO (%L)',
                'audit_events_p' || to_char(day, 'YYYYMMDD'),
                day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC');
        END IF;
        day := day + 1;
    END LOOP;
END $$
"""
_SESSIONS = """
INSERT INTO chat_sessions (uuid, state, created_at, last_seen_at, completed_at,
    consent_user_data, consent_at, name, email, email_verified, client_ip)
SELECT v.id, CASE WHEN v.verified THEN 'verified' ELSE 'pending' END, v.at,
    v.at + interval '3 minutes', CASE WHEN v.verified THEN v.at + interval '3 minutes' END,
    v.verified, CASE WHEN v.verified THEN v.at END,
    CASE WHEN v.verified THEN 'Visitor ' || v.g END,
    CASE WHEN v.verified THEN 'visitor' || v.g || '@example.org' END,
    v.verified, '10.' || (v.g %% 200) || '.' || (v.g %% 250) || '.0'
FROM ({visits}) AS v WHERE {live}
"""
_TOMBSTONES = """
INSERT INTO retired_session_uuids (uuid, retired_at, reason)
SELECT v.id, v.at + interval '1 day', CASE WHEN v.verified THEN 'expired' ELSE 'abandoned' END
FROM ({visits}) AS v WHERE NOT {live}
"""
_CONSENTS = """
INSERT INTO consent_events (session_uuid, granted, occurred_at, client_ip, wording_version)
SELECT v.id, true, v.at, '10.0.0.0', 'v1' FROM ({visits}) AS v WHERE v.verified AND {live}
"""
_AUDIT = """
INSERT INTO audit_events (occurred_at, event_type, session_uuid, client_ip, correlation_id, details)
SELECT v.at + k * interval '5 seconds',
       (%(events)s::text[])[1 + k %% cardinality(%(events)s::text[])],
       v.id, '10.' || (v.g %% 200) || '.' || (v.g %% 250) || '.0',
       md5(v.g || '-' || k), '{{}}'::jsonb
FROM ({visits}) AS v, generate_series(0, %(per_visit)s - 1) AS k
"""
_ABANDONED = """
INSERT INTO chat_sessions (uuid, state, created_at, last_seen_at, consent_user_data,
    email_verified, client_ip)
SELECT md5('abandoned-' || g)::uuid, 'pending', now() - interval '3 days',
    now() - interval '2 days' - g * interval '1 second', false, false, '10.9.9.0'
FROM generate_series(1, %(abandoned)s) AS g
"""


def visit_settings(smtp_port: int) -> dict[str, str]:
    """The app at its defaults, mail to ``smtp_port``, and limits one address can replay under."""
    from tests.test_rate_limits import LIMIT_VARIABLES

    unreachable = "100000/minute"
    return {
        "MAIL_BACKEND": "smtp",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_port),
        "SMTP_STARTTLS": "false",
        "SCHEDULER_ENABLED": "false",
        **dict.fromkeys(
            LIMIT_VARIABLES,
            unreachable,
        ),
    }


def ordinary_visit(client: Any, inbox: Any) -> None:
    """One ordinary visit as the frontend makes it (CONTRACT.md, section 0), 17 validations."""
    from tests.conftest import code_in

    headers = {"Accept": "application/json; version=v1"}

    def call(method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        answer = client.open(f"/api/v1/{path}", method=method, headers=headers, **kwargs)
        assert answer.status_code == 200, (path, answer.status_code, answer.get_data()[:200])
        return answer.get_json() if answer.is_json else {}

    session_uuid = call("POST", "generate-uuid")["uuid"]

    def validate(times: int = 1) -> None:
        for _ in range(times):
            assert call("POST", "validate-uuid", json={"uuid": session_uuid})["status"] == "success"

    def upload(name: str) -> None:
        validate(2)
        pdf = (io.BytesIO(b"%PDF-1.4\n%%EOF\n"), name)
        call("POST", "upload", data={"session_uuid": session_uuid, "file": pdf})

    def email(step: str, body: dict[str, str]) -> dict[str, Any]:
        return client.post(
            f"/api/v1/email-verification/{step}",
            json=body,
            headers={**headers, "X-Session-ID": session_uuid},
        ).get_json()

    validate(4)  # the first load and three reloads
    call("POST", "persist_session", json={"uuid": session_uuid, "consent_user_data": True})
    for name in ("cv.pdf", "cover-letter.pdf", "references.pdf"):
        upload(name)
    validate()  # a pick the client refuses itself
    validate(2)
    call("DELETE", "delete", json={"filename": "cover-letter.pdf", "session_uuid": session_uuid})
    upload("cover-letter.pdf")
    validate(2)
    address = f"visitor-{session_uuid[:8]}@example.org"
    assert email("verify-email", {"email": address})["status"] == "success"
    code = code_in(inbox.to(address)[0])
    email("verify-code", {"code": "000000" if code != "000000" else "111111"})
    assert email("verify-code", {"code": code})["status"] == "success"
    call("GET", f"session/{session_uuid}/export")


@dataclass
class Measured:
    """What one item cost."""

    statements: int
    rows_read: int
    # Sequential scans of the large tables (and audit_events' partitions), per table.
    seq_scans: dict[str, int]
    wal_bytes: int
    seconds: float


class Probe:
    """Reads PostgreSQL's counters around an item, and counts the app's statements."""

    def __init__(self, dsn: str, close_connections: Callable[[], object]) -> None:
        self._conn = psycopg2.connect(dsn)
        self._conn.autocommit = True
        self._close_connections = close_connections
        self.statements = 0

    def count(self, *_: Any) -> None:
        self.statements += 1

    def _counters(self) -> tuple[int, dict[str, int], int]:
        # A backend reports its scans when idle for a while, and at once when it exits.
        self._close_connections()
        time.sleep(0.2)
        cursor = self._conn.cursor()
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT coalesce(sum(seq_tup_read + coalesce(idx_tup_fetch, 0)), 0),"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0') FROM pg_stat_user_tables"
        )
        rows, wal = cursor.fetchone()
        cursor.execute("SELECT relname, seq_scan FROM pg_stat_user_tables")
        return int(rows), dict(cursor.fetchall()), int(wal)

    def measure(self, run: Callable[[], object]) -> Measured:
        """Run ``run`` and return what it cost."""
        rows, scans, wal = self._counters()
        self.statements = 0
        started = time.perf_counter()
        run()
        seconds = time.perf_counter() - started
        statements = self.statements
        rows_after, scans_after, wal_after = self._counters()
        scanned = {
            table: count - scans.get(table, 0)
            for table, count in scans_after.items()
            if count > scans.get(table, 0) and table.split("_p")[0] in LARGE_TABLES
        }
        return Measured(statements, rows_after - rows, scanned, wal_after - wal, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visits", type=int, default=2_200_000)
    parser.add_argument("--audit-per-visit", type=int, default=len(VISIT_EVENTS))
    parser.add_argument("--abandoned", type=int, default=20_000)
    parser.add_argument("--visit-samples", type=int, default=10)
    args = parser.parse_args()
    admin_url = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    with scratch_database(admin_url) as url, tempfile.TemporaryDirectory() as storage:
        dsn = url.render_as_string(hide_password=False)
        env = {"DATABASE_URL": dsn, "SECRET_KEY": "bench", "STORAGE_LOCAL_ROOT": storage}
        migrate(env)
        started = time.perf_counter()
        fill(
            dsn, visits=args.visits, audit_per_visit=args.audit_per_visit, abandoned=args.abandoned
        )
        print(f"filled in {time.perf_counter() - started:.0f} s: {describe(dsn)}")
        results = run_items(env, dsn, args)
    print(
        f"{'item':<30}{'n':>7} {'per':<8}{'statements':>11}{'rows read':>11}{'WAL bytes':>11}"
        f"{'ms':>9}  sequential scans of large tables (all n)"
    )
    for name, (per, count, cost) in results.items():
        scans = ", ".join(f"{table} {n}" for table, n in sorted(cost.seq_scans.items())) or "-"
        print(
            f"{name:<30}{count:>7} {per:<8}{cost.statements / count:>11.2f}"
            f"{cost.rows_read / count:>11.1f}{cost.wal_bytes / count:>11.0f}"
            f"{1000 * cost.seconds / count:>9.2f}  {scans}"
        )


def describe(dsn: str) -> str:
    """Row counts and sizes of the large tables."""
    with closing(psycopg2.connect(dsn)) as conn:
        cursor = conn.cursor()
        parts = []
        for table in LARGE_TABLES:
            cursor.execute(
                "SELECT (SELECT count(*) FROM " + table + "),"  # noqa: S608
                # A table that is not partitioned has no partition tree: its own size then.
                " pg_size_pretty(coalesce(sum(pg_total_relation_size(relid)),"
                " pg_total_relation_size(%s)))"
                " FROM pg_partition_tree(%s) WHERE isleaf",
                (table, table),
            )
            count, size = cursor.fetchone()
            parts.append(f"{table} {count:,} rows ({size})")
        return "; ".join(parts)


def run_items(
    env: dict[str, str], dsn: str, args: argparse.Namespace
) -> dict[str, tuple[str, int, Measured]]:
    """Every job and the hot path, measured; {item: (unit, units, measurements)}."""
    os.environ.update(env)
    from app import create_app, jobs
    from app.extensions import db
    from app.services import chat_sessions, security_monitor
    from app.services.audit import AuditContext
    from tests.conftest import smtp_server

    results: dict[str, tuple[str, int, Measured]] = {}
    with smtp_server() as (port, inbox):
        app = create_app({**env, **visit_settings(port)})

        def close_connections() -> None:
            with app.app_context():
                for engine in db.engines.values():
                    engine.dispose()

        probe = Probe(dsn, close_connections)
        with app.app_context():
            for engine in db.engines.values():
                event.listen(engine, "before_cursor_execute", probe.count)
        client = app.test_client()

        def item(name: str, per: str, count: int, run: Callable[[], object]) -> None:
            results[name] = (per, count, probe.measure(run))

        item(
            "visit (generate, 18 validate, ...)",
            "visit",
            args.visit_samples,
            lambda: [ordinary_visit(client, inbox) for _ in range(args.visit_samples)],
        )
        item(
            "generate-uuid",
            "request",
            50,
            lambda: [client.post("/api/v1/generate-uuid") for _ in range(50)],
        )
        known = client.post("/api/v1/generate-uuid").get_json()["uuid"]
        item(
            "validate-uuid (resume)",
            "request",
            50,
            lambda: [client.post("/api/v1/validate-uuid", json={"uuid": known}) for _ in range(50)],
        )
        with app.app_context():
            item("sessions gauge", "scrape", 1, chat_sessions.count_by_state)
            context = AuditContext(client_ip="10.1.1.0")
            item(
                "wrong-code burst check",
                "check",
                1,
                lambda: security_monitor.watch_failed_codes(
                    context, chat_sessions.parse_uuid4(known)
                ),
            )
            purged = []
            item(
                "abandoned purge",
                "session",
                args.abandoned,
                lambda: purged.append(jobs.run_abandoned_purge()),
            )
            retained = []
            item("retention", "run", 1, lambda: retained.append(jobs.run_retention()))
            item("orphan sweep", "run", 1, lambda: jobs.run_orphan_sweep())
        print("abandoned purge:", purged[0].as_dict() if purged[0] else None)
        print("retention:", retained[0].as_dict() if retained[0] else None)
    return results


if __name__ == "__main__":
    main()
