"""Where a request's CPU time goes: py-spy sampling gunicorn's workers under wrk, by layer.

The app is served as ``make bench`` serves it (gunicorn, 4 sync workers, PostgreSQL, the
throughput settings) and each endpoint is driven by wrk while py-spy samples every worker.
Only samples that hold the GIL count: a worker waiting for a client or for PostgreSQL's answer
has released it, so the shares are of the Python code's CPU time. Each sample is charged to the
layer of its innermost frame that belongs to a package (the standard library counts for the
package that called it). Also prints the workers' CPU time per request, read from /proc around
the run.

    python bench/profile_request.py [--seconds 10] [--workers 4]

Needs wrk and py-spy (requirements-dev.txt), PostgreSQL at BENCH_DATABASE_URL, and permission
to trace the workers (root, or ptrace allowed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.session_throughput import (  # noqa: E402
    APP_ENV,
    cpu_seconds,
    lua_script,
    migrate,
    resume_bodies,
    scratch_database,
    worker_pids,
)
from tests.servers import gunicorn_process  # noqa: E402

# py-spy installs beside the interpreter (requirements-dev.txt), which may not be on the PATH.
PY_SPY = (
    shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    or "py-spy"
)

# A sample is charged to the innermost frame that belongs to one of these layers, so time in the
# standard library counts for the layer that called it (limits' expiry timer thread for
# flask-limiter, JSON encoding for flask). The first fragment found in the file names the layer.
LAYERS = [
    (str(ROOT / "app") + "/", "the app's own code"),
    ("/flask_limiter/", "flask-limiter + limits"),
    ("/limits/", "flask-limiter + limits"),
    ("/flask_smorest/", "flask-smorest + marshmallow + webargs"),
    ("/marshmallow/", "flask-smorest + marshmallow + webargs"),
    ("/webargs/", "flask-smorest + marshmallow + webargs"),
    ("/flask_cors/", "flask-cors"),
    ("/flask_sqlalchemy/", "Flask-SQLAlchemy"),
    ("/sqlalchemy/", "SQLAlchemy (psycopg2 included)"),
    ("/psycopg2/", "SQLAlchemy (psycopg2 included)"),
    ("/prometheus_client/", "prometheus-client"),
    ("/pythonjsonlogger/", "logging (python-json-logger, stdlib logging)"),
    ("/logging/", "logging (python-json-logger, stdlib logging)"),
    ("/gunicorn/", "gunicorn (HTTP parsing, worker loop)"),
    ("/werkzeug/", "werkzeug"),
    ("/flask/", "flask"),
]


def layer_of(stack: list[str]) -> str:
    """The layer of the innermost frame of ``stack`` (outermost first) that has one."""
    for frame in reversed(stack):
        for fragment, layer in LAYERS:
            if fragment in frame:
                return layer
    return "other"


def profile(url: str, master: int, path: str, bodies: list[str], args, work: Path) -> None:
    script = work / "load.lua"
    script.write_text(lua_script(path, bodies))
    samples = work / "samples.txt"
    workers = worker_pids(master)
    cpu_before = cpu_seconds(workers)
    spy = subprocess.Popen(
        [
            PY_SPY,
            "record",
            "--pid",
            str(master),
            "--subprocesses",
            "--nonblocking",
            # Only samples holding the GIL: Python running, not a thread waiting on a socket.
            "--gil",
            "--full-filenames",
            "--rate",
            "250",
            "--duration",
            str(args.seconds),
            "--format",
            "raw",
            "--output",
            str(samples),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wrk = subprocess.run(
        ["wrk", "-t2", "-c8", f"-d{args.seconds}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    _, spy_errors = spy.communicate()
    if spy.returncode != 0:
        sys.exit(f"py-spy failed (it needs permission to trace the workers):\n{spy_errors}")
    cpu = cpu_seconds(workers) - cpu_before
    requests = int(wrk.split(" requests in ")[0].split()[-1])
    if requests == 0:
        sys.exit(f"wrk completed no request against {path}")

    by_layer: Counter[str] = Counter()
    by_frame: Counter[str] = Counter()
    for line in samples.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            by_layer[layer_of(stack.split(";"))] += int(count)
            by_frame[stack.split(";")[-1]] += int(count)
    total = sum(by_layer.values())
    per_request_ms = cpu * 1000 / requests
    print(f"\n{path}: {requests} requests, {per_request_ms:.2f} worker CPU ms per request")
    print(f"{'layer':<50}{'share':>8}{'ms':>8}")
    for layer, count in by_layer.most_common():
        share = count / total
        print(f"{layer:<50}{share:>8.1%}{share * per_request_ms:>8.2f}")
    for frame, count in by_frame.most_common(args.top):
        print(f"{count / total:>7.1%}  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--top", type=int, default=0, help="also print the N busiest frames")
    args = parser.parse_args()
    if shutil.which("wrk") is None or not os.path.exists(PY_SPY):
        sys.exit("needs wrk (apt-get install wrk) and py-spy (requirements-dev.txt)")
    admin_url = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    with scratch_database(admin_url) as url, tempfile.TemporaryDirectory() as scratch:
        env = {**APP_ENV, "DATABASE_URL": url.render_as_string(hide_password=False)}
        migrate(env)
        with gunicorn_process(
            "wsgi:app",
            env,
            workers=args.workers,
            probe_path="/health",
            output=Path(scratch) / "log",
        ) as app:
            known = resume_bodies(app.url)
            work = Path(scratch)
            profile(app.url, app.process.pid, "/api/v1/generate-uuid", [], args, work)
            profile(app.url, app.process.pid, "/api/v1/validate-uuid", known, args, work)


if __name__ == "__main__":
    main()
