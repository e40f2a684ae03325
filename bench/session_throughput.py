"""Throughput of generate-uuid and validate-uuid against a bare Flask + psycopg2 INSERT endpoint.

The app, the bare endpoint (bench/bare_app.py) and the floors (bench/floor_app.py,
bench/stack_floor_app.py) are served by gunicorn with the same worker count on the same
PostgreSQL server, and driven by wrk (a C load generator: one written in Python would burn the
cores the servers need). The targets are alternated round by round. Prints, per endpoint, the
median req/s, its ratio to the bare endpoint, to the SQLAlchemy floor and to the design card's
stack floor (/ card; each ratio the median of the round-by-round ratios), p50/p99 latency, the
CPU time per request of the target's gunicorn workers and every PostgreSQL process (CPU ms) with
the card floor's over it (card CPU: above 1, cheaper than the floor; unlike req/s it does not
move with other tenants' load), and each gunicorn worker's RSS after the run (targets:
generate-uuid and validate-uuid at 0.9 of the card's stack floor or more).

    python bench/session_throughput.py [--workers 4] [--threads 2] [--connections 8]
                                       [--seconds 5] [--rounds 3] [--fill-visits N]

With ``--fill-visits``, the scratch database first gets a year of N visits (bench/volume.py's
fill: sessions, tombstones and about 23 audit rows each), so the endpoints run on a large
database instead of an empty one.

Needs wrk (`apt-get install wrk`) and PostgreSQL at BENCH_DATABASE_URL (default
postgresql://postgres@127.0.0.1:5432/test); a scratch database is created and dropped.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import gunicorn_process  # noqa: E402

# The app at its defaults, but for a new-session limit no benchmark could stay under (wrk
# sends thousands a second from one address); the limiter still counts every request.
APP_ENV = {
    "SECRET_KEY": "bench",
    "SESSION_RATE_LIMIT": "100000000/minute",
    "RESUME_RATE_LIMIT": "100000000/minute",
    "RESUME_IP_RATE_LIMIT": "100000000/minute",
}


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


def resume_bodies(url: str, count: int = 200) -> list[str]:
    """validate-uuid bodies naming ``count`` sessions freshly issued by the app at ``url``."""
    bodies = []
    for _ in range(count):
        conn = http.client.HTTPConnection("127.0.0.1", urlsplit(url).port)
        conn.request("POST", "/api/v1/generate-uuid")
        bodies.append(json.dumps({"uuid": json.loads(conn.getresponse().read())["uuid"]}))
        conn.close()
    return bodies


def lua_script(path: str, bodies: list[str]) -> str:
    """A wrk script that POSTs to ``path``, cycling through ``bodies`` (none: an empty body)."""
    quoted = ", ".join(json.dumps(body) for body in bodies) or '""'
    return f"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json"
local bodies = {{ {quoted} }}
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, "{path}", nil, bodies[(n % #bodies) + 1])
end
"""


_DURATION = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(number) * _DURATION[unit]


@dataclass
class Round:
    """What wrk measured in one run against one endpoint."""

    rps: float
    p50_ms: float
    p99_ms: float
    failed: int
    requests: int = 0
    # The CPU time the target's gunicorn workers and every PostgreSQL process spent per request.
    server_cpu_ms: float = 0.0


def run_wrk(url: str, script: Path, args: argparse.Namespace) -> Round:
    """One wrk run; failed counts non-2xx answers, socket errors and timeouts."""
    command = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{args.seconds}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    failed = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", output))
    for counts in re.findall(r"Socket errors: (.*)", output):
        failed += sum(int(n) for n in re.findall(r"\d+", counts))
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    return Round(rps, p50, p99, failed, requests)


def measured_round(server_pid: int, url: str, script: Path, args: argparse.Namespace) -> Round:
    """One wrk run, with the CPU time the serving processes spent on each request.

    CPU time, unlike req/s, does not depend on how much of the machine other tenants took during
    the round: it says what a request costs the processes that serve it.
    """
    serving = worker_pids(server_pid) + postgres_pids()
    before = cpu_seconds(serving)
    measured = run_wrk(url, script, args)
    spent = cpu_seconds(serving) - before
    measured.server_cpu_ms = 1000 * spent / max(measured.requests, 1)
    return measured


def postgres_pids() -> list[int]:
    """Every PostgreSQL server process on this machine (the bench's server is local)."""
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "postgres":
                pids.append(int(comm.parent.name))
        except OSError:
            continue
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of ``pids`` so far (a process gone meanwhile counts nothing)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def worker_pids(master_pid: int) -> list[int]:
    """The worker processes of the gunicorn master ``master_pid``."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == master_pid:
                pids.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return sorted(pids)


def worker_rss_mib(master_pid: int) -> list[float]:
    """Resident memory of each worker of the gunicorn master ``master_pid``, in MiB."""
    sizes = []
    for pid in worker_pids(master_pid):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        kib = re.search(r"VmRSS:\s+(\d+) kB", status)
        if kib:
            sizes.append(int(kib.group(1)) / 1024)
    return sorted(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternate the targets this often")
    parser.add_argument("--fill-visits", type=int, default=0, help="a year of N visits first")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")
    admin_url = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")

    with scratch_database(admin_url) as url, tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        database_url = url.render_as_string(hide_password=False)
        # The floors are not the app: they name their driver themselves.
        floor_url = url.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
        admin(database_url, "CREATE TABLE bare_hits (id uuid PRIMARY KEY, created_at timestamptz)")
        app_env = {**APP_ENV, "DATABASE_URL": database_url}
        migrate(app_env)
        if args.fill_visits:
            from bench.volume import VISIT_EVENTS, fill

            fill(
                database_url,
                visits=args.fill_visits,
                audit_per_visit=len(VISIT_EVENTS),
                abandoned=0,
            )
        floors = {"FLOOR_DATABASE_URL": floor_url, "BARE_DSN": database_url}
        with (
            gunicorn_process(
                "wsgi:app", app_env, workers=args.workers, probe_path="/health", output=work / "log"
            ) as app,
            gunicorn_process(
                "bench.bare_app:app", {"BARE_DSN": database_url}, workers=args.workers
            ) as bare,
            gunicorn_process("bench.floor_app:app", floors, workers=args.workers) as floor,
            gunicorn_process("bench.stack_floor_app:app", floors, workers=args.workers) as orm,
            gunicorn_process(
                "bench.stack_floor_app:app",
                {**floors, "FLOOR_LAYERS": "limiter"},
                workers=args.workers,
            ) as limited,
            gunicorn_process(
                "bench.stack_floor_app:app",
                {**floors, "FLOOR_LAYERS": "limiter,cors"},
                workers=args.workers,
            ) as stack,
        ):
            known = resume_bodies(app.url)
            targets = {
                "bare INSERT": (bare, "/bare", []),
                "floor: psycopg2": (floor, "/floor/psycopg2", []),
                "floor: SQLAlchemy": (floor, "/floor/sqlalchemy", []),
                "floor: + Flask-SQLAlchemy": (orm, "/floor/stack", []),
                "floor: + flask-limiter": (limited, "/floor/stack", []),
                "floor: + flask-cors": (stack, "/floor/stack", []),
                "generate-uuid": (app, "/api/v1/generate-uuid", []),
                "validate-uuid (resume)": (app, "/api/v1/validate-uuid", known),
            }
            scripts = {}
            for name, (_, path, bodies) in targets.items():
                scripts[name] = work / f"{len(scripts)}.lua"
                scripts[name].write_text(lua_script(path, bodies))
            warm_up = argparse.Namespace(**{**vars(args), "seconds": 2})
            for name, (server, _, _) in targets.items():
                run_wrk(server.url, scripts[name], warm_up)
            rounds: dict[str, list[Round]] = {name: [] for name in targets}
            for _ in range(args.rounds):
                for name, (server, _, _) in targets.items():
                    rounds[name].append(
                        measured_round(server.process.pid, server.url, scripts[name], args)
                    )
            rss = {
                "app": worker_rss_mib(app.process.pid),
                "bare": worker_rss_mib(bare.process.pid),
                "floors": worker_rss_mib(floor.process.pid),
                "design-card floor": worker_rss_mib(stack.process.pid),
            }

    report(args, rounds, rss)


def report(
    args: argparse.Namespace, rounds: dict[str, list[Round]], rss: dict[str, list[float]]
) -> None:
    """Print the medians of the rounds, their ratios and the workers' memory.

    Each ratio is the median of the round-by-round ratios: the targets of one round run within
    seconds of each other, so a machine that is slower in one round than in another (other
    tenants' load) slows both sides of a round's ratio alike.
    """
    medians = {name: statistics.median(r.rps for r in runs) for name, runs in rounds.items()}

    def ratio(name: str, base: str) -> float:
        pairs = zip(rounds[name], rounds[base], strict=True)
        return statistics.median(mine.rps / theirs.rps for mine, theirs in pairs)

    def cpu_ratio(name: str, base: str) -> float:
        """The base's CPU per request over this target's: above 1, this one costs less."""
        pairs = zip(rounds[name], rounds[base], strict=True)
        return statistics.median(
            theirs.server_cpu_ms / mine.server_cpu_ms for mine, theirs in pairs
        )

    print(
        f"wrk -t{args.threads} -c{args.connections} -d{args.seconds}s, "
        f"{args.workers} gunicorn workers each, {args.rounds} alternated rounds (median), "
        f"database: {f'a year of {args.fill_visits:,} visits' if args.fill_visits else 'empty'}"
    )
    print(
        f"{'endpoint':<28}{'req/s':>9}{'/ bare':>8}{'/ SQLA':>9}{'/ card':>9}"
        f"{'p50 ms':>8}{'p99 ms':>8}{'failed':>8}{'CPU ms':>8}{'card CPU':>10}  rounds (req/s)"
    )
    for name, runs in rounds.items():
        p50 = statistics.median(r.p50_ms for r in runs)
        p99 = statistics.median(r.p99_ms for r in runs)
        each = " ".join(f"{r.rps:.0f}" for r in runs)
        failed = sum(r.failed for r in runs)
        # wrk's req/s counts every answer: with failures the ratio is not one of 200s.
        warning = "  (not every answer was 2xx: ratio invalid)" if failed else ""
        print(
            f"{name:<28}{medians[name]:>9.1f}{ratio(name, 'bare INSERT'):>8.2f}"
            f"{ratio(name, 'floor: SQLAlchemy'):>9.2f}{ratio(name, 'floor: + flask-cors'):>9.2f}"
            f"{p50:>8.2f}{p99:>8.2f}{failed:>8}"
            f"{statistics.median(r.server_cpu_ms for r in runs):>8.2f}"
            f"{cpu_ratio(name, 'floor: + flask-cors'):>10.2f}  {each}{warning}"
        )
    print(
        "worker RSS after the run (MiB): "
        + "; ".join(
            f"{name} " + ", ".join(f"{size:.1f}" for size in sizes) for name, sizes in rss.items()
        )
    )


if __name__ == "__main__":
    main()
