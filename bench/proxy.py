"""A counting loopback TCP proxy for HTTP (S3) traffic, so that no tool's own report of
what it sent is trusted: every byte each way and every request (by method, and S3 copies
and multipart calls by kind) goes through here on its way to the engine.

    with Proxy(upstream_port) as px:     # listens on 127.0.0.1:px.port, in a thread
        ... point the tool at px.endpoint ...
        c = px.counts()                  # bytes_up, bytes_down, requests, by_method, ...
        px.drop()                        # reset every open connection (both sides)
        px.stall(2.0)                    # hold every open connection's bytes for 2 s
        px.refuse(5.0)                   # close new connections at once for 5 s

It parses the client→server stream just enough to count requests (request line, headers,
Content-Length or chunked bodies); it never changes a byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["Counts", "Proxy", "RequestCounter"]


@dataclass
class Counts:
    bytes_up: int = 0  # client -> engine, headers included
    bytes_down: int = 0  # engine -> client
    requests: int = 0
    by_method: Counter[str] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)  # copy, part, list, ...
    connections: int = 0
    dropped: int = 0
    stalled: int = 0
    refused: int = 0

    def minus(self, other: Counts) -> Counts:
        return Counts(
            self.bytes_up - other.bytes_up,
            self.bytes_down - other.bytes_down,
            self.requests - other.requests,
            self.by_method - other.by_method,
            self.by_kind - other.by_kind,
            self.connections - other.connections,
            self.dropped - other.dropped,
            self.stalled - other.stalled,
            self.refused - other.refused,
        )

    def copy(self) -> Counts:
        return self.minus(Counts())

    def summary(self) -> str:
        methods = ", ".join(f"{k} {v}" for k, v in sorted(self.by_method.items()))
        return f"{self.requests} requests ({methods}), {self.bytes_up:,} B up"


def _kind(method: str, target: str, headers: dict[str, str]) -> str:
    """A coarse S3 operation name from the request line and headers."""
    path, _, query = target.partition("?")
    params = {p.split("=", 1)[0] for p in query.split("&") if p}
    key = path.strip("/").partition("/")[2]
    if method == "PUT":
        if "partNumber" in params:
            return "copy-part" if "x-amz-copy-source" in headers else "part"
        return "copy" if "x-amz-copy-source" in headers else ("put" if key else "create-bucket")
    if method == "POST":
        if "uploads" in params:
            return "create-multipart"
        if "uploadId" in params:
            return "complete-multipart"
        return "delete-multi" if "delete" in params else "post"
    if method == "GET":
        if not key:
            return "list-uploads" if "uploads" in params else "list"
        return "get"
    if method == "HEAD":
        return "head"
    if method == "DELETE":
        return "abort-multipart" if "uploadId" in params else "delete"
    return method.lower()


class RequestCounter:
    """Feed it the client->server byte stream of one connection; it counts requests."""

    def __init__(self, counts: Counts) -> None:
        self.counts = counts
        self.buf = b""
        self.body_left = 0  # bytes of a Content-Length body still to skip
        self.chunked = False  # inside a chunked body

    def feed(self, data: bytes) -> None:
        self.buf += data
        while self.buf:
            if self.body_left:
                n = min(self.body_left, len(self.buf))
                self.body_left -= n
                self.buf = self.buf[n:]
                continue
            if self.chunked:
                if not self._chunk():
                    return
                continue
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 1 << 16:  # not HTTP: stop parsing, keep counting bytes
                    self.buf = b""
                return
            head, self.buf = self.buf[:end].decode("latin-1"), self.buf[end + 4 :]
            lines = head.split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) < 3:
                continue
            method, target = parts[0], parts[1]
            headers = {}
            for ln in lines[1:]:
                k, _, v = ln.partition(":")
                headers[k.strip().lower()] = v.strip()
            self.counts.requests += 1
            self.counts.by_method[method] += 1
            self.counts.by_kind[_kind(method, target, headers)] += 1
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self.chunked = True
            else:
                with contextlib.suppress(ValueError):
                    self.body_left = int(headers.get("content-length", "0"))

    def _chunk(self) -> bool:
        """Skip one chunk of a chunked body; False when more bytes are needed."""
        end = self.buf.find(b"\r\n")
        if end < 0:
            return False
        size = int(self.buf[:end].split(b";")[0] or b"0", 16)
        if size == 0:  # last chunk, then trailers up to an empty line
            stop = self.buf.find(b"\r\n\r\n", end)
            if stop < 0:
                return False
            self.buf = self.buf[stop + 4 :]
            self.chunked = False
            return True
        if len(self.buf) < end + 2 + size + 2:
            self.body_left = 0
            return False
        self.buf = self.buf[end + 2 + size + 2 :]
        return True


class _Conn:
    def __init__(self) -> None:
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.writers: list[asyncio.StreamWriter] = []

    def abort(self) -> None:
        for w in self.writers:
            sock = w.get_extra_info("socket")
            if sock is not None:  # RST, not FIN: the client sees "connection reset"
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()
        self.flowing.set()


class Proxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self._counts = Counts()
        self._lock = threading.Lock()
        self._conns: set[_Conn] = set()
        self._refuse_until = 0.0
        self._rng = random.Random()  # noqa: S311  (fault injection, not crypto)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._run, name="bench-proxy", daemon=True)
        self._ready = threading.Event()
        self._thread.start()
        self._ready.wait(10)
        if not self.port:
            raise RuntimeError("proxy did not start")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- control, from any thread ---------------------------------------------------------

    def counts(self) -> Counts:
        with self._lock:
            return self._counts.copy()

    def reset(self) -> None:
        with self._lock:
            self._counts = Counts()

    def _call(self, fn: object, *args: object) -> object:
        assert callable(fn)

        async def run() -> object:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def drop(self, fraction: float = 1.0) -> int:
        """Reset open connections (each with probability `fraction`); returns how many."""
        n = self._call(self._drop, fraction)
        assert isinstance(n, int)
        return n

    def stall(self, seconds: float, fraction: float = 1.0) -> int:
        """Hold the bytes of open connections (each with probability `fraction`) for
        `seconds`, then let them flow; returns how many were stalled."""
        n = self._call(self._stall, seconds, fraction)
        assert isinstance(n, int)
        return n

    def refuse(self, seconds: float) -> None:
        """For `seconds`, close each new connection as soon as it is accepted."""
        self._refuse_until = time.monotonic() + seconds

    def open_connections(self) -> int:
        return len(self._conns)

    def close(self) -> None:
        if self._loop.is_closed():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for c in list(self._conns):
                c.abort()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(
        self,
        t: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- the loop thread ------------------------------------------------------------------

    def _drop(self, fraction: float) -> int:
        picked = [c for c in self._conns if self._rng.random() < fraction]
        for c in picked:
            c.abort()
        with self._lock:
            self._counts.dropped += len(picked)
        return len(picked)

    def _stall(self, seconds: float, fraction: float) -> int:
        picked = [c for c in self._conns if self._rng.random() < fraction]
        for c in picked:
            c.flowing.clear()
            self._loop.call_later(seconds, c.flowing.set)
        with self._lock:
            self._counts.stalled += len(picked)
        return len(picked)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=512)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        conn = _Conn()
        conn.writers.append(cw)
        with self._lock:
            self._counts.connections += 1
        if time.monotonic() < self._refuse_until:
            with self._lock:
                self._counts.refused += 1
            conn.abort()
            return
        try:
            ur, uw = await asyncio.open_connection(*self.upstream)
        except OSError:
            conn.abort()  # engine down: the client sees a reset, as it would see a refusal
            return
        conn.writers.append(uw)
        self._conns.add(conn)
        counter = RequestCounter(self._counts)
        try:
            await asyncio.gather(self._pump(cr, uw, conn, counter), self._pump(ur, cw, conn, None))
        finally:
            self._conns.discard(conn)
            for w in conn.writers:
                w.close()

    async def _pump(
        self,
        r: asyncio.StreamReader,
        w: asyncio.StreamWriter,
        conn: _Conn,
        counter: RequestCounter | None,
    ) -> None:
        try:
            while True:
                data = await r.read(1 << 16)
                if not data:
                    break
                await conn.flowing.wait()
                with self._lock:
                    if counter is not None:
                        self._counts.bytes_up += len(data)
                        counter.counts = self._counts  # after a reset(), count into the new one
                        counter.feed(data)
                    else:
                        self._counts.bytes_down += len(data)
                w.write(data)
                await w.drain()
            if w.can_write_eof():
                w.write_eof()
        except (OSError, asyncio.IncompleteReadError, RuntimeError):
            conn.abort()
