"""How the orphan sweep scales: S3 requests, database queries, time and memory as folders grow.

For each N it builds N folders of k objects in S3 (a moto server, reached through a counting
proxy), registers sessions for the non-orphan share plus unrelated sessions, runs one sweep and
prints requests by operation against the lower bound
(list pages = ceil(objects/1000), delete calls = ceil(orphan objects/1000)), database queries,
wall time and peak Python memory.

    python bench/sweep_scale.py [--sizes 1000,3000,10000] [--objects 2] [--orphans 0.5]
                                [--extra-sessions 1.0]

Needs PostgreSQL at BENCH_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test).
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import sys
import time
import tracemalloc
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import boto3  # noqa: E402
from botocore.config import Config as BotoConfig  # noqa: E402
from flask_migrate import upgrade  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402
from sqlalchemy import event, insert  # noqa: E402

from app import create_app  # noqa: E402
from app.clock import utcnow  # noqa: E402
from app.extensions import db  # noqa: E402
from app.models import ChatSession  # noqa: E402
from app.services.orphan_sweep import sweep_orphans  # noqa: E402
from app.storage import current_storage  # noqa: E402
from bench.session_throughput import scratch_database  # noqa: E402
from tests.s3_proxy import S3Proxy  # noqa: E402
from tests.servers import free_port  # noqa: E402


def populate(endpoint: str, bucket: str, folders: list[str], per_folder: int) -> None:
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=BotoConfig(max_pool_connections=16),
    )
    keys = [f"uploads/{folder}/{index}.pdf" for folder in folders for index in range(per_folder)]

    def put(key: str) -> None:
        client.put_object(Bucket=bucket, Key=key, Body=io.BytesIO(b"%PDF-1.7 bench"))

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(put, keys))


def run(size: int, args: argparse.Namespace, moto_url: str, database_url: str) -> dict[str, object]:
    proxy = S3Proxy(moto_url)
    bucket = f"bench-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1").create_bucket(Bucket=bucket)
    folders = [str(uuid.uuid4()) for _ in range(size)]
    orphan_count = round(size * args.orphans)
    live = folders[orphan_count:]
    populate(moto_url, bucket, folders, args.objects)

    with proxy.serving() as proxy_url:
        app = create_app(
            {
                "DATABASE_URL": database_url,
                "SECRET_KEY": "bench",
                "STORAGE_BACKEND": "s3",
                "S3_BUCKET": bucket,
                "S3_ENDPOINT_URL": proxy_url,
                "S3_REGION": "us-east-1",
                "SCHEDULER_ENABLED": "false",
                "LOG_LEVEL": "warning",
            }
        )
        with app.app_context():
            upgrade()
            db.session.execute(ChatSession.__table__.delete())
            now = utcnow()
            extra = [uuid.uuid4() for _ in range(round(size * args.extra_sessions))]
            rows = [
                {"uuid": uuid.UUID(s), "created_at": now, "last_seen_at": now} for s in live
            ] + [{"uuid": s, "created_at": now, "last_seen_at": now} for s in extra]
            for start in range(0, len(rows), 5000):
                db.session.execute(insert(ChatSession), rows[start : start + 5000])
            db.session.commit()

            queries = 0

            def count(*_: object) -> None:
                nonlocal queries
                queries += 1

            event.listen(db.engine, "before_cursor_execute", count)
            proxy.reset()
            tracemalloc.start()
            started = time.perf_counter()
            report = sweep_orphans(
                current_storage(),
                now=now + timedelta(hours=1),
                min_age=timedelta(minutes=30),
                dry_run=False,
            )
            wall = time.perf_counter() - started
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            event.remove(db.engine, "before_cursor_execute", count)
            sessions = len(rows)

    objects = size * args.objects
    orphan_objects = orphan_count * args.objects
    assert report.objects_deleted == orphan_objects, report
    return {
        "N": size,
        "objects": objects,
        "sessions": sessions,
        "list": f"{proxy.counts['ListObjectsV2']}/{math.ceil(objects / 1000)}",
        "delete": f"{proxy.counts['DeleteObjects']}/{math.ceil(orphan_objects / 1000)}",
        "other S3": sum(
            v for k, v in proxy.counts.items() if k not in {"ListObjectsV2", "DeleteObjects"}
        ),
        "db queries": queries,
        "wall s": f"{wall:.2f}",
        "µs/object": f"{wall / objects * 1e6:.0f}",
        "peak MiB": f"{peak / 2**20:.1f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,3000,10000")
    parser.add_argument("--objects", type=int, default=2, help="objects per folder")
    parser.add_argument(
        "--orphans", type=float, default=0.5, help="share of folders with no session"
    )
    parser.add_argument(
        "--extra-sessions", type=float, default=1.0, help="unrelated sessions, as a multiple of N"
    )
    args = parser.parse_args()
    for name, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}.items():
        os.environ.setdefault(name, value)
    admin_url = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")

    # The S3 server's own request log would drown the table.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    rows = []
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            with scratch_database(admin_url) as url:
                database_url = url.set(drivername="postgresql+psycopg2").render_as_string(
                    hide_password=False
                )
                rows.append(run(size, args, f"http://127.0.0.1:{port}", database_url))
    finally:
        moto.stop()

    print(
        f"objects per folder={args.objects}  orphan share={args.orphans}  "
        f"unrelated sessions={args.extra_sessions} x N"
    )
    print("list and delete are shown as actual/lower bound")
    headers = list(rows[0])
    print("  ".join(f"{h:>11}" for h in headers))
    for row in rows:
        print("  ".join(f"{row[h]!s:>11}" for h in headers))


if __name__ == "__main__":
    main()
