"""A bounded load run: gunicorn on PostgreSQL and Redis under a mixed frontend workload.

Each simulated user runs the frontend's journey in a loop: generate-uuid, validate-uuid,
upload a PDF (multipart), verify-email (real SMTP to a local aiosmtpd server). Many users run
at once for a fixed time. The run reports throughput, latency percentiles per endpoint, and
every unexpected answer (anything but 200; a 429 counts as unexpected because the limits are
raised above the offered load).

    python bench/load_mixed.py [--workers 4] [--users 32] [--seconds 30]

Needs PostgreSQL (BENCH_DATABASE_URL, default postgresql://postgres@127.0.0.1:5432/test) and
Redis (BENCH_REDIS_URL, default redis://127.0.0.1:6379/0). Traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.session_throughput import migrate, scratch_database  # noqa: E402
from tests.conftest import smtp_server  # noqa: E402
from tests.servers import gunicorn_process  # noqa: E402

JSON = {"Content-Type": "application/json", "Accept": "application/json; version=v1"}
PDF = b"%PDF-1.7\n" + b"0" * 64 * 1024 + b"\n%%EOF\n"
BOUNDARY = "loadboundary"


def multipart(session_uuid: str) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="session_uuid"\r\n\r\n'
            f"{session_uuid}\r\n--{BOUNDARY}\r\n"
            'Content-Disposition: form-data; name="file"; filename="cv.pdf"\r\n'
            "Content-Type: application/pdf\r\n\r\n"
        ).encode()
        + PDF
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def user_loop(
    port: int, deadline: float, latencies: dict[str, list[float]], outcomes: Counter[str]
) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def call(
        name: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> dict[str, object] | None:
        nonlocal connection
        started = time.perf_counter()
        try:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException):
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            outcomes[f"{name} network error"] += 1
            return None
        latencies[name].append(time.perf_counter() - started)
        outcomes[f"{name} {response.status}"] += 1
        return json.loads(payload) if response.status == 200 else None

    while time.monotonic() < deadline:
        issued = call("generate-uuid", "/api/v1/generate-uuid", None, JSON)
        if not issued:
            continue
        session_uuid = str(issued["uuid"])
        call(
            "validate-uuid",
            "/api/v1/validate-uuid",
            json.dumps({"uuid": session_uuid}).encode(),
            JSON,
        )
        call(
            "upload",
            "/api/v1/upload",
            multipart(session_uuid),
            {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Accept": JSON["Accept"]},
        )
        call(
            "verify-email",
            "/api/v1/email-verification/verify-email",
            json.dumps({"email": f"load-{uuid.uuid4().hex[:12]}@example.org"}).encode(),
            {**JSON, "X-Session-ID": session_uuid},
        )


def client_process(port: int, users: int, seconds: float, queue: multiprocessing.Queue) -> None:
    deadline = time.monotonic() + seconds
    latencies: dict[str, list[float]] = defaultdict(list)
    outcomes: Counter[str] = Counter()
    threads = [
        threading.Thread(target=user_loop, args=(port, deadline, latencies, outcomes))
        for _ in range(users)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    queue.put((dict(latencies), dict(outcomes)))


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    admin_url = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

    with (
        scratch_database(admin_url) as url,
        smtp_server() as (smtp_port, inbox),
        tempfile.TemporaryDirectory() as storage,
    ):
        env = {
            "DATABASE_URL": url.set(drivername="postgresql+psycopg2").render_as_string(
                hide_password=False
            ),
            "SECRET_KEY": "load",
            "RATELIMIT_STORAGE_URI": redis_url,
            "RATELIMIT_KEY_PREFIX": f"load-{uuid.uuid4().hex[:8]}",
            # Far above the offered load: every 429 in this run would be a defect.
            "SESSION_RATE_LIMIT": "1000000/minute",
            "SESSION_RESOURCE_RATE_LIMIT": "1000000/minute",
            "UPLOAD_RATE_LIMIT": "1000000/minute",
            "EMAIL_RATE_LIMIT": "1000000/minute",
            "EMAIL_SENDS_PER_ADDRESS_PER_DAY": "1000",
            "STORAGE_LOCAL_ROOT": storage,
            "MAIL_BACKEND": "smtp",
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(smtp_port),
            "SMTP_STARTTLS": "false",
            "LOG_LEVEL": "warning",
            "SCHEDULER_ENABLED": "false",
        }
        migrate(env)
        with gunicorn_process(
            "wsgi:app", env, workers=args.workers, probe_path="/health"
        ) as served:
            base = served.url
            port = urlsplit(base).port or 80
            queue: multiprocessing.Queue = multiprocessing.Queue()
            per_process = max(1, args.users // 2)
            processes = [
                multiprocessing.Process(
                    target=client_process, args=(port, per_process, args.seconds, queue)
                )
                for _ in range(2)
            ]
            started = time.monotonic()
            for process in processes:
                process.start()
            results = [queue.get() for _ in processes]
            for process in processes:
                process.join()
            elapsed = time.monotonic() - started
        mails = len(inbox.messages)

    latencies: dict[str, list[float]] = defaultdict(list)
    outcomes: Counter[str] = Counter()
    for partial_latencies, partial_outcomes in results:
        for name, values in partial_latencies.items():
            latencies[name].extend(values)
        outcomes.update(partial_outcomes)
    total = sum(len(values) for values in latencies.values())
    unexpected = {key: count for key, count in outcomes.items() if not key.endswith(" 200")}
    journeys = len(latencies["generate-uuid"])
    print(f"workers={args.workers} users={args.users} seconds={args.seconds:.0f}")
    print(f"elapsed={elapsed:.1f}s requests={total} journeys={journeys}")
    print(f"throughput={total / elapsed:.1f} req/s ({journeys / elapsed:.1f} journeys/s)")
    print(f"verification mails received={mails}")
    print(f"{'endpoint':<16}{'count':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for name, values in latencies.items():
        p50, p95, p99 = (percentile(values, share) for share in (0.5, 0.95, 0.99))
        print(
            f"{name:<16}{len(values):>8}{p50:>9.1f}{p95:>9.1f}{p99:>9.1f}{max(values) * 1000:>9.1f}"
        )
    print(f"unexpected answers: {sum(unexpected.values())} {unexpected or ''}")
    mean = statistics.fmean(v for values in latencies.values() for v in values)
    print(f"mean request latency {mean * 1000:.1f} ms")


if __name__ == "__main__":
    main()
