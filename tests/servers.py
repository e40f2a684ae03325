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
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

import requests

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The virtual environment the tests run in: its bin directory holds the gunicorn and flask
# commands an operator runs after installing the requirements.
VENV_BIN = Path(sys.executable).parent


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


@dataclass(frozen=True)
class Served:
    """A server process started for a test, where it answers, and where its output goes."""

    url: str
    process: subprocess.Popen[bytes]
    output: Path | None


@contextmanager
def _serving(
    command: list[str],
    env: dict[str, str],
    base_url: str,
    probe_path: str,
    output: Path | None = None,
) -> Iterator[Served]:
    sink = output.open("wb") if output is not None else subprocess.DEVNULL
    process = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        env={**os.environ, **env},
        stdout=sink,
        stderr=subprocess.STDOUT if output is not None else subprocess.DEVNULL,
    )
    try:
        wait_until_listening(f"{base_url}{probe_path}", process)
        yield Served(base_url, process, output)
    finally:
        process.terminate()
        process.wait(timeout=30)
        if output is not None:
            sink.close()  # type: ignore[union-attr]


def gunicorn_process(
    app_path: str,
    env: dict[str, str],
    *,
    workers: int = 2,
    scheme: str = "http",
    probe_path: str = "/",
    output: Path | None = None,
) -> AbstractContextManager[Served]:
    """``gunicorn <app_path>`` typed in the project directory, as the README says.

    gunicorn reads ``gunicorn.conf.py`` from there; the address and the worker count come
    from the environment variables that file reads, as an operator would set them.
    """
    port = free_port()
    env = {
        **env,
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": str(workers),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    return _serving(["gunicorn", app_path], env, f"{scheme}://127.0.0.1:{port}", probe_path, output)


def app_process(env: dict[str, str]) -> AbstractContextManager[Served]:
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


@contextmanager
def hung_server() -> Iterator[int]:
    """A TCP server that accepts every connection and never answers; yields its port.

    This is what a stopped S3 or SMTP server looks like from the app: the connection
    succeeds, then nothing comes back.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(connection)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=5)
        for connection in accepted:
            connection.close()
        listener.close()


@contextmanager
def dripping_server(reply: bytes, interval: float) -> Iterator[int]:
    """A TCP server that sends ``reply`` to each connection one byte every ``interval`` seconds.

    Every single read succeeds in time, but the reply as a whole takes far longer: a server
    that answers "just in time" at every step.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def drip(connection: socket.socket) -> None:
        with connection:
            for byte in reply:
                if stop.wait(interval):
                    return
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    return

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=drip, args=(connection,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
