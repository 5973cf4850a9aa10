"""A TCP proxy on 127.0.0.1 that sits between a gRPC client and the server and misbehaves on
purpose: it delays every forwarded block, cuts a connection (RST) after a scheduled number of
bytes in either direction (which truncates whatever stream was in flight: a download, an
upload, a response), freezes the server->client direction on request, blackholes live
connections (silent partition) and cuts every live connection on demand. Plain threads and sockets; bounded by `close()`."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

_BLOCK = 16 * 1024


@dataclass
class CutPlan:
    """Per-connection fault schedule: connection n (0-based, in accept order) is cut after
    ``upstream[n]`` client->server bytes or ``downstream[n]`` server->client bytes (None: no
    cut in that direction). Connections beyond the lists are left alone."""

    upstream: Sequence[int | None] = ()
    downstream: Sequence[int | None] = ()

    def limits(self, n: int) -> tuple[int | None, int | None]:
        up = self.upstream[n] if n < len(self.upstream) else None
        down = self.downstream[n] if n < len(self.downstream) else None
        return up, down


@dataclass
class ProxyStats:
    """What the proxy did (for assertions and RELIABILITY.md)."""

    connections: int = 0
    cuts: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    delayed_blocks: int = 0


@dataclass
class _Conn:
    client: socket.socket
    server: socket.socket
    index: int
    up_limit: int | None
    down_limit: int | None
    up: int = 0
    down: int = 0
    stalled: bool = False
    closed: threading.Event = field(default_factory=threading.Event)


def _hard_close(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer sees a reset, not a clean FIN. shutdown(SHUT_RD)
    first wakes a pump thread blocked in recv() on this socket: until that recv returns, the
    kernel keeps the socket alive and close() sends nothing (the peer would never notice)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class TcpFaultProxy:
    """Listen on 127.0.0.1:<port>, forward to ``target`` (host:port) with faults."""

    def __init__(self, target: str, *, delay_s: float = 0.0, plan: CutPlan | None = None) -> None:
        host, port = target.rsplit(":", 1)
        self.upstream_addr = (host, int(port))
        self.delay_s = delay_s
        self.plan = plan or CutPlan()
        self.stats = ProxyStats()
        self._lock = threading.Lock()
        self._conns: list[_Conn] = []
        self._downstream_open = threading.Event()
        self._downstream_open.set()
        self._closing = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- control ---------------------------------------------------------------------------
    def freeze_downstream(self) -> None:
        """Hold server->client bytes (responses queue up inside the proxy)."""
        self._downstream_open.clear()

    def thaw_downstream(self) -> None:
        """Forward server->client bytes again."""
        self._downstream_open.set()

    def stall_all(self) -> int:
        """Blackhole every live connection: bytes are read and dropped, nothing is closed (a
        silent network partition; new connections work). Returns how many were stalled."""
        with self._lock:
            live = [c for c in self._conns if not c.closed.is_set()]
            for conn in live:
                conn.stalled = True
        return len(live)

    def cut_all(self) -> int:
        """RST every live connection now (held bytes are dropped); returns how many."""
        with self._lock:
            live = [c for c in self._conns if not c.closed.is_set()]
        for conn in live:
            self._cut(conn)
        return len(live)

    def close(self) -> None:
        """Stop accepting and cut everything."""
        self._closing.set()
        self._downstream_open.set()
        self.cut_all()
        self._listener.close()
        self._acceptor.join(timeout=5)

    # -- plumbing --------------------------------------------------------------------------
    def _cut(self, conn: _Conn) -> None:
        if conn.closed.is_set():
            return
        conn.closed.set()
        with self._lock:
            self.stats.cuts += 1
        _hard_close(conn.client)
        _hard_close(conn.server)

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream_addr, timeout=5)
                server.settimeout(None)
            except OSError:
                _hard_close(client)
                continue
            with self._lock:
                index = self.stats.connections
                self.stats.connections += 1
                up, down = self.plan.limits(index)
                conn = _Conn(client, server, index, up, down)
                self._conns.append(conn)
            for upstream in (True, False):
                threading.Thread(target=self._pump, args=(conn, upstream), daemon=True).start()

    def _pump(self, conn: _Conn, upstream: bool) -> None:
        src, dst = (conn.client, conn.server) if upstream else (conn.server, conn.client)
        limit = conn.up_limit if upstream else conn.down_limit
        while not conn.closed.is_set():
            try:
                data = src.recv(_BLOCK)
            except OSError:
                break
            if not data:
                break
            if conn.stalled:
                continue  # blackholed: the bytes vanish, the peers hear nothing
            if not upstream:
                while not self._downstream_open.wait(0.05):
                    if conn.closed.is_set():
                        return
            if self.delay_s > 0:
                time.sleep(self.delay_s)
                with self._lock:
                    self.stats.delayed_blocks += 1
            done = conn.up if upstream else conn.down
            if limit is not None and done + len(data) > limit:
                keep = max(0, limit - done)
                try:
                    if keep:
                        dst.sendall(data[:keep])  # the truncated part of the block goes out
                except OSError:
                    pass
                self._cut(conn)
                return
            try:
                dst.sendall(data)
            except OSError:
                break
            with self._lock:
                if upstream:
                    conn.up += len(data)
                    self.stats.bytes_up += len(data)
                else:
                    conn.down += len(data)
                    self.stats.bytes_down += len(data)
        if not conn.closed.is_set():
            conn.closed.set()
            _hard_close(conn.client)
            _hard_close(conn.server)
