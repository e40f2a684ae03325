"""A TCP proxy in front of any dependency that can freeze, trickle, refuse or cut its traffic.

It relays bytes and knows no protocol, so it stands as well in front of PostgreSQL, Redis,
SMTP as of an HTTP (S3) server. The mode can be changed at any moment and applies at once to
the connections already open as well as to new ones:

- ``pass``: relay both ways.
- ``freeze``: accept new connections (and open their upstream side), relay nothing either way,
  keep every connection open. Nothing is read, so nothing is lost: bytes wait in the socket
  buffers and flow on once the mode changes back, as after a peer that was stopped and resumed.
- ``trickle``: relay upstream to client one byte every ``trickle_interval`` seconds (0.5 s by
  default), client to upstream at full speed. Only the answers are slowed: that is the case a
  per-read socket timeout never catches (each read gets its byte in time), while slowing the
  requests too would mostly look like a freeze to the client.
- ``refuse``: connections open at the moment are reset; new ones are accepted and reset at once,
  before any byte, which the client sees as the peer resetting the connection.
- ``cut``: reset the connections open at the moment, once; the proxy then relays again
  (``mode`` reads ``pass`` afterwards), so the client's next connection works.

Reset means a TCP RST (``SO_LINGER`` 0): the client learns of it on its next read or write, as
from a restarted server or a firewall that forgot the flow.

Run as ``python -m tests.fault_proxy LISTEN_HOST LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT`` it
relays in ``pass`` mode until SIGTERM or SIGINT, and prints its port once it listens.
"""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import struct
import sys
import threading
import time
from types import TracebackType

MODES = ("pass", "freeze", "trickle", "refuse", "cut")
# How often each connection looks at the mode (and at a request to reset it): a change takes
# effect within this time, and close() ends every thread within it.
POLL_SECONDS = 0.05
CHUNK = 64 * 1024
# A connection stops reading from one side while this much waits for the other.
MAX_PENDING = 256 * 1024
UPSTREAM_CONNECT_TIMEOUT = 5.0


def _reset(sock: socket.socket | None) -> None:
    """Close ``sock`` with a TCP RST instead of an orderly FIN."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Connection:
    """One client connection and its upstream side, served by one thread."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        # Set by the controlling thread; the serving thread resets both sides when it sees it.
        self.reset_requested = threading.Event()
        self.thread: threading.Thread | None = None


class FaultProxy:
    """Relays TCP from a loopback port to ``upstream_host:upstream_port``, faults on demand."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        trickle_interval: float = 0.5,
        name: str = "fault-proxy",
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.trickle_interval = trickle_interval
        self.name = name
        self._listen = (listen_host, listen_port)
        self._mode = "pass"
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: set[_Connection] = set()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._serial = 0
        # Counters a test can read: connections accepted and relayed, reset on arrival, and
        # bytes delivered each way.
        self.accepted = 0
        self.refused = 0
        self.bytes_up = 0
        self.bytes_down = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Listen and start accepting; returns the proxy."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(self._listen)
        listener.listen(128)
        self._listener = listener
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"{self.name}-accept", daemon=True
        )
        self._acceptor.start()
        return self

    def close(self) -> None:
        """Stop accepting, reset every connection and wait for every thread to end."""
        self._stopping.set()
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.reset_requested.set()
        for connection in connections:
            if connection.thread is not None:
                # A thread still opening its upstream side ends when that connect gives up.
                connection.thread.join(timeout=UPSTREAM_CONNECT_TIMEOUT + 5)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def host(self) -> str:
        return self._listen[0]

    @property
    def port(self) -> int:
        assert self._listener is not None, "the proxy is not started"
        return int(self._listener.getsockname()[1])

    @property
    def threads(self) -> list[threading.Thread]:
        """The proxy's threads still alive (to check that none outlives it)."""
        with self._lock:
            threads = [c.thread for c in self._connections if c.thread is not None]
        if self._acceptor is not None:
            threads.append(self._acceptor)
        return [thread for thread in threads if thread.is_alive()]

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    # -- modes -------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        if mode in ("refuse", "cut"):
            # Refuse first, so no connection slips in between the cut and the mode change.
            self._mode = "refuse" if mode == "refuse" else self._mode
            self.cut()
            if mode == "cut":
                self._mode = "pass"
            return
        self._mode = mode

    def cut(self) -> int:
        """Reset every connection open now; returns how many there were."""
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.reset_requested.set()
        # Wait (briefly) until they are gone, so the caller can rely on the cut having happened.
        deadline = time.monotonic() + 2
        for connection in connections:
            if connection.thread is not None:
                connection.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        return len(connections)

    # -- relaying ----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            readable, _, _ = select.select([self._listener], [], [], POLL_SECONDS)
            if not readable:
                continue
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            if self._mode == "refuse":
                self.refused += 1
                _reset(client)
                continue
            connection = _Connection(client)
            with self._lock:
                self._serial += 1
                self.accepted += 1
                self._connections.add(connection)
                connection.thread = threading.Thread(
                    target=self._serve,
                    args=(connection,),
                    name=f"{self.name}-conn-{self._serial}",
                    daemon=True,
                )
            connection.thread.start()

    def _serve(self, connection: _Connection) -> None:
        try:
            self._relay(connection)
        finally:
            with self._lock:
                self._connections.discard(connection)

    def _relay(self, connection: _Connection) -> None:
        client = connection.client
        try:
            upstream = socket.create_connection(self.upstream, timeout=UPSTREAM_CONNECT_TIMEOUT)
        except OSError:
            _reset(client)
            return
        connection.upstream = upstream
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Bytes read from one side, waiting to be written to the other.
        to_upstream = bytearray()
        to_client = bytearray()
        client_done = upstream_done = False  # that side sent its FIN
        client_shut = upstream_shut = False  # the FIN was passed on to the other side
        next_drip = 0.0

        while True:
            if connection.reset_requested.is_set() or self._stopping.is_set():
                _reset(client)
                _reset(upstream)
                return
            mode = self._mode
            if mode == "freeze" or mode == "refuse":
                # "refuse" is only seen between the mode change and the reset it requests.
                time.sleep(POLL_SECONDS)
                continue
            trickling = mode == "trickle"
            now = time.monotonic()
            readers = []
            if not client_done and len(to_upstream) < MAX_PENDING:
                readers.append(client)
            if not upstream_done and len(to_client) < MAX_PENDING:
                readers.append(upstream)
            writers = []
            if to_upstream:
                writers.append(upstream)
            wait = POLL_SECONDS
            if to_client:
                if not trickling or now >= next_drip:
                    writers.append(client)
                else:
                    wait = min(wait, next_drip - now)
            try:
                readable, writable, _ = select.select(readers, writers, [], wait)
                # The mode may have changed while waiting; freeze must not let a byte through.
                if self._mode in ("freeze", "refuse") or connection.reset_requested.is_set():
                    continue
                for sock in readable:
                    data = sock.recv(CHUNK)
                    if sock is client:
                        client_done = not data
                        to_upstream += data
                    else:
                        upstream_done = not data
                        to_client += data
                if upstream in writable:
                    sent = upstream.send(to_upstream)
                    self.bytes_up += sent
                    del to_upstream[:sent]
                if client in writable:
                    if trickling:
                        sent = client.send(to_client[:1])
                        next_drip = time.monotonic() + self.trickle_interval
                    else:
                        sent = client.send(to_client)
                    self.bytes_down += sent
                    del to_client[:sent]
                # A side that finished sending is finished once its bytes are passed on.
                if client_done and not to_upstream and not upstream_shut:
                    upstream.shutdown(socket.SHUT_WR)
                    upstream_shut = True
                if upstream_done and not to_client and not client_shut:
                    client.shutdown(socket.SHUT_WR)
                    client_shut = True
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                # One side reset or vanished: the other learns it the same way.
                _reset(client)
                _reset(upstream)
                return
            if client_shut and upstream_shut:
                client.close()
                upstream.close()
                return


def main(argv: list[str]) -> int:
    """Relay ``LISTEN_HOST LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT`` until told to stop."""
    listen_host, listen_port, upstream_host, upstream_port = argv
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with FaultProxy(
        upstream_host, int(upstream_port), listen_host=listen_host, listen_port=int(listen_port)
    ) as proxy:
        print(proxy.port, flush=True)
        while not stop.wait(0.2):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
