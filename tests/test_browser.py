"""A real browser (headless Debian chromium) calling the API cross-origin, as the frontend does."""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import audit_rows, base_env, build_app, smtp_env, smtp_server
from tests.servers import app_process, serving_in_thread

PAGES = Path(__file__).parent / "browser"
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


def _browser_required() -> None:
    if CHROMIUM and CHROMEDRIVER:
        return
    message = "Debian's chromium and chromium-driver are not installed"
    if os.environ.get("TEST_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


class _QuietPages(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        return


def page_server() -> AbstractContextManager[str]:
    """Serve tests/browser/ on loopback; the origin is the page's own."""
    handler = functools.partial(_QuietPages, directory=str(PAGES))
    return serving_in_thread(ThreadingHTTPServer(("127.0.0.1", 0), handler))


@contextmanager
def chromium() -> Iterator[object]:
    os.environ["SE_OFFLINE"] = "true"  # Selenium must never fetch a browser or a driver.
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER or ""), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def run_flow(driver: object, page_url: str, api_url: str) -> dict[str, object]:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{page_url}/flow.html?api={api_url}")  # type: ignore[attr-defined]
    WebDriverWait(driver, 30).until(lambda d: d.title == "done")
    text = driver.find_element("id", "result").text  # type: ignore[attr-defined]
    return json.loads(text)


def test_the_frontend_flow_works_from_an_allowed_origin_only(
    sqlite_url: str, tmp_path: Path
) -> None:
    _browser_required()
    app = build_app(sqlite_url)
    with page_server() as allowed, page_server() as other, smtp_server() as (port, inbox):
        env = base_env(
            sqlite_url,
            CORS_ORIGINS=allowed,
            STORAGE_LOCAL_ROOT=str(tmp_path),
            **smtp_env(port),
        )
        with app_process(env) as served, chromium() as driver:
            api = served.url
            good = run_flow(driver, allowed, api)
            sessions_before = len(audit_rows(app, "uuid_generated"))
            blocked = run_flow(driver, other, api)

    assert good.get("error") is None, good
    assert good["generate"]["status"] == 200
    assert good["generate"]["correlationId"]
    assert good["generate"]["apiVersion"] == "v1"
    assert good["validate"]["body"]["status"] == "success"
    assert good["upload"] == {
        "status": 200,
        "body": good["upload"]["body"],
    }
    assert good["upload"]["body"]["filename"] == "browser.pdf"
    assert good["verify"]["body"]["nextTransition"] == "CODE_INPUT"
    assert [message["To"] for message in inbox.messages] == ["browser@example.org"]

    assert "Failed to fetch" in str(blocked.get("error")), blocked
    # The browser stopped at the preflight: no session was created for the other origin.
    assert len(audit_rows(app, "uuid_generated")) == sessions_before
