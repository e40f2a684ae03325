"""One run of a job at a time, and one per interval, as the scheduler runs them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
import time_machine

from app import jobs
from tests.conftest import base_env, build_app, s3_env
from tests.s3_proxy import S3Proxy
from tests.servers import PROJECT_ROOT

T0 = datetime(2030, 3, 4, 5, 0, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)


@pytest.mark.parametrize(
    ("job", "interval"),
    [
        (jobs.run_orphan_sweep, timedelta(minutes=30)),
        (jobs.run_abandoned_purge, timedelta(minutes=30)),
        (jobs.run_retention, timedelta(days=1)),
    ],
    ids=["orphan_sweep", "abandoned_sessions", "retention"],
)
def test_a_scheduled_run_stands_down_until_its_interval_has_all_but_passed(
    database_url: str, job: object, interval: timedelta
) -> None:
    app = build_app(database_url)
    # Scheduler jitter: a run may start up to a minute early (a tenth of a short interval).
    due = interval - min(interval / 10, timedelta(minutes=1))

    def run_at(moment: datetime, *, scheduled: bool = True) -> bool:
        with time_machine.travel(moment, tick=False), app.app_context():
            return job(scheduled=scheduled) is not None  # type: ignore[operator]

    assert run_at(T0)
    assert not run_at(T0 + SECOND)
    assert run_at(T0 + SECOND, scheduled=False), "a run asked for by hand ignores the interval"
    # The hand-made run started at T0 + 1 s; the next scheduled one waits for it.
    assert not run_at(T0 + SECOND + due - SECOND)
    assert run_at(T0 + SECOND + due)


def test_a_short_interval_allows_a_tenth_of_itself_early(database_url: str) -> None:
    app = build_app(database_url, ORPHAN_SWEEP_INTERVAL_MINUTES="5")

    def run_at(moment: datetime) -> bool:
        with time_machine.travel(moment, tick=False), app.app_context():
            return jobs.run_orphan_sweep(scheduled=True) is not None

    assert run_at(T0)
    # Five minutes less a tenth: due 4 min 30 s after the last start, not a second sooner.
    assert not run_at(T0 + timedelta(minutes=4, seconds=29))
    assert run_at(T0 + timedelta(minutes=4, seconds=30))


def test_a_run_in_progress_keeps_every_other_run_out(
    database_url: str, s3_endpoint: str, proxy: tuple[S3Proxy, str]
) -> None:
    app = build_app(database_url, **{**s3_env(s3_endpoint), "S3_ENDPOINT_URL": proxy[1]})
    listing, release = threading.Event(), threading.Event()

    def hold_the_listing(name: str, path: str, body: bytes) -> None:
        if name == "ListObjectsV2":
            listing.set()
            release.wait(20)
        return

    proxy[0].fault = hold_the_listing
    results: list[object] = []

    def first_run() -> None:
        with app.app_context():
            results.append(jobs.run_orphan_sweep())

    running = threading.Thread(target=first_run)
    running.start()
    assert listing.wait(10)
    with app.app_context():
        second = jobs.run_orphan_sweep()
    # The lease a killed run would leave on SQLite lasts an hour; PostgreSQL's lock has none.
    with time_machine.travel(datetime.now(UTC) + timedelta(minutes=59)), app.app_context():
        within_the_lease = jobs.run_orphan_sweep()
    release.set()
    proxy[0].fault = None
    running.join(20)

    assert second is None
    assert within_the_lease is None
    assert len(results) == 1
    assert results[0] is not None


def test_on_sqlite_a_lease_left_by_a_killed_run_expires_after_an_hour(
    sqlite_url: str, s3_endpoint: str, proxy: tuple[S3Proxy, str]
) -> None:
    settings = {**s3_env(s3_endpoint), "S3_ENDPOINT_URL": proxy[1]}
    app = build_app(sqlite_url, **settings)
    listing = threading.Event()

    def hang_the_listing(name: str, path: str, body: bytes) -> None:
        if name == "ListObjectsV2":
            listing.set()
            time.sleep(30)
        return

    proxy[0].fault = hang_the_listing
    sweeper = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "wsgi", "cleanup", "orphans"],
        cwd=PROJECT_ROOT,
        env={**os.environ, **base_env(sqlite_url, **settings)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert listing.wait(20), "the sweep never started listing"
    sweeper.kill()  # it holds the job's lease and never gives it back
    sweeper.wait(10)
    proxy[0].fault = None
    killed_at = datetime.now(UTC)

    def run_at(moment: datetime) -> bool:
        with time_machine.travel(moment, tick=False), app.app_context():
            return jobs.run_orphan_sweep() is not None

    assert not run_at(killed_at + timedelta(minutes=59))
    assert run_at(killed_at + timedelta(hours=1) + SECOND)
