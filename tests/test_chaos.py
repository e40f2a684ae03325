"""Chaos: every dependency refused, frozen, trickling and partitioned in turn under steady load.

``gunicorn wsgi:app`` in production settings reaches PostgreSQL, Redis, S3 (moto) and SMTP
(aiosmtpd) each through a fault proxy (tests/fault_proxy.py). Two clients do what the React
client does while a conductor breaks one dependency at a time and restores it. Where network
namespaces work, the database path also crosses a veth pair whose packets can be dropped: a real
partition, where nothing (not even a reset) comes back.

Afterwards: no worker was killed, every answer was JSON and came within the request deadline
plus slack, the service answered 200 again within seconds of each restore, and the database,
the bucket and the audit trail agree. A table of what was observed is printed (``pytest -s``)
for docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import psycopg2
import requests
from flask import Flask
from sqlalchemy.engine import make_url

from app.services.files import file_ref
from tests.conftest import RUN_ID, operator, s3_env, smtp_server
from tests.fault_proxy import FaultProxy
from tests.servers import PROJECT_ROOT, VENV_BIN, Served, _serving, free_port, gunicorn_process

# The app's deadline for one request, and the worker timeout it must stay inside (the app
# refuses a deadline above its share of the timeout). Short, so that a frozen dependency costs
# seconds, not minutes; every fault phase below outlasts it, so each one meets the deadline.
REQUEST_DEADLINE_SECONDS = 3
GUNICORN_TIMEOUT = 30
# Time between the deadline passing and the answer reaching the client: the error handler,
# cutting the stuck connection, and a loaded 2-core machine.
SLACK_SECONDS = 3
# After a restore, one call may still meet a connection that broke during the fault and end at
# its deadline; the next one must then succeed.
RECOVERY_LIMIT_SECONDS = REQUEST_DEADLINE_SECONDS + 2
REFUSED_SECONDS = 1.5
FROZEN_SECONDS = 4.0
TRICKLE_SECONDS = 4.0
PARTITION_SECONDS = 4.0
# Lookups of a slowed name are answered after this long: past the deadline, inside the timeout.
DNS_DELAY_SECONDS = 20.0
SLOW_DNS_SECONDS = 4.0
STEADY_SECONDS = 1.5
WORKERS = 3
# Clients plus the conductor's probe never outnumber the workers: a call that waits for a
# worker would be timed with someone else's fault.
CLIENTS = WORKERS - 1
PAUSE_BETWEEN_CALLS = 0.05
# The client never gives up before gunicorn would have killed the worker: a killed worker must
# be seen as the empty reply it causes, not hidden by the client's own timeout.
CLIENT_TIMEOUT = (5, GUNICORN_TIMEOUT + 15)

DEPENDENCIES = ("postgres", "redis", "s3", "smtp")
SHAPES = ("refused", "frozen", "trickling", "partitioned", "slow DNS")
# The calls that touch each dependency (every call reads the database and counts in Redis).
TOUCHES = {
    "postgres": None,
    "redis": None,
    "s3": {"upload", "files", "delete"},
    "smtp": {"verify-email"},
}
MAIL_ENDPOINTS = {"verify-email"}
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
ORIGIN = "http://localhost:3000"
HEADERS = {"Accept": "application/json; version=v1", "Origin": ORIGIN}
JSON_HEADERS = {**HEADERS, "Content-Type": "application/json"}
# gunicorn's own words when it ends a worker the hard way.
KILLED_WORKER = re.compile(r"WORKER TIMEOUT|SIGKILL|Worker \(pid:\d+\) (exited|was sent)")
# Where the namespace's veth pair is numbered: one /30 out of 10.213.0.0/16.
PARTITION_NET = "10.213"


@dataclass
class Answer:
    """One HTTP call as the client saw it."""

    endpoint: str
    phase: tuple[str, str]
    elapsed: float
    status: int | None
    body: dict[str, Any] | None
    problem: str | None = None

    @property
    def call(self) -> str:
        """The endpoint called, whoever called it."""
        return self.endpoint.rpartition(" ")[2]

    @property
    def ok(self) -> bool:
        return self.status == 200 and (self.body or {}).get("status") == "success"

    @property
    def label(self) -> str:
        """The status code, with the business verdict of a 200 that is not a success."""
        if self.status is None:
            return "no answer"
        body = self.body or {}
        if self.status == 200 and body.get("status") != "success":
            return f"200 {body.get('code') or body.get('status')}"
        if self.status != 200 and body.get("error"):
            return f"{self.status} {body['error']}"
        return str(self.status)


@dataclass
class Recorder:
    """Every call made, which phase it began in, and what the run did to sessions and files."""

    api: str
    phase: tuple[str, str] = ("-", "steady")
    probe_session: str = ""
    answers: list[Answer] = field(default_factory=list)
    sessions: set[str] = field(default_factory=set)
    uploads: list[tuple[str, str]] = field(default_factory=list)
    deletes: dict[tuple[str, str], list[int | None]] = field(
        default_factory=lambda: defaultdict(list)
    )
    recoveries: dict[tuple[str, str], float | None] = field(default_factory=dict)
    # Where each upload attempt began and how it was answered, to explain a stray object.
    attempts: dict[tuple[str, str], str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def call(self, endpoint: str, method: str, path: str, **kwargs: Any) -> Answer:
        phase = self.phase
        started = time.monotonic()
        try:
            response = requests.request(
                method, f"{self.api}/{path}", timeout=CLIENT_TIMEOUT, **kwargs
            )
        except requests.RequestException as exc:
            answer = Answer(endpoint, phase, time.monotonic() - started, None, None, repr(exc))
        else:
            answer = Answer(endpoint, phase, time.monotonic() - started, response.status_code, None)
            try:
                body = response.json()
            except ValueError:
                kind = response.headers.get("Content-Type", "no content type")
                answer.problem = f"not JSON ({kind}): {response.text[:80]!r}"
            else:
                if isinstance(body, dict) and "status" in body:
                    answer.body = body
                else:
                    answer.problem = f"JSON without status: {response.text[:80]!r}"
        with self.lock:
            self.answers.append(answer)
        return answer

    def visit(self, tag: str) -> None:
        """One visit as the React client makes it: session, upload, list, e-mail, removal."""
        # A visit that fails at once must not turn into a tight loop of failing calls.
        time.sleep(PAUSE_BETWEEN_CALLS)
        issued = self.call("generate-uuid", "POST", "generate-uuid", headers=JSON_HEADERS)
        if not issued.ok:
            return
        session = issued.body["uuid"]  # type: ignore[index]
        with self.lock:
            self.sessions.add(session)
        time.sleep(PAUSE_BETWEEN_CALLS)
        self.call(
            "validate-uuid", "POST", "validate-uuid", json={"uuid": session}, headers=JSON_HEADERS
        )
        time.sleep(PAUSE_BETWEEN_CALLS)
        name = f"chaos-{tag}.pdf"
        uploaded = self.call(
            "upload",
            "POST",
            "upload",
            data={"session_uuid": session},
            files={"file": (name, PDF, "application/pdf")},
            headers=HEADERS,
        )
        with self.lock:
            self.attempts[(session, name)] = f"{uploaded.label} during {'/'.join(uploaded.phase)}"
            if uploaded.ok:
                self.uploads.append((session, name))
        time.sleep(PAUSE_BETWEEN_CALLS)
        self.call("files", "GET", f"session/{session}/files", headers=HEADERS)
        time.sleep(PAUSE_BETWEEN_CALLS)
        self.call(
            "verify-email",
            "POST",
            "email-verification/verify-email",
            json={"email": f"chaos-{tag}@example.org"},
            headers={**JSON_HEADERS, "X-Session-ID": session},
        )
        if uploaded.ok:
            time.sleep(PAUSE_BETWEEN_CALLS)
            deleted = self.call(
                "delete",
                "DELETE",
                "delete",
                json={"filename": name, "session_uuid": session},
                headers=JSON_HEADERS,
            )
            with self.lock:
                self.deletes[(session, name)].append(deleted.status)


class Probe:
    """The conductor's own calls: does a dependency serve again?"""

    def __init__(self, recorder: Recorder, session: str = "") -> None:
        self.recorder = recorder
        self.session = session

    def start(self) -> None:
        issued = self.recorder.call(
            "probe generate-uuid", "POST", "generate-uuid", headers=JSON_HEADERS
        )
        assert issued.ok, f"the service did not start serving: {issued}"
        self.session = self.recorder.probe_session = issued.body["uuid"]  # type: ignore[index]
        self.recorder.sessions.add(self.session)

    def serves(self, dependency: str) -> bool:
        """One call that needs ``dependency``; whether it succeeded."""
        call = self.recorder.call
        if dependency == "postgres":
            return call(
                "probe validate-uuid",
                "POST",
                "validate-uuid",
                json={"uuid": self.session},
                headers=JSON_HEADERS,
            ).ok
        if dependency == "s3":
            return call("probe files", "GET", f"session/{self.session}/files", headers=HEADERS).ok
        issued = call("probe generate-uuid", "POST", "generate-uuid", headers=JSON_HEADERS)
        if not issued.ok:
            return False
        session = issued.body["uuid"]  # type: ignore[index]
        with self.recorder.lock:
            self.recorder.sessions.add(session)
        if dependency == "redis":
            return True
        return call(
            "probe verify-email",
            "POST",
            "email-verification/verify-email",
            json={"email": f"probe-{uuid.uuid4().hex[:12]}@example.org"},
            headers={**JSON_HEADERS, "X-Session-ID": session},
        ).ok

    def recovery(self, dependency: str, restored_at: float) -> float | None:
        """Seconds from ``restored_at`` until a call needing ``dependency`` succeeds."""
        while time.monotonic() - restored_at < RECOVERY_LIMIT_SECONDS:
            if self.serves(dependency):
                return time.monotonic() - restored_at
            time.sleep(0.2)
        return None


# -- the database path through a network namespace ----------------------------------------------


@dataclass
class Partition:
    """A path to a TCP server across a veth pair whose packets can be dropped both ways."""

    host: str
    port: int
    namespace: str
    host_link: str
    namespace_link: str

    def drop(self) -> None:
        # netem is not in every kernel; a FIFO that holds no packet drops every one just the
        # same, silently, on each side's way out.
        _run("tc", "qdisc", "add", "dev", self.host_link, "root", "pfifo", "limit", "0")
        add = ["tc", "qdisc", "add", "dev", self.namespace_link, "root", "pfifo", "limit", "0"]
        _run(*self._in_namespace(*add))

    def heal(self) -> None:
        _run("tc", "qdisc", "del", "dev", self.host_link, "root", check=False)
        delete = ["tc", "qdisc", "del", "dev", self.namespace_link, "root"]
        _run(*self._in_namespace(*delete), check=False)

    def _in_namespace(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *command]


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), capture_output=True, text=True, check=check, timeout=30)


def partition_unavailable() -> str | None:
    """Why this machine cannot drop packets in a namespace, or None if it can."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "needs ip and tc (iproute2)"
    name = f"chaos-probe-{uuid.uuid4().hex[:6]}"
    link = f"chp{uuid.uuid4().hex[:6]}"
    try:
        if _run("ip", "netns", "add", name, check=False).returncode != 0:
            return "ip netns add is not permitted here"
        if _run("ip", "link", "add", link, "type", "dummy", check=False).returncode != 0:
            _run("ip", "link", "add", link, "type", "veth", "peer", "name", link + "p", check=False)
        qdisc = _run("tc", "qdisc", "add", "dev", link, "root", "pfifo", "limit", "0", check=False)
        if qdisc.returncode != 0:
            return f"tc cannot add a qdisc: {qdisc.stderr.strip()}"
        return None
    finally:
        _run("ip", "link", "del", link, check=False)
        _run("ip", "netns", "del", name, check=False)


@contextmanager
def partitionable(upstream_host: str, upstream_port: int) -> Iterator[Partition]:
    """A relay inside a fresh namespace, reached over a veth pair, leading to the upstream.

    app -> veth -> relay in the namespace -> veth -> relay on the host -> upstream. The upstream
    (PostgreSQL on 127.0.0.1) is out of the namespace's reach, hence the relay on the host end
    of the pair. The namespace, the pair and both relays go when the block ends, however it ends.
    """
    suffix = uuid.uuid4().hex[:6]
    namespace, host_link, namespace_link = f"chaos-{suffix}", f"chx{suffix}h", f"chx{suffix}n"
    subnet = random.randrange(0, 256)
    host_ip, namespace_ip = f"{PARTITION_NET}.{subnet}.1", f"{PARTITION_NET}.{subnet}.2"
    relay: subprocess.Popen[str] | None = None
    with ExitStack() as cleanup:
        cleanup.callback(_run, "ip", "link", "del", host_link, check=False)
        cleanup.callback(_run, "ip", "netns", "del", namespace, check=False)
        _run("ip", "netns", "add", namespace)
        _run("ip", "link", "add", host_link, "type", "veth", "peer", "name", namespace_link)
        _run("ip", "link", "set", namespace_link, "netns", namespace)
        _run("ip", "addr", "add", f"{host_ip}/30", "dev", host_link)
        _run("ip", "link", "set", host_link, "up")
        _run("ip", "-n", namespace, "addr", "add", f"{namespace_ip}/30", "dev", namespace_link)
        _run("ip", "-n", namespace, "link", "set", namespace_link, "up")
        _run("ip", "-n", namespace, "link", "set", "lo", "up")
        host_side = cleanup.enter_context(
            FaultProxy(upstream_host, upstream_port, listen_host=host_ip, name="partition-host")
        )
        relay_command = [sys.executable, "-m", "tests.fault_proxy", namespace_ip, "0", host_ip]
        # iproute2's ip, found on PATH as an operator would type it.
        relay = subprocess.Popen(
            ["ip", "netns", "exec", namespace, *relay_command, str(host_side.port)],  # noqa: S607
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        cleanup.callback(_stop, relay)
        assert relay.stdout is not None
        port = int(relay.stdout.readline())
        partition = Partition(namespace_ip, port, namespace, host_link, namespace_link)
        cleanup.callback(partition.heal)
        yield partition


def _stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


# -- a resolver whose answers can be slowed -----------------------------------------------------


class SlowResolver:
    """A DNS server for names under ``chaos.test``: each is 127.0.0.1, answered at once or slowly.

    Name resolution ignores socket timeouts, so a slow resolver holds a connect for as long as
    it likes; only a deadline enforced around the whole call bounds it.
    """

    DOMAIN = "chaos.test"

    def __init__(self) -> None:
        self.slow: set[str] = set()
        self.address = f"127.53.{random.randrange(1, 255)}.{random.randrange(1, 255)}"
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._stop = threading.Event()
        self._timers: list[threading.Timer] = []
        self._thread = threading.Thread(target=self._serve, name="slow-resolver", daemon=True)

    def __enter__(self) -> SlowResolver:
        # glibc asks port 53 and no other.
        self._socket.bind((self.address, 53))
        self._socket.settimeout(0.1)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for timer in self._timers:
            timer.cancel()
            timer.join(timeout=5)
        self._socket.close()

    def resolv_conf(self, directory: Path) -> Path:
        """A resolv.conf that asks only this server and waits as long as it takes."""
        path = directory / "resolv.conf"
        path.write_text(f"nameserver {self.address}\noptions timeout:30 attempts:1\n")
        return path

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, client = self._socket.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                return
            parsed = _dns_answer(query, self.DOMAIN)
            if parsed is None:
                continue
            name, reply = parsed
            if any(name == slow or name.endswith("." + slow) for slow in self.slow):
                timer = threading.Timer(DNS_DELAY_SECONDS, self._reply, (reply, client))
                timer.daemon = True
                self._timers.append(timer)
                timer.start()
            else:
                self._reply(reply, client)

    def _reply(self, reply: bytes, client: tuple[str, int]) -> None:
        with suppress(OSError):
            self._socket.sendto(reply, client)


def _dns_answer(query: bytes, domain: str) -> tuple[str, bytes] | None:
    """The name asked and the reply: 127.0.0.1 for an A record under ``domain``, else none."""
    if len(query) < 12:
        return None
    position, labels = 12, []
    while position < len(query) and (length := query[position]):
        labels.append(query[position + 1 : position + 1 + length].decode(errors="replace"))
        position += 1 + length
    question_end = position + 5
    if question_end > len(query):
        return None
    (qtype,) = struct.unpack(">H", query[position + 1 : position + 3])
    name = ".".join(labels).lower()
    ours = name == domain or name.endswith("." + domain)
    flags = 0x8000 | 0x0400 | 0x0080 | (query[2] << 8 & 0x0100) | (0 if ours else 3)
    answers = b""
    if ours and qtype == 1:
        answers = struct.pack(">HHHIH", 0xC00C, 1, 1, 0, 4) + socket.inet_aton("127.0.0.1")
    header = query[:2] + struct.pack(">HHHHH", flags, 1, 1 if answers else 0, 0, 0)
    return name, header + query[12:question_end] + answers


def slow_dns_unavailable() -> str | None:
    """Why the app cannot be served behind its own resolver here, or None if it can."""
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("unshare"):
        return "needs root, Linux and unshare (a private /etc/resolv.conf for gunicorn)"
    probe = _run(
        "unshare", "--mount", "--", "mount", "--bind", "/dev/null", "/etc/resolv.conf", check=False
    )
    if probe.returncode != 0:
        return f"cannot bind-mount resolv.conf in a mount namespace: {probe.stderr.strip()}"
    return None


def _gunicorn_behind(resolv_conf: Path, env: dict[str, str], output: Path) -> Any:
    """``gunicorn wsgi:app`` as gunicorn_process serves it, resolving names through
    ``resolv_conf`` (bind-mounted in a private mount namespace, so nothing else sees it)."""
    port = free_port()
    env = {
        **env,
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": str(WORKERS),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "CHAOS_RESOLV_CONF": str(resolv_conf),
    }
    # exec keeps one process: terminating it stops the gunicorn master.
    script = 'mount --bind "$CHAOS_RESOLV_CONF" /etc/resolv.conf && exec gunicorn wsgi:app'
    command = ["unshare", "--mount", "--", "sh", "-c", script]
    return _serving(command, env, f"http://127.0.0.1:{port}", "/health", output)


# -- the test -----------------------------------------------------------------------------------


def test_the_service_rides_out_every_dependency_failing_in_turn(
    fresh_database: str, redis_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    database = make_url(fresh_database)
    redis_target = urlsplit(redis_url)
    moto = urlsplit(s3_endpoint)
    storage = s3_env(s3_endpoint)
    no_partition = partition_unavailable()
    no_dns = slow_dns_unavailable()

    with ExitStack() as stack:
        port, inbox = stack.enter_context(smtp_server())
        resolver = stack.enter_context(SlowResolver()) if no_dns is None else None
        # With the resolver, the app finds each proxy by its own name, which can be slowed alone.
        # The names start with "localhost": moto takes the first label of any other name in the
        # Host header for a bucket name.
        hosts = {
            dependency: f"localhost.{dependency}.{SlowResolver.DOMAIN}" if resolver else "127.0.0.1"
            for dependency in DEPENDENCIES
        }
        if no_partition is None:
            path = stack.enter_context(
                partitionable(database.host or "127.0.0.1", database.port or 5432)
            )
            partition: Partition | None = path
            # The fault proxy stands before the path: its faults reach the app as they would
            # without the namespace, and the drops happen on the veth pair behind it.
            pg_upstream = (path.host, path.port)
        else:
            partition = None
            pg_upstream = (database.host or "127.0.0.1", database.port or 5432)
        proxies = {
            "postgres": FaultProxy(*pg_upstream, name="pg-proxy"),
            "redis": FaultProxy(
                redis_target.hostname or "127.0.0.1", redis_target.port or 6379, name="redis-proxy"
            ),
            "s3": FaultProxy(moto.hostname or "127.0.0.1", moto.port or 80, name="s3-proxy"),
            "smtp": FaultProxy("127.0.0.1", port, name="smtp-proxy"),
        }
        for proxy in proxies.values():
            stack.enter_context(proxy)

        direct = _production_env(fresh_database, redis_url, storage, port)
        env = {
            **direct,
            "DATABASE_URL": database.set(
                host=hosts["postgres"], port=proxies["postgres"].port
            ).render_as_string(hide_password=False),
            "RATELIMIT_STORAGE_URI": redis_url.replace(
                redis_target.netloc, f"{hosts['redis']}:{proxies['redis'].port}"
            ),
            "S3_ENDPOINT_URL": f"http://{hosts['s3']}:{proxies['s3'].port}",
            "SMTP_HOST": hosts["smtp"],
            "SMTP_PORT": str(proxies["smtp"].port),
        }
        operator(direct, "flask", "--app", "wsgi", "db", "upgrade")

        log = tmp_path / "gunicorn.log"
        if resolver is None:
            serving = gunicorn_process(
                "wsgi:app", env, workers=WORKERS, probe_path="/health", output=log
            )
        else:
            serving = _gunicorn_behind(resolver.resolv_conf(tmp_path), env, log)
        served: Served = stack.enter_context(serving)
        recorder = Recorder(f"{served.url}/api/v1")
        probe = Probe(recorder)
        probe.start()
        started = time.monotonic()
        with _load(recorder):
            time.sleep(STEADY_SECONDS)
            for dependency in DEPENDENCIES:
                _break_in_turn(dependency, proxies[dependency], recorder, probe)
                if resolver is not None:
                    _slow_dns(
                        resolver,
                        dependency,
                        hosts[dependency],
                        proxies[dependency],
                        recorder,
                        probe,
                    )
            if partition is not None:
                _partition_database(partition, recorder, probe)
            recorder.phase = ("-", "steady")
            time.sleep(STEADY_SECONDS)
        duration = time.monotonic() - started
        # Stopping gunicorn first: nothing may change the data while it is checked.
        stack.close()

        problems = _check_server_log(log.read_text())
        problems += _check_answers(recorder)
        data_problems, checked = _check_data(
            recorder, direct, fresh_database, storage["S3_BUCKET"], s3_endpoint
        )
        problems += data_problems
        print(
            _table(
                recorder,
                {"partitioned": no_partition, "slow DNS": no_dns},
                duration,
                len(inbox.messages),
            )
        )
        print(checked)
        assert not problems, "\n".join(problems)


def _production_env(
    database_url: str, redis_url: str, storage: dict[str, str], smtp_port: int
) -> dict[str, str]:
    """Production settings reaching every dependency directly (the operator's CLI uses these)."""
    generous = "100000/minute"
    return {
        "APP_ENV": "production",
        "SECRET_KEY": "chaos-test-secret-" + uuid.uuid4().hex,
        "DATABASE_URL": database_url,
        "RATELIMIT_STORAGE_URI": redis_url,
        "RATELIMIT_KEY_PREFIX": f"chaos-{RUN_ID}-{uuid.uuid4().hex[:6]}",
        "CORS_ORIGINS": ORIGIN,
        **storage,
        "MAIL_BACKEND": "smtp",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_port),
        "SMTP_STARTTLS": "false",
        "MAIL_FROM": "verify@chat.example",
        "METRICS_TOKEN": "chaos-scraper-" + uuid.uuid4().hex,
        "SCHEDULER_ENABLED": "false",
        "GUNICORN_TIMEOUT": str(GUNICORN_TIMEOUT),
        "REQUEST_DEADLINE_SECONDS": str(REQUEST_DEADLINE_SECONDS),
        # Load must meet the faults, never a rate limit.
        "SESSION_RATE_LIMIT": generous,
        "RESUME_RATE_LIMIT": generous,
        "RESUME_IP_RATE_LIMIT": generous,
        "SESSION_RESOURCE_RATE_LIMIT": generous,
        "UPLOAD_RATE_LIMIT": generous,
        "EMAIL_RATE_LIMIT": generous,
        "ORPHAN_MIN_AGE_MINUTES": "0",
    }


@contextmanager
def _load(recorder: Recorder) -> Iterator[None]:
    """CLIENTS threads making visits until the block ends; all joined before it returns."""
    stop = threading.Event()

    def client(number: int) -> None:
        visit = 0
        while not stop.is_set():
            visit += 1
            recorder.visit(f"{number}-{visit}")

    threads = [
        threading.Thread(target=client, args=(number,), name=f"chaos-client-{number}")
        for number in range(CLIENTS)
    ]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            # A visit is at most six calls, each bounded by the client's timeout.
            thread.join(timeout=6 * CLIENT_TIMEOUT[1])


def _break_in_turn(dependency: str, proxy: FaultProxy, recorder: Recorder, probe: Probe) -> None:
    """Refuse, restore; freeze, trickle, restore; each restore followed by a recovery probe."""
    _fault(recorder, proxy, dependency, "refused", "refuse", REFUSED_SECONDS)
    _restore(recorder, probe, dependency, "refused", lambda: setattr(proxy, "mode", "pass"))
    _fault(recorder, proxy, dependency, "frozen", "freeze", FROZEN_SECONDS)
    _fault(recorder, proxy, dependency, "trickling", "trickle", TRICKLE_SECONDS)
    _restore(recorder, probe, dependency, "trickling", lambda: setattr(proxy, "mode", "pass"))


def _fault(
    recorder: Recorder, proxy: FaultProxy, dependency: str, shape: str, mode: str, seconds: float
) -> None:
    recorder.phase = (dependency, shape)
    proxy.mode = mode
    _observe(recorder, dependency, seconds)


def _observe(recorder: Recorder, dependency: str, seconds: float) -> None:
    """Let a fault last ``seconds``, with at least one call that needs the dependency in it.

    The clients may all be held by calls begun in the phase before; the conductor's own call
    makes sure every cell of the table has an observation.
    """
    started = time.monotonic()
    Probe(recorder, recorder.probe_session).serves(dependency)
    time.sleep(max(0.0, seconds - (time.monotonic() - started)))


def _restore(
    recorder: Recorder, probe: Probe, dependency: str, shape: str, restore: Callable[[], None]
) -> None:
    restore()
    restored_at = time.monotonic()
    recorder.phase = (dependency, "recovery")
    recorder.recoveries[(dependency, shape)] = probe.recovery(dependency, restored_at)


def _slow_dns(
    resolver: SlowResolver,
    dependency: str,
    name: str,
    proxy: FaultProxy,
    recorder: Recorder,
    probe: Probe,
) -> None:
    """Slow the lookups of one dependency's name, and cut its connections so the app looks it up."""
    recorder.phase = (dependency, "slow DNS")
    resolver.slow.add(name)
    proxy.cut()
    _observe(recorder, dependency, SLOW_DNS_SECONDS)
    _restore(recorder, probe, dependency, "slow DNS", lambda: resolver.slow.discard(name))


def _partition_database(partition: Partition, recorder: Recorder, probe: Probe) -> None:
    recorder.phase = ("postgres", "partitioned")
    partition.drop()
    try:
        _observe(recorder, "postgres", PARTITION_SECONDS)
    finally:
        partition.heal()
    _restore(recorder, probe, "postgres", "partitioned", lambda: None)


# -- checks -------------------------------------------------------------------------------------


def _check_server_log(text: str) -> list[str]:
    """No worker was killed, and each one booted once."""
    problems = [
        f"gunicorn ended a worker: {line}"
        for line in text.splitlines()
        if KILLED_WORKER.search(line)
    ]
    boots = text.count("Booting worker")
    if boots != WORKERS:
        problems.append(f"{boots} worker boots for {WORKERS} workers: some worker was replaced")
    return problems


def _check_answers(recorder: Recorder) -> list[str]:
    """Every call got a JSON body, in time; every restore was followed by a success in time."""
    problems = []
    limit = REQUEST_DEADLINE_SECONDS + SLACK_SECONDS
    for answer in recorder.answers:
        where = f"{answer.endpoint} during {'/'.join(answer.phase)}"
        if answer.problem is not None:
            problems.append(f"{where}: {answer.label}: {answer.problem}")
        if answer.call in MAIL_ENDPOINTS and answer.status is not None and answer.status >= 500:
            # CONTRACT.md 4 and 6: the frontend throws on a 5xx from these screens and shows
            # nothing; a dependency that fails costs a 200 status:"error" with a sentence.
            problems.append(f"{where}: {answer.label}, where the e-mail screens need a 200")
        if answer.elapsed > limit:
            problems.append(f"{where}: {answer.label} after {answer.elapsed:.1f} s (> {limit} s)")
    for (dependency, shape), recovered in recorder.recoveries.items():
        if recovered is None:
            problems.append(
                f"{dependency} after {shape}: no success within {RECOVERY_LIMIT_SECONDS} s "
                "of the restore"
            )
    if not any(answer.ok for answer in recorder.answers if answer.phase[1] == "steady"):
        problems.append("no call succeeded in steady state: the load did not run")
    return problems


def _check_data(
    recorder: Recorder, env: dict[str, str], database_url: str, bucket: str, s3_endpoint: str
) -> tuple[list[str], str]:
    """Sessions, files and audit rows agree with what the clients were told, before and after
    the orphan sweep."""
    problems = []
    rows, retired, audits = _database_state(database_url)
    registered = {
        session for event, session, _ in audits if event in ("uuid_generated", "uuid_registered")
    }
    for session in sorted(recorder.sessions - rows - retired):
        problems.append(f"session {session} was answered 200 but has no row")
    for session in sorted(rows - registered):
        problems.append(f"session {session} has a row but no registration audit row")
    for session in sorted(registered - rows - retired):
        problems.append(f"session {session} has a registration audit row but no row")

    refs = _file_refs(
        env["SECRET_KEY"],
        {name for _, name in recorder.uploads} | {name for _, name in recorder.deletes},
    )
    by_ref = {ref: name for name, ref in refs.items()}
    uploaded = {
        (s, by_ref.get(str(d.get("file_ref")), "?")) for e, s, d in audits if e == "file_uploaded"
    }
    deleted = {
        (s, by_ref.get(str(d.get("file_ref")), "?")) for e, s, d in audits if e == "file_deleted"
    }

    objects = _objects(s3_endpoint, bucket)
    for session, name in recorder.uploads:
        if (session, name) not in uploaded:
            problems.append(f"upload {session}/{name} answered 200 without a file_uploaded row")
        attempts = recorder.deletes.get((session, name), [])
        if not attempts and (session, name) not in objects:
            problems.append(f"upload {session}/{name} answered 200 but its object is gone")
    for (session, name), statuses in recorder.deletes.items():
        if 200 in statuses:
            if (session, name) not in deleted:
                problems.append(f"delete {session}/{name} answered 200 without a file_deleted row")
            if (session, name) in objects:
                problems.append(f"delete {session}/{name} answered 200 but the object remains")
    for session, name in sorted(uploaded - deleted - objects):
        problems.append(f"{session}/{name} audited as uploaded, never deleted, but not stored")
    for session, name in sorted(deleted & objects):
        problems.append(f"{session}/{name} audited as deleted but still stored")

    swept = operator(env, "flask", "--app", "wsgi", "cleanup", "orphans")
    remaining = _objects(s3_endpoint, bucket)
    for session, name in sorted(remaining):
        if session not in rows:
            problems.append(f"object {session}/{name} outlived the orphan sweep without a session")
        elif (session, name) not in uploaded:
            problems.append(
                f"object {session}/{name} is stored without a file_uploaded row (its upload: "
                f"{recorder.attempts.get((session, name), 'unknown')})"
            )
    summary = json.loads(swept.stdout)
    checked = (
        f"Checked: {len(recorder.sessions)} sessions answered 200 ({len(rows)} rows, "
        f"{len(audits)} audit rows); {len(recorder.uploads)} uploads and "
        f"{sum(200 in statuses for statuses in recorder.deletes.values())} deletions answered "
        f"200; {len(objects)} objects before the orphan sweep, {len(remaining)} after "
        f"(sweep: {summary.get('objects_deleted')} objects deleted, "
        f"{summary.get('errors')} errors)."
    )
    return problems, checked


def _database_state(
    database_url: str,
) -> tuple[set[str], set[str], list[tuple[str, str, dict[str, Any]]]]:
    """Live session UUIDs, retired UUIDs and (event, session, details) of every audit row."""
    dsn = make_url(database_url).render_as_string(hide_password=False)
    with closing(psycopg2.connect(dsn)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT uuid::text FROM chat_sessions")
        rows = {row[0] for row in cursor.fetchall()}
        cursor.execute("SELECT uuid::text FROM retired_session_uuids")
        retired = {row[0] for row in cursor.fetchall()}
        cursor.execute("SELECT event_type, session_uuid::text, details FROM audit_events")
        audits = [
            (event, session, details if isinstance(details, dict) else json.loads(details or "{}"))
            for event, session, details in cursor.fetchall()
        ]
    return rows, retired, audits


def _file_refs(secret_key: str, names: set[str]) -> dict[str, str]:
    """The audit trail's reference for each file name, computed by the app's own function."""
    holder = Flask(__name__)
    holder.config["SECRET_KEY"] = secret_key
    with holder.app_context():
        return {name: file_ref(name) for name in names}


def _objects(endpoint: str, bucket: str) -> set[tuple[str, str]]:
    """(session, file name) of every object under uploads/ in the bucket."""
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    found = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="uploads/"):
        for item in page.get("Contents", []):
            _, session, name = item["Key"].split("/", 2)
            found.add((session, name))
    return found


# -- the report ---------------------------------------------------------------------------------


def _table(recorder: Recorder, not_run: dict[str, str | None], duration: float, mails: int) -> str:
    """A markdown table: per dependency and failure shape, what the clients saw."""
    lines = [
        "",
        f"Chaos run: {len(recorder.answers)} calls in {duration:.0f} s, {WORKERS} workers, "
        f"request deadline {REQUEST_DEADLINE_SECONDS} s, GUNICORN_TIMEOUT {GUNICORN_TIMEOUT} s, "
        f"{mails} mails delivered.",
        "",
        "| Dependency | Failure | Calls that need it: answers | Worst answer (any call) "
        "| Back to 200 after restore |",
        "|---|---|---|---|---|",
    ]
    for dependency in DEPENDENCIES:
        for shape in SHAPES:
            lines.append(_row(recorder, dependency, shape, not_run.get(shape)))
    return "\n".join(lines)


def _row(recorder: Recorder, dependency: str, shape: str, not_run: str | None) -> str:
    answers = [answer for answer in recorder.answers if answer.phase == (dependency, shape)]
    if not answers:
        if not_run:
            reason = f"not run: {not_run}"
        elif shape == "partitioned":
            reason = "not measured (only the database is partitioned)"
        else:
            reason = "no call began in this phase"
        return f"| {dependency} | {shape} | {reason} | | |"
    needs = TOUCHES[dependency]
    relevant = [answer for answer in answers if needs is None or answer.call in needs]
    counts = Counter(answer.label for answer in relevant)
    summary = ", ".join(f"{label} x{count}" for label, count in sorted(counts.items()))
    worst = max(answer.elapsed for answer in answers)
    key = (dependency, "trickling" if shape == "frozen" else shape)
    recovered = recorder.recoveries.get(key)
    if shape == "frozen":
        back = "after the trickle (next row)"
    elif recovered is None:
        back = "not within limit" if key in recorder.recoveries else ""
    else:
        back = f"{recovered:.1f} s"
    return f"| {dependency} | {shape} | {summary or '—'} | {worst:.1f} s | {back} |"
