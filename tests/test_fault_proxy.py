"""The fault proxy in front of an echo server: each mode seen from the client's side."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.fault_proxy import FaultProxy


@contextmanager
def echo_server(greeting: bytes = b"") -> Iterator[int]:
    """A TCP server that sends ``greeting``, then echoes until the client's FIN; yields its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.1)
    stop = threading.Event()
    workers: list[threading.Thread] = []

    def echo(connection: socket.socket) -> None:
        with connection:
            connection.settimeout(0.1)
            try:
                connection.sendall(greeting)
                while not stop.is_set():
                    try:
                        data = connection.recv(65536)
                    except TimeoutError:
                        continue
                    if not data:
                        return
                    connection.sendall(data)
            except OSError:
                return

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            worker = threading.Thread(target=echo, args=(connection,), daemon=True)
            workers.append(worker)
            worker.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        acceptor.join(timeout=5)
        for worker in workers:
            worker.join(timeout=5)
        listener.close()


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    with echo_server() as port, FaultProxy("127.0.0.1", port) as fault_proxy:
        yield fault_proxy
    assert fault_proxy.threads == [], "a proxy thread outlived the context manager"


def connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection((proxy.host, proxy.port), timeout=5)
    sock.settimeout(5)
    return sock


def receive(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes (fewer only if the peer closes first)."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def nothing_arrives(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        sock.recv(1)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(5)
    return False


def was_reset(sock: socket.socket) -> bool:
    """Whether the peer has closed ``sock`` (reset or FIN), seen by a read and a write."""
    try:
        if sock.recv(1) == b"":
            return True
        sock.sendall(b"x")
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def turned_away(proxy: FaultProxy) -> bool:
    """Whether a new connection is reset before any byte, at connect or on first use."""
    try:
        sock = connect(proxy)
    except ConnectionError:
        return True
    with sock:
        return was_reset(sock)


def test_pass_relays_a_large_exchange_intact_both_ways(proxy: FaultProxy) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    with connect(proxy) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        echoed = receive(sock, len(payload))
        sender.join()
        # The client's FIN reaches the server; the server's close reaches the client.
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
    assert echoed == payload


def test_freeze_holds_both_directions_of_open_and_new_connections_then_resumes(
    proxy: FaultProxy,
) -> None:
    with connect(proxy) as before:
        before.sendall(b"ping")
        assert receive(before, 4) == b"ping"
        proxy.mode = "freeze"
        before.sendall(b"held")
        with connect(proxy) as during:
            during.sendall(b"new")
            assert nothing_arrives(before, 0.5)
            assert nothing_arrives(during, 0.2)
            assert proxy.bytes_up == 4, "nothing reached the server while frozen"
            proxy.mode = "pass"
            # Nothing was lost: the held bytes flow as soon as the proxy thaws.
            assert receive(before, 4) == b"held"
            assert receive(during, 3) == b"new"


def test_trickle_delivers_answers_one_byte_at_a_time_and_requests_at_full_speed() -> None:
    with (
        echo_server() as port,
        FaultProxy("127.0.0.1", port, trickle_interval=0.2) as proxy,
        connect(proxy) as sock,
    ):
        proxy.mode = "trickle"
        started = time.monotonic()
        sock.sendall(b"abcdef")
        assert receive(sock, 1) == b"a"
        first = time.monotonic() - started
        assert proxy.bytes_up == 6, "the request went through at once"
        assert receive(sock, 5) == b"bcdef"
        elapsed = time.monotonic() - started
        proxy.mode = "pass"
        sock.sendall(b"x" * 1000)
        fast_started = time.monotonic()
        assert receive(sock, 1000) == b"x" * 1000
        fast = time.monotonic() - fast_started
    assert first < 0.5
    # Five more bytes at one per 0.2 s.
    assert 0.9 < elapsed < 3.0
    assert fast < 1.0


def test_refuse_resets_open_connections_and_every_new_one(proxy: FaultProxy) -> None:
    with connect(proxy) as before:
        before.sendall(b"ping")
        assert receive(before, 4) == b"ping"
        proxy.mode = "refuse"
        assert was_reset(before)
    for _ in range(2):
        assert turned_away(proxy)
    assert proxy.refused == 2
    proxy.mode = "pass"
    with connect(proxy) as after:
        after.sendall(b"back")
        assert receive(after, 4) == b"back"


def test_cut_resets_open_connections_once_and_then_relays_again(proxy: FaultProxy) -> None:
    with connect(proxy) as first, connect(proxy) as second:
        first.sendall(b"1")
        second.sendall(b"2")
        assert receive(first, 1) + receive(second, 1) == b"12"
        proxy.mode = "cut"
        assert proxy.mode == "pass"
        assert was_reset(first)
        assert was_reset(second)
    assert proxy.open_connections == 0
    with connect(proxy) as after:
        after.sendall(b"again")
        assert receive(after, 5) == b"again"


def test_a_greeting_from_the_server_waits_out_a_freeze_as_an_smtp_banner_would() -> None:
    with echo_server(greeting=b"220 ready\r\n") as port, FaultProxy("127.0.0.1", port) as proxy:
        proxy.mode = "freeze"
        with connect(proxy) as sock:
            assert nothing_arrives(sock, 0.3)
            proxy.mode = "pass"
            assert receive(sock, 11) == b"220 ready\r\n"


def test_an_unreachable_upstream_resets_the_client_and_close_ends_every_thread() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    with FaultProxy("127.0.0.1", dead_port) as proxy:
        # The reset may come while the client is still connecting, or on its first read.
        try:
            sock = connect(proxy)
        except ConnectionResetError:
            reset = True
        else:
            with sock:
                reset = was_reset(sock)
    assert reset
    assert proxy.threads == []


def test_close_ends_connections_held_open_in_every_mode() -> None:
    with echo_server() as port:
        proxy = FaultProxy("127.0.0.1", port).start()
        clients = []
        for mode in ("pass", "freeze", "trickle"):
            proxy.mode = mode
            clients.append(connect(proxy))
        proxy.mode = "freeze"
        started = time.monotonic()
        proxy.close()
        assert time.monotonic() - started < 2
        assert proxy.threads == []
        for sock in clients:
            assert was_reset(sock)
            sock.close()


def test_an_unknown_mode_is_refused(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        proxy.mode = "flaky"
