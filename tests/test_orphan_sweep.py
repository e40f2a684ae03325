"""The orphan sweep with real storage and real timestamps (the clock is moved, never slept)."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from flask import Flask

from app import jobs
from app.clock import utcnow
from app.services.files import file_ref
from app.services.job_runs import exclusive_run
from app.services.orphan_sweep import (
    JOB_NAME,
    OrphanFolder,
    SweepReport,
    delete_orphans,
    find_orphans,
    sweep_orphans,
)
from app.storage import current_storage, session_objects
from tests.conftest import JSON_HEADERS, audit_rows, build_app, unreachable_s3_env

PDF = b"%PDF-1.7 test"
MIN_AGE = timedelta(minutes=30)


@pytest.fixture
def app(database_url: str, storage_env: dict[str, str]) -> Flask:
    return build_app(database_url, **storage_env)


def put(app: Flask, *keys: str) -> None:
    with app.app_context():
        for key in keys:
            current_storage().put(key, io.BytesIO(PDF), "application/pdf")


def listed(app: Flask) -> list[str]:
    with app.app_context():
        return [s.key for page in current_storage().list_pages("uploads/") for s in page]


def live_session(app: Flask) -> str:
    return str(app.test_client().post("/api/v1/generate-uuid").get_json()["uuid"])


def sweep(app: Flask, *, minutes_later: int = 31, dry_run: bool = False) -> SweepReport:
    with app.app_context():
        return sweep_orphans(
            current_storage(),
            now=utcnow() + timedelta(minutes=minutes_later),
            min_age=MIN_AGE,
            dry_run=dry_run,
        )


def test_an_old_orphan_folder_is_deleted_and_audited_for_recovery_without_names(
    app: Flask,
) -> None:
    orphan = str(uuid.uuid4())
    keys = [f"uploads/{orphan}/a.pdf", f"uploads/{orphan}/b.pdf"]
    put(app, *keys)

    report = sweep(app)

    assert listed(app) == []
    assert (report.folders_deleted, report.objects_deleted, report.errors) == (1, 2, 0)
    [event] = audit_rows(app, "orphan_folder_deleted")
    assert str(event.session_uuid) == orphan
    with app.app_context():
        refs = [file_ref(name) for name in ("a.pdf", "b.pdf")]
    assert (event.details["objects"], event.details["bytes"]) == (2, 2 * len(PDF))
    assert [item["file_ref"] for item in event.details["files"]] == refs
    assert all(item["size"] == len(PDF) and item["version"] for item in event.details["files"])
    assert "a.pdf" not in json.dumps(event.details)
    [summary] = audit_rows(app, "orphan_sweep_completed")
    assert summary.details["folders_deleted"] == 1
    # Milliseconds, not whole seconds: a sweep this small takes well under one.
    assert isinstance(report.duration_seconds, float)
    assert 0 <= report.duration_seconds < 60
    assert summary.details["duration_seconds"] == report.duration_seconds


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_report_adds_up_over_every_batch(app: Flask, dry_run: bool) -> None:
    orphans = [uuid.uuid4() for _ in range(3)]
    live = uuid.UUID(live_session(app))
    folders = {
        folder: tuple(f"uploads/{folder}/{name}.pdf" for name in "ab")
        for folder in (*orphans, live)
    }
    put(app, *(key for keys in folders.values() for key in keys))
    report = SweepReport(dry_run=dry_run, folders_deleted=1, objects_deleted=1, kept_raced=1)

    with app.app_context():
        storage = current_storage()
        objects = {folder: tuple(session_objects(storage, folder)) for folder in folders}
        for batch in ([orphans[0]], [orphans[1], orphans[2], live]):
            delete_orphans(
                storage, [OrphanFolder(f, objects[f]) for f in batch], report, dry_run=dry_run
            )

    assert (report.folders_deleted, report.objects_deleted, report.kept_raced) == (4, 7, 2)


def test_the_report_counts_every_folder_and_object_it_saw(
    database_url: str, tmp_path: Path
) -> None:
    app = build_app(database_url, STORAGE_LOCAL_ROOT=str(tmp_path))
    old_orphans = [str(uuid.uuid4()) for _ in range(2)]
    recent_orphans = [str(uuid.uuid4()) for _ in range(2)]
    live = live_session(app)
    # A nested object belongs to its session's folder and goes with it.
    old_keys = [f"uploads/{folder}/a.pdf" for folder in (*old_orphans, live)]
    old_keys.append(f"uploads/{old_orphans[0]}/nested/b.pdf")
    put(app, *old_keys, *(f"uploads/{orphan}/a.pdf" for orphan in recent_orphans))
    two_hours_ago = (utcnow() - timedelta(hours=2)).timestamp()
    for key in old_keys:
        os.utime(tmp_path / key, (two_hours_ago, two_hours_ago))

    report = sweep(app, minutes_later=0)

    assert (report.folders_scanned, report.objects_scanned) == (5, 6)
    assert (report.folders_deleted, report.objects_deleted) == (2, 3)
    assert (report.kept_recent, report.kept_live) == (2, 1)
    assert sorted(listed(app)) == sorted(
        f"uploads/{folder}/a.pdf" for folder in (*recent_orphans, live)
    )


def test_a_recent_orphan_folder_is_kept(app: Flask) -> None:
    orphan = str(uuid.uuid4())
    put(app, f"uploads/{orphan}/a.pdf")

    report = sweep(app, minutes_later=29)

    assert listed(app) == [f"uploads/{orphan}/a.pdf"]
    assert (report.kept_recent, report.folders_deleted) == (1, 0)


def test_a_folder_is_judged_by_its_newest_object(database_url: str, tmp_path: Path) -> None:
    app = build_app(database_url, STORAGE_LOCAL_ROOT=str(tmp_path))
    mixed, stale = str(uuid.uuid4()), str(uuid.uuid4())
    put(app, f"uploads/{mixed}/old.pdf", f"uploads/{mixed}/new.pdf", f"uploads/{stale}/old.pdf")
    two_hours_ago = (utcnow() - timedelta(hours=2)).timestamp()
    for path in (
        tmp_path / "uploads" / mixed / "old.pdf",
        tmp_path / "uploads" / stale / "old.pdf",
    ):
        os.utime(path, (two_hours_ago, two_hours_ago))

    report = sweep(app, minutes_later=0)

    assert listed(app) == sorted([f"uploads/{mixed}/new.pdf", f"uploads/{mixed}/old.pdf"])
    assert (report.kept_recent, report.folders_deleted) == (1, 1)


def test_a_live_sessions_folder_is_kept(app: Flask) -> None:
    session_uuid = live_session(app)
    put(app, f"uploads/{session_uuid}/cv.pdf")

    report = sweep(app)

    assert listed(app) == [f"uploads/{session_uuid}/cv.pdf"]
    assert (report.kept_live, report.folders_deleted) == (1, 0)


def test_a_session_created_after_listing_keeps_its_folder(app: Flask) -> None:
    orphan = str(uuid.uuid4())
    put(app, f"uploads/{orphan}/cv.pdf")
    with app.app_context():
        storage = current_storage()
        report = SweepReport(dry_run=False)
        batches = list(find_orphans(storage, report, cutoff=utcnow() + timedelta(minutes=1)))
        assert [str(f.session_uuid) for batch in batches for f in batch] == [orphan]

        registered = app.test_client().post(
            "/api/v1/validate-uuid", json={"uuid": orphan}, headers=JSON_HEADERS
        )
        assert registered.get_json()["status"] == "success"
        for batch in batches:
            delete_orphans(storage, batch, report, dry_run=False)

    assert listed(app) == [f"uploads/{orphan}/cv.pdf"]
    assert (report.kept_raced, report.folders_deleted) == (1, 0)


def test_an_object_uploaded_after_listing_survives(app: Flask) -> None:
    orphan = str(uuid.uuid4())
    put(app, f"uploads/{orphan}/old.pdf")
    with app.app_context():
        storage = current_storage()
        report = SweepReport(dry_run=False)
        batches = list(find_orphans(storage, report, cutoff=utcnow() + timedelta(minutes=1)))
        storage.put(f"uploads/{orphan}/new.pdf", io.BytesIO(PDF), "application/pdf")
        for batch in batches:
            delete_orphans(storage, batch, report, dry_run=False)

    assert listed(app) == [f"uploads/{orphan}/new.pdf"]
    [event] = audit_rows(app, "orphan_folder_deleted")
    with app.app_context():
        assert [item["file_ref"] for item in event.details["files"]] == [file_ref("old.pdf")]


def test_foreign_folders_and_loose_files_are_reported_never_deleted(app: Flask) -> None:
    foreign = [
        "uploads/backups/x.pdf",
        f"uploads/{str(uuid.uuid4()).upper()}/x.pdf",
        f"uploads/{uuid.uuid1()}/x.pdf",
        "uploads/loose.pdf",
    ]
    put(app, *foreign)

    report = sweep(app)

    assert sorted(listed(app)) == sorted(foreign)
    assert (report.non_uuid_folders, report.loose_files, report.folders_deleted) == (3, 1, 0)
    assert "backups" in report.examples["non_uuid_folders"]
    with app.app_context():
        assert report.examples["loose_files"] == [file_ref("loose.pdf")]


def test_the_report_counts_every_stray_but_names_only_twenty(app: Flask) -> None:
    loose = [f"uploads/loose-{n:02d}.pdf" for n in range(21)]
    put(app, *loose)

    report = sweep(app)

    assert report.loose_files == 21
    with app.app_context():
        assert report.examples["loose_files"] == [
            file_ref(key.removeprefix("uploads/")) for key in loose[:20]
        ]


def test_a_dry_run_deletes_nothing(app: Flask) -> None:
    orphan = str(uuid.uuid4())
    put(app, f"uploads/{orphan}/a.pdf")

    report = sweep(app, dry_run=True)

    assert listed(app) == [f"uploads/{orphan}/a.pdf"]
    assert (report.dry_run, report.folders_deleted, report.objects_deleted) == (True, 1, 1)
    assert audit_rows(app) == []


def test_a_storage_error_on_one_folder_spares_the_others(database_url: str, tmp_path: Path) -> None:
    app = build_app(database_url, STORAGE_LOCAL_ROOT=str(tmp_path))
    bad, good = str(uuid.uuid4()), str(uuid.uuid4())
    put(app, f"uploads/{bad}/a.pdf", f"uploads/{good}/a.pdf")
    with app.app_context():
        storage = current_storage()
        report = SweepReport(dry_run=False)
        batches = list(find_orphans(storage, report, cutoff=utcnow() + timedelta(minutes=1)))
        # The listed file turns into a non-empty directory: unlinking it now fails.
        target = tmp_path / "uploads" / bad / "a.pdf"
        target.unlink()
        target.mkdir()
        (target / "inner").write_bytes(b"x")
        for batch in batches:
            delete_orphans(storage, batch, report, dry_run=False)

    assert (report.folders_deleted, report.errors) == (1, 1)
    assert not (tmp_path / "uploads" / good).exists()
    [error] = audit_rows(app, "orphan_sweep_error")
    assert str(error.session_uuid) == bad
    assert error.details["objects"] == 1
    with app.app_context():
        assert [item["file_ref"] for item in error.details["files"]] == [file_ref("a.pdf")]
    assert error.details["error"]
    shutil.rmtree(target)


def test_an_unreachable_storage_is_one_audited_error(database_url: str) -> None:

    app = build_app(
        database_url,
        **unreachable_s3_env(),
    )

    report = sweep(app)

    assert report.errors == 1
    [error] = audit_rows(app, "orphan_sweep_error")
    assert error.session_uuid is None
    assert error.details["error"] == "listing failed: EndpointConnectionError"
    assert audit_rows(app, "orphan_sweep_completed")[0].details["errors"] == 1


def test_batches_pack_a_thousand_keys_per_delete(database_url: str, tmp_path: Path) -> None:
    app = build_app(database_url, STORAGE_LOCAL_ROOT=str(tmp_path))
    orphans = [str(uuid.uuid4()) for _ in range(700)]
    for orphan in orphans:
        for name in ("a.pdf", "b.pdf"):
            path = tmp_path / "uploads" / orphan / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(PDF)
    with app.app_context():
        report = SweepReport(dry_run=True)
        batches = list(
            find_orphans(current_storage(), report, cutoff=utcnow() + timedelta(minutes=1))
        )

    assert [sum(len(f.keys) for f in batch) for batch in batches] == [1000, 400]
    assert report.objects_scanned == 1400


# Coordination and the shells around the sweep


def test_two_sweeps_at_once_one_runs_and_the_other_skips(database_url: str) -> None:
    app = build_app(database_url)
    holding, release = threading.Event(), threading.Event()

    def first_sweep() -> None:
        with app.app_context(), exclusive_run(JOB_NAME) as slot:
            assert slot is not None
            holding.set()
            release.wait(timeout=30)

    thread = threading.Thread(target=first_sweep)
    thread.start()
    assert holding.wait(timeout=30)
    try:
        with app.app_context():
            assert jobs.run_orphan_sweep() is None
    finally:
        release.set()
        thread.join(timeout=30)
    with app.app_context():
        assert jobs.run_orphan_sweep() is not None


def test_a_scheduled_sweep_runs_once_per_interval(database_url: str) -> None:
    app = build_app(database_url)
    with app.app_context():
        first = jobs.run_orphan_sweep(scheduled=True)
        second = jobs.run_orphan_sweep(scheduled=True)
        forced = jobs.run_orphan_sweep()

    assert first is not None
    assert second is None
    assert forced is not None
    ready = app.test_client().get("/ready").get_json()
    assert ready["last_orphan_sweep_at"] is not None


def test_the_cli_prints_a_summary(database_url: str, tmp_path: Path) -> None:
    app = build_app(database_url, STORAGE_LOCAL_ROOT=str(tmp_path))
    orphan = str(uuid.uuid4())
    put(app, f"uploads/{orphan}/a.pdf")

    dry = app.test_cli_runner().invoke(args=["cleanup", "orphans", "--dry-run"])
    real = app.test_cli_runner().invoke(args=["cleanup", "orphans"])

    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["dry_run"] is True
    assert real.exit_code == 0, real.output
    # The files are newer than ORPHAN_MIN_AGE_MINUTES, so the real run keeps them.
    assert json.loads(real.stdout)["kept_recent"] == 1


def test_the_factory_schedules_the_sweep_when_enabled(database_url: str) -> None:
    app = build_app(database_url, SCHEDULER_ENABLED="true", ORPHAN_SWEEP_INTERVAL_MINUTES="7")
    scheduler = app.extensions["scheduler"]
    try:
        job = scheduler.get_job("orphan_sweep")
        assert job.trigger.interval == timedelta(minutes=7)
    finally:
        scheduler.shutdown(wait=False)
    assert "scheduler" not in build_app(database_url).extensions
