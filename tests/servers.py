"""Running the app in a separate process, as a deployment would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from http.server import ThreadingHTTPServer
from pathlib import Path

import requests

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_listening(url: str, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            # Only "is anything listening" matters here; the TLS test brings its own certificate.
            requests.get(url, timeout=1, verify=False)  # noqa: S501
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@contextmanager
def _serving(
    command: list[str], env: dict[str, str], base_url: str, probe_path: str
) -> Iterator[str]:
    process = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_listening(f"{base_url}{probe_path}", process)
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=30)


def gunicorn_process(
    app_path: str,
    env: dict[str, str],
    *,
    workers: int = 2,
    scheme: str = "http",
    probe_path: str = "/",
) -> AbstractContextManager[str]:
    """Serve ``app_path`` with gunicorn and gunicorn.conf.py on a free port; yields the base URL."""
    port = free_port()
    config = str(PROJECT_ROOT / "gunicorn.conf.py")
    command = [sys.executable, "-m", "gunicorn", app_path, "--config", config]
    command += ["--bind", f"127.0.0.1:{port}", "--workers", str(workers)]
    return _serving(command, env, f"{scheme}://127.0.0.1:{port}", probe_path)


def app_process(env: dict[str, str]) -> AbstractContextManager[str]:
    """Serve ``wsgi:app`` with ``env`` on a free loopback port; yields the base URL."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "flask",
        "--app",
        "wsgi",
        "run",
        "--port",
        str(port),
        "--no-reload",
    ]
    return _serving(command, env, f"http://127.0.0.1:{port}", "/health")


@contextmanager
def serving_in_thread(server: ThreadingHTTPServer) -> Iterator[str]:
    """Run an in-process HTTP server until the block ends; yields its base URL."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
