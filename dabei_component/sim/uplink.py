"""The deployer's uplink: one bandwidth shared by every connection the deployer opens to a server.

A real `pulumi up` runs on a machine whose upload (an office line, a CI runner) is much slower than the
network between Hetzner servers. The simulator models that with a TCP proxy in front of each server's
sshd: bytes from a client that is not one of the simulated servers (the deployer) pass a token bucket
shared by all servers; bytes between servers (a rescue system relaying the image to another, whose SSH
client binds to its server's address) pass unlimited. Downloads to the deployer are not limited.

The proxy is put in front of a server's SSH when its sshd starts while a limit is set (`PUT /_sim/uplink`
before the servers boot); the rate itself can change at any time and applies at once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# Bytes moved per step: at 100 Mbit/s, 64 KiB is 5 ms of the shared line.
_STEP = 64 * 1024
# The bucket's depth: a connection may send this much at once after the line was idle.
_BURST_SECONDS = 0.05


class Uplink:
    """A token bucket in bits per second (None: unlimited), thread-safe, plus byte counters."""

    def __init__(self, servers: Callable[[], set[str]]) -> None:
        self._servers = servers
        self._lock = threading.Lock()
        self._bits_per_second: float | None = None
        self._next_free = 0.0  # time.monotonic() when the line has sent everything granted so far
        self.deployer_bytes = 0
        self.server_bytes = 0

    @property
    def bits_per_second(self) -> float | None:
        return self._bits_per_second

    def configure(self, body: object) -> None:
        """`{"bits_per_second": number > 0 | null}`; `{"reset_counters": true}` zeroes the counters.
        ValueError names a bad key or value, and nothing changes."""
        if not isinstance(body, dict):
            raise ValueError(f"uplink settings must be a JSON object, got {type(body).__name__}")
        unknown = set(body) - {"bits_per_second", "reset_counters"}
        if unknown:
            raise ValueError(f"unknown uplink setting(s) {sorted(unknown)}; known: bits_per_second, reset_counters")
        rate = self._bits_per_second
        if "bits_per_second" in body:
            rate = body["bits_per_second"]
            number = isinstance(rate, int | float) and not isinstance(rate, bool)
            if rate is not None and (not number or not 0 < rate <= 1e12):
                raise ValueError(f"bits_per_second must be a number in (0, 1e12] or null, got {rate!r}")
        reset = body.get("reset_counters", False)
        if not isinstance(reset, bool):
            raise ValueError(f"reset_counters must be true or false, got {reset!r}")
        with self._lock:
            self._bits_per_second = float(rate) if rate is not None else None
            if reset:
                self.deployer_bytes = self.server_bytes = 0

    def to_json(self) -> dict[str, object]:
        with self._lock:
            return {
                "bits_per_second": self._bits_per_second,
                "deployer_bytes": self.deployer_bytes,
                "server_bytes": self.server_bytes,
            }

    def is_server(self, address: str) -> bool:
        return address in self._servers()

    def send(self, count: int) -> None:
        """Block until the line has room for `count` more bytes from the deployer, then count them."""
        with self._lock:
            self.deployer_bytes += count
            rate = self._bits_per_second
            if rate is None:
                return
            # The line sends what it granted back to back; a sender may run ahead of it by the burst.
            now = time.monotonic()
            self._next_free = max(self._next_free, now) + count * 8 / rate
            wait = self._next_free - now - _BURST_SECONDS
        if wait > 0:
            time.sleep(wait)

    def count_server(self, count: int) -> None:
        with self._lock:
            self.server_bytes += count


class UplinkProxy:
    """Listens on `host:port`, forwards each connection to `host:backend_port`; client-to-server bytes of
    clients that are not servers go through `uplink.send`. Two threads per connection; unlimited
    directions are moved with splice(2) so relays between servers cost the simulator little CPU."""

    def __init__(
        self, *, host: str, port: int, backend_port: int, uplink: Uplink, drop_servers_after_bytes: int | None = None
    ) -> None:
        self.host = host
        # A fault: connections from other servers are cut after this many bytes from them.
        self.drop_servers_after_bytes = drop_servers_after_bytes
        self.port = port
        self.backend_port = backend_port
        self.uplink = uplink
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._acceptor: threading.Thread | None = None

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(128)
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"uplink-{self.host}", daemon=True)
        self._acceptor.start()

    async def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown wakes the thread blocked in accept().
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            open_sockets = list(self._sockets)
        for sock in open_sockets:
            _reset(sock)
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
            self._acceptor = None

    def _accept_loop(self) -> None:
        while (listener := self._listener) is not None:
            try:
                client, (address, *_) = listener.accept()  # IPv6 adds flow info and scope
            except OSError:
                return
            try:
                backend = socket.create_connection((self.host, self.backend_port), timeout=10)
                backend.settimeout(None)
            except OSError as exc:
                log.warning("uplink proxy %s:%s: backend unreachable: %s", self.host, self.port, exc)
                _reset(client)
                client.close()
                continue
            connection = _Connection(client, backend, self)
            with self._lock:
                self._sockets.update((client, backend))
            limited = not self.uplink.is_server(address)
            for args in ((client, backend, limited), (backend, client, None)):
                threading.Thread(target=connection.pump, args=args, daemon=True).start()

    def forget(self, *sockets: socket.socket) -> None:
        with self._lock:
            self._sockets.difference_update(sockets)


class _Connection:
    """Both directions of one proxied connection; the last pump to end closes both sockets."""

    def __init__(self, client: socket.socket, backend: socket.socket, proxy: UplinkProxy) -> None:
        self.client, self.backend, self.proxy = client, backend, proxy
        self._running = 2
        self._lock = threading.Lock()

    def pump(self, src: socket.socket, dst: socket.socket, limited: bool | None) -> None:
        """limited True: the deployer's upload; False: a server's upload; None: the answer direction."""
        uplink = self.proxy.uplink
        try:
            if limited:
                buffer = bytearray(_STEP)
                view = memoryview(buffer)
                while count := src.recv_into(buffer):
                    uplink.send(count)
                    dst.sendall(view[:count])
            elif limited is False and self.proxy.drop_servers_after_bytes is not None:
                _copy_until(src, dst, self.proxy.drop_servers_after_bytes, uplink.count_server)
            else:
                _splice(src, dst, uplink.count_server if limited is False else None)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        except OSError:
            # One side broke: both ends see the connection reset, as with a real network failure.
            _reset(src)
            _reset(dst)
        finally:
            with self._lock:
                self._running -= 1
                last = self._running == 0
            if last:
                self.proxy.forget(self.client, self.backend)
                self.client.close()
                self.backend.close()


def _copy_until(src: socket.socket, dst: socket.socket, limit: int, count: Callable[[int], None]) -> None:
    sent = 0
    while data := src.recv(_STEP):
        if sent + len(data) >= limit:
            dst.sendall(data[: limit - sent])
            raise OSError(errno.ECONNRESET, "cut by the fault drop_relays_after_bytes")
        count(len(data))
        dst.sendall(data)
        sent += len(data)


def _splice(src: socket.socket, dst: socket.socket, count: Callable[[int], None] | None) -> None:
    read_end, write_end = os.pipe()
    try:
        while True:
            moved = os.splice(src.fileno(), write_end, 1 << 20)
            if moved == 0:
                return
            if count is not None:
                count(moved)
            while moved:
                sent = os.splice(read_end, dst.fileno(), moved)
                if sent == 0:
                    raise OSError(errno.EPIPE, "connection closed")
                moved -= sent
    finally:
        os.close(read_end)
        os.close(write_end)


def _reset(sock: socket.socket) -> None:
    """Make the peer see a reset (SO_LINGER 0), and wake a thread blocked on the socket."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
