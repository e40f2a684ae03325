"""Interactive API docs a developer can click, and metrics an operator can scrape."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from app import create_app
from app.extensions import db
from app.services import admin_alerts
from app.services.chat_sessions import COUNT_UP_TO
from tests.conftest import JSON_HEADERS, base_env, build_app
from tests.servers import app_process, free_port, gunicorn_process
from tests.test_browser import _browser_required, chromium

UUID_PATTERN = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
TOKEN = "scrape-" + uuid.uuid4().hex

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, keyed by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape(client: FlaskClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.data
    return parse(response.get_data(as_text=True))


def counted(client: FlaskClient, action: Callable[[], object], name: str, **labels: str) -> float:
    """How much ``action`` adds to one sample (this process's figures are shared by its tests)."""
    before = value(scrape(client), name, **labels)
    action()
    return value(scrape(client), name, **labels) - before


def known_in_advance(app: Flask) -> list[tuple[str, dict[str, str]]]:
    """The series a fresh server shows at zero: each job, each e-mail, each route of ``app``."""
    jobs = ("orphan_sweep", "abandoned_sessions", "retention")
    series = [
        ("job_runs_total", {"job": job, "outcome": outcome})
        for job in jobs
        for outcome in ("completed", "failed", "skipped")
    ]
    series += [("job_duration_seconds_count", {"job": job}) for job in jobs]
    series += [
        ("emails_total", {"kind": kind, "outcome": outcome})
        for kind in ("verification_code", "admin_notification")
        for outcome in ("sent", "failed")
    ]
    for rule in app.url_map.iter_rules():
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            route = {"method": method, "route": rule.rule}
            series.append(("http_requests_total", {**route, "status": "500"}))
            series.append(("http_request_duration_seconds_count", route))
        series.append(("rate_limit_refusals_total", {"route": rule.rule}))
    return series


def key(name: str, labels: dict[str, str]) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


# The API docs


def test_the_docs_page_and_every_file_it_loads_come_from_the_app(client: FlaskClient) -> None:
    moved = client.get("/api/v1/docs")
    page = client.get("/api/v1/docs/")

    assert moved.status_code in (301, 308)
    assert moved.headers["Location"].endswith("/api/v1/docs/")
    assert page.status_code == 200
    assert "/api/v1/openapi.json" in page.get_data(as_text=True)
    # Swagger UI's default would send the document's address to an online validator.
    assert '"validatorUrl": null' in page.get_data(as_text=True)
    loaded = re.findall(r'(?:src|href)="([^"]+)"', page.get_data(as_text=True))
    assert {path.rsplit("/", 1)[-1] for path in loaded} >= {
        "swagger-ui-bundle.js",
        "swagger-ui.css",
    }
    for path in loaded:
        assert path.startswith("/api/v1/docs/"), f"{path} is not served by the app"
        assert client.get(path).status_code == 200, path


def test_the_docs_can_be_switched_off(sqlite_url: str) -> None:
    client = build_app(sqlite_url, API_DOCS_ENABLED="false").test_client()

    assert client.get("/api/v1/docs/").status_code == 404
    assert client.get("/api/v1/openapi.json").status_code == 200


def test_the_documented_operations_ask_for_the_session_header_they_read(
    client: FlaskClient,
) -> None:
    spec = client.get("/api/v1/openapi.json").get_json()

    for operation in ("verify-email", "verify-code", "resend-code"):
        parameters = spec["paths"][f"/api/v1/email-verification/{operation}"]["post"]["parameters"]
        assert {"in": "header", "name": "X-Session-ID", "required": True}.items() <= next(
            p for p in parameters if p["name"] == "X-Session-ID"
        ).items()


def test_in_a_browser_without_internet_the_docs_list_the_operations_and_try_one_out(
    sqlite_url: str,
) -> None:
    _browser_required()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    build_app(sqlite_url)
    with app_process(base_env(sqlite_url)) as served, chromium() as driver:
        driver.get(f"{served.url}/api/v1/docs/")  # type: ignore[attr-defined]
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
        fetched = driver.execute_script(  # type: ignore[attr-defined]
            "return performance.getEntriesByType('resource').map(entry => entry.name)"
        )
        paths = {
            element.text.replace("\u200b", "")
            for element in driver.find_elements(  # type: ignore[attr-defined]
                By.CSS_SELECTOR, ".opblock-summary-path"
            )
        }

        operation = driver.find_element(  # type: ignore[attr-defined]
            By.XPATH,
            "//*[@data-path='/api/v1/generate-uuid']/ancestor::div[contains(@class, 'opblock ')]",
        )
        operation.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
        wait.until(lambda d: operation.find_elements(By.CSS_SELECTOR, ".try-out__btn"))
        operation.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
        wait.until(lambda d: operation.find_elements(By.CSS_SELECTOR, ".execute"))
        operation.find_element(By.CSS_SELECTOR, ".execute").click()
        wait.until(
            lambda d: operation.find_elements(
                By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status"
            )
        )
        status = operation.find_element(
            By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status"
        ).text
        body = operation.find_element(By.CSS_SELECTOR, ".live-responses-table tbody").text

    assert {
        "/api/v1/generate-uuid",
        "/api/v1/validate-uuid",
        "/api/v1/email-verification/verify-code",
        "/api/v1/upload",
    } <= paths
    assert fetched
    assert all(url.startswith(f"{served.url}/") for url in fetched), fetched
    assert status.startswith("200")
    assert "Session created." in body


# Access to the metrics


def test_a_metrics_token_is_required_when_one_is_set(sqlite_url: str) -> None:
    client = build_app(sqlite_url, METRICS_TOKEN=TOKEN).test_client()

    def with_authorization(value: str | None) -> int:
        headers = {"Authorization": value} if value is not None else {}
        return client.get("/metrics", headers=headers).status_code

    missing = client.get("/metrics")

    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert (missing.get_json()["status"], missing.get_json()["error"]) == ("error", "unauthorized")
    assert with_authorization(f"Basic {TOKEN}") == 401
    assert with_authorization("Bearer ") == 401
    assert with_authorization("Bearer not-the-token") == 403
    assert with_authorization(f"Bearer {TOKEN}x") == 403
    assert with_authorization(f"Bearer {TOKEN}") == 200
    assert with_authorization(f"bearer {TOKEN}") == 200


def test_metrics_can_be_switched_off(sqlite_url: str) -> None:
    client = build_app(sqlite_url, METRICS_ENABLED="false").test_client()

    assert client.get("/metrics").status_code == 404


# What the metrics count, in one process


def test_requests_are_counted_by_route_template_never_by_path(client: FlaskClient) -> None:
    session_uuid = client.post("/api/v1/generate-uuid", headers=JSON_HEADERS).get_json()["uuid"]

    added = counted(
        client,
        lambda: client.get(f"/api/v1/session/{session_uuid}"),
        "http_requests_total",
        method="GET",
        route="/api/v1/session/<uuid:session_uuid>",
        status="200",
    )
    unmatched = counted(
        client,
        lambda: client.get(f"/no/such/{session_uuid}"),
        "http_requests_total",
        method="GET",
        route="unmatched",
        status="404",
    )
    odd_method = counted(
        client,
        lambda: client.open("/api/v1/generate-uuid", method="BREW"),
        "http_requests_total",
        method="other",
        route="unmatched",
        status="405",
    )
    text = client.get("/metrics").get_data(as_text=True)

    assert (added, unmatched, odd_method) == (1, 1, 1)
    assert not UUID_PATTERN.search(text)
    session_route = {"method": "GET", "route": "/api/v1/session/<uuid:session_uuid>"}
    assert value(parse(text), "http_request_duration_seconds_count", **session_route) >= 1


def test_e_mails_sent_and_failed_are_counted(sqlite_url: str) -> None:
    sent_app = build_app(sqlite_url)
    failed_app = build_app(
        sqlite_url, MAIL_BACKEND="smtp", SMTP_HOST="127.0.0.1", SMTP_PORT=str(free_port())
    )

    def request_code(app: Flask) -> Callable[[], object]:
        client = app.test_client()
        session_uuid = client.post("/api/v1/generate-uuid").get_json()["uuid"]
        return lambda: client.post(
            "/api/v1/email-verification/verify-email",
            json={"email": "someone@example.org"},
            headers={**JSON_HEADERS, "X-Session-ID": session_uuid},
        )

    client = sent_app.test_client()
    labels = {"kind": "verification_code"}
    sent = counted(client, request_code(sent_app), "emails_total", **labels, outcome="sent")
    failed = counted(client, request_code(failed_app), "emails_total", **labels, outcome="failed")

    assert (sent, failed) == (1, 1)


def test_admin_notifications_are_counted(sqlite_url: str) -> None:
    app = build_app(sqlite_url, ADMIN_EMAIL="ops@example.org")
    client = app.test_client()

    def notify() -> None:
        with app.app_context():
            delivery = admin_alerts.notify("disk full", signature=uuid.uuid4().hex, facts={})
        assert delivery is not None
        delivery.result(timeout=10)

    added = counted(client, notify, "emails_total", kind="admin_notification", outcome="sent")

    assert added == 1


def test_rate_limit_refusals_are_counted_by_route(sqlite_url: str) -> None:
    client = build_app(sqlite_url, SESSION_RESOURCE_RATE_LIMIT="1/minute").test_client()
    missing = f"/api/v1/session/{uuid.uuid4()}"

    refused = counted(
        client,
        lambda: [client.get(missing) for _ in range(3)],
        "rate_limit_refusals_total",
        route="/api/v1/session/<uuid:session_uuid>",
    )

    assert refused == 2


def test_job_runs_their_outcomes_and_their_counts_are_counted(
    sqlite_url: str, tmp_path: Path
) -> None:
    app = build_app(sqlite_url, STORAGE_LOCAL_ROOT=str(tmp_path), ORPHAN_MIN_AGE_MINUTES="0")
    client = app.test_client()
    orphan = tmp_path / "uploads" / str(uuid.uuid4()) / "cv.pdf"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"%PDF-1.4")
    an_hour_ago = time.time() - 3600
    os.utime(orphan, (an_hour_ago, an_hour_ago))
    runner = app.test_cli_runner()

    def sweep_twice_on_schedule() -> None:
        with app.app_context():
            from app.jobs import run_orphan_sweep

            assert run_orphan_sweep(scheduled=True) is not None
            assert run_orphan_sweep(scheduled=True) is None, "not due again so soon"

    before = scrape(client)
    sweep_twice_on_schedule()
    assert runner.invoke(args=["cleanup", "abandoned"]).exit_code == 0
    after = scrape(client)

    def added(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert added("job_runs_total", job="orphan_sweep", outcome="completed") == 1
    assert added("job_runs_total", job="orphan_sweep", outcome="skipped") == 1
    assert added("job_runs_total", job="abandoned_sessions", outcome="completed") == 1
    assert added("job_items_total", job="orphan_sweep", item="folders_deleted") == 1
    assert added("job_items_total", job="orphan_sweep", item="objects_deleted") == 1
    assert added("job_duration_seconds_count", job="orphan_sweep") == 1
    assert not orphan.exists()


def test_a_job_that_cannot_run_is_counted_as_failed() -> None:
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    app = create_app(base_env(unreachable))
    client = app.test_client()

    def sweep() -> None:
        assert app.test_cli_runner().invoke(args=["cleanup", "orphans"]).exit_code != 0

    labels = {"job": "orphan_sweep"}
    completed = counted(client, sweep, "job_runs_total", **labels, outcome="completed")
    failed = counted(client, sweep, "job_runs_total", **labels, outcome="failed")

    assert (completed, failed) == (0, 1)
    assert "sessions" not in {name for name, _ in scrape(client)}, "no count without a database"


def test_every_series_known_in_advance_is_in_a_fresh_apps_first_scrape(sqlite_url: str) -> None:
    app = build_app(sqlite_url)
    expected = known_in_advance(app)

    samples = scrape(app.test_client())

    assert {"/api/v1/generate-uuid", "/api/v1/session/<uuid:session_uuid>", "/health"} <= {
        labels["route"] for name, labels in expected if name == "rate_limit_refusals_total"
    }
    # This process's figures are shared by its tests: present is what can be asserted here.
    assert [series for series in expected if key(*series) not in samples] == []


def test_sessions_by_state_come_from_the_database_and_are_cached(sqlite_url: str) -> None:
    fresh = build_app(sqlite_url, METRICS_SESSION_COUNT_SECONDS="0").test_client()
    cached = build_app(sqlite_url, METRICS_SESSION_COUNT_SECONDS="3600").test_client()
    for _ in range(2):
        fresh.post("/api/v1/generate-uuid")

    first = value(scrape(cached), "sessions", state="pending")
    fresh.post("/api/v1/generate-uuid")

    assert value(scrape(fresh), "sessions", state="pending") == 3
    assert value(scrape(fresh), "sessions", state="verified") == 0
    assert (first, value(scrape(cached), "sessions", state="pending")) == (2, 2)


def test_sessions_by_state_on_a_large_table_come_from_statistics_without_a_scan(
    postgres_url: str,
) -> None:
    app = build_app(postgres_url, METRICS_SESSION_COUNT_SECONDS="0")
    client = app.test_client()
    fill = (
        "INSERT INTO chat_sessions (uuid, state, created_at, last_seen_at, consent_user_data,"
        " email_verified) SELECT gen_random_uuid(), CASE WHEN n % 4 = 0 THEN 'verified'"
        " ELSE 'pending' END, now(), now(), false, n % 4 = 0 FROM generate_series(1, :rows) n"
    )

    def run(statement: str, **params: int) -> None:
        with app.app_context(), db.engine.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT")
            connection.execute(text(statement), params)

    run(fill, rows=2 * COUNT_UP_TO)
    run("ANALYZE chat_sessions")
    try:
        pending = value(scrape(client), "sessions", state="pending")
        verified = value(scrape(client), "sessions", state="verified")
        run(fill, rows=1000)
        again = value(scrape(client), "sessions", state="pending")
    finally:
        # The statistics outlive the rows: other tests on this database must count again.
        run("DELETE FROM chat_sessions")
        run("ANALYZE chat_sessions")

    assert pending == pytest.approx(1.5 * COUNT_UP_TO, rel=0.05)
    assert verified == pytest.approx(0.5 * COUNT_UP_TO, rel=0.05)
    assert again == pending, "read from the statistics, not counted"


# Across gunicorn workers


def test_two_workers_figures_are_summed_and_a_restart_starts_from_zero(
    sqlite_url: str, tmp_path: Path
) -> None:
    build_app(sqlite_url)
    metrics_dir = tmp_path / "metrics"
    env = base_env(sqlite_url, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir), METRICS_TOKEN=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    generated = 40

    def metrics_of(url: str) -> tuple[str, Samples]:
        response = requests.get(f"{url}/metrics", headers=auth, timeout=30)
        assert response.status_code == 200
        return response.text, parse(response.text)

    def generated_per_worker() -> list[float]:
        """Each worker's own count of generate-uuid requests, read from its counter file."""
        counts = []
        for path in metrics_dir.glob("counter_*.db"):
            counts.append(
                sum(
                    count
                    for key, count, *_ in MmapedDict.read_all_values_from_file(str(path))
                    if "/api/v1/generate-uuid" in key and "http_requests_total" in key
                )
            )
        return [count for count in counts if count]

    with gunicorn_process("wsgi:app", env, workers=2, probe_path="/health") as served:
        with ThreadPoolExecutor(8) as pool:
            statuses = list(
                pool.map(
                    lambda _: (
                        requests.post(f"{served.url}/api/v1/generate-uuid", timeout=30).status_code
                    ),
                    range(generated),
                )
            )
        per_worker = generated_per_worker()
        text, samples = metrics_of(served.url)

    with gunicorn_process("wsgi:app", env, workers=2, probe_path="/health") as restarted:
        _, after_restart = metrics_of(restarted.url)

    generate = {"method": "POST", "route": "/api/v1/generate-uuid", "status": "200"}
    assert statuses == [200] * generated
    assert len(per_worker) == 2, "both workers answered some of the requests"
    assert sum(per_worker) == generated
    assert value(samples, "http_requests_total", **generate) == generated
    assert value(samples, "sessions", state="pending") == generated
    assert not UUID_PATTERN.search(text)
    assert value(after_restart, "http_requests_total", **generate) == 0
    assert value(after_restart, "http_requests_total", method="GET", route="/health", status="200")


def test_the_docs_page_cannot_be_framed_and_runs_only_its_own_scripts(sqlite_url: str) -> None:
    client = build_app(sqlite_url).test_client()

    page = client.get("/api/v1/docs/")
    policy = page.headers["Content-Security-Policy"]
    [inline] = re.findall(r"<script>(.*?)</script>", page.get_data(as_text=True), re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()

    assert page.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in policy
    assert f"script-src 'self' 'sha256-{digest}';" in policy
    assert "unsafe-inline" not in policy.split("script-src", 1)[1].split(";", 1)[0]
    api = client.post("/api/v1/generate-uuid")
    assert api.headers["X-Frame-Options"] == "DENY"
    assert api.headers["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'"


def test_a_fresh_servers_first_scrape_shows_every_known_series_at_zero(
    sqlite_url: str, tmp_path: Path
) -> None:
    expected = known_in_advance(build_app(sqlite_url))
    env = base_env(sqlite_url, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"))

    # Probed at "/", an unknown path, so that no known route has answered before the scrape.
    with gunicorn_process("wsgi:app", env, workers=2) as served:
        response = requests.get(f"{served.url}/metrics", timeout=30)
    samples = parse(response.text)

    assert response.status_code == 200
    assert [series for series in expected if samples.get(key(*series)) != 0] == []
