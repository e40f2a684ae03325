"""Throughput of generate-uuid and validate-uuid against a bare Flask + psycopg2 INSERT endpoint.

Both are served by gunicorn with the same worker count on the same PostgreSQL server,
driven by the same closed-loop load. Prints requests/second and the ratio to the bare
endpoint (target: at least 0.8).

    python bench/session_throughput.py [--workers 4] [--clients 16] [--seconds 10]

Needs PostgreSQL at BENCH_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test);
a scratch database is created and dropped.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from contextlib import closing, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import gunicorn_process  # noqa: E402


def admin(url: str, statement: str) -> None:
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with closing(psycopg2.connect(dsn)) as conn:
        conn.autocommit = True
        conn.cursor().execute(statement)


@contextmanager
def scratch_database(admin_url: str):
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin(admin_url, f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin_url).set(drivername="postgresql", database=name)
    finally:
        admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def migrate(env: dict[str, str]) -> None:
    """Apply the app's migrations to the database that ``env`` names."""
    subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "db", "upgrade"],
        cwd=ROOT,
        env={**os.environ, **env},
        check=True,
        capture_output=True,
    )


def _client_process(
    port: int, path: str, bodies: list[str], threads: int, seconds: float, out
) -> None:
    counts = [0] * threads
    errors = [0] * threads
    deadline = time.monotonic() + seconds

    def loop(slot: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"Content-Type": "application/json", "Accept": "application/json; version=v1"}
        while time.monotonic() < deadline:
            body = random.choice(bodies) if bodies else None
            try:
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    counts[slot] += 1
                else:
                    errors[slot] += 1
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
            except (OSError, http.client.HTTPException):
                errors[slot] += 1
                conn.close()

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    out.put((sum(counts), sum(errors)))


def measure(
    port: int, path: str, bodies: list[str], clients: int, seconds: float
) -> tuple[float, int]:
    """Requests per second (HTTP 200 only) and the error count under ``clients`` closed loops."""
    processes = 2
    queue: multiprocessing.Queue = multiprocessing.Queue()
    procs = [
        multiprocessing.Process(
            target=_client_process, args=(port, path, bodies, clients // processes, seconds, queue)
        )
        for _ in range(processes)
    ]
    started = time.monotonic()
    for proc in procs:
        proc.start()
    results = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    elapsed = time.monotonic() - started
    return sum(ok for ok, _ in results) / elapsed, sum(err for _, err in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternate the targets this many times"
    )
    args = parser.parse_args()
    admin_url = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")

    with scratch_database(admin_url) as url:
        database_url = url.set(drivername="postgresql+psycopg2").render_as_string(False)
        dsn = url.render_as_string(hide_password=False)
        admin(dsn, "CREATE TABLE bare_hits (id uuid PRIMARY KEY, created_at timestamptz NOT NULL)")
        app_env = {
            "DATABASE_URL": database_url,
            "SECRET_KEY": "bench",
            "SESSION_RATE_LIMIT": "100000000/minute",
            "LOG_LEVEL": "warning",
        }
        migrate(app_env)
        with (
            gunicorn_process(
                "wsgi:app", app_env, workers=args.workers, probe_path="/health"
            ) as app_url,
            gunicorn_process(
                "bench.bare_app:app", {"BARE_DSN": dsn}, workers=args.workers
            ) as bare_url,
            gunicorn_process(
                "bench.floor_app:app",
                {"FLOOR_DATABASE_URL": database_url, "BARE_DSN": dsn},
                workers=args.workers,
            ) as floor_url,
        ):
            app_port, bare_port = urlsplit(app_url.url).port, urlsplit(bare_url.url).port
            floor_port = urlsplit(floor_url.url).port
            known = []
            for _ in range(200):
                conn = http.client.HTTPConnection("127.0.0.1", app_port)
                conn.request("POST", "/api/v1/generate-uuid")
                known.append(json.dumps({"uuid": json.loads(conn.getresponse().read())["uuid"]}))
            targets = {
                "bare INSERT": (bare_port, "/bare", []),
                "floor: psycopg2": (floor_port, "/floor/psycopg2", []),
                "floor: SQLAlchemy": (floor_port, "/floor/sqlalchemy", []),
                "generate-uuid": (app_port, "/api/v1/generate-uuid", []),
                "validate-uuid (resume)": (app_port, "/api/v1/validate-uuid", known),
            }
            for port, path, bodies in targets.values():
                measure(port, path, bodies, args.clients, 2.0)  # warm-up
            rates: dict[str, list[float]] = {name: [] for name in targets}
            errors = dict.fromkeys(targets, 0)
            for _ in range(args.rounds):
                for name, (port, path, bodies) in targets.items():
                    rps, failed = measure(port, path, bodies, args.clients, args.seconds)
                    rates[name].append(rps)
                    errors[name] += failed

    best = {name: sorted(values)[len(values) // 2] for name, values in rates.items()}
    baseline = best["bare INSERT"]
    print(
        f"workers={args.workers} clients={args.clients} seconds={args.seconds} rounds={args.rounds}"
    )
    print(f"{'endpoint':<26}{'req/s (median)':>16}{'ratio':>8}{'errors':>8}")
    for name, rps in best.items():
        print(f"{name:<26}{rps:>16.1f}{rps / baseline:>8.2f}{errors[name]:>8}")


if __name__ == "__main__":
    main()
