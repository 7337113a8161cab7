"""An S3 API for the tests: moto's ThreadedMotoServer (real HTTP, in-process) behind a
counting loopback proxy, which also plays the store going down and coming back.

The proxy parses the request stream (request line, headers, Content-Length body: botocore
sends no chunked bodies with checksums `when_required`), so a test can assert what crossed
the network: requests by method, and bytes sent. No tool's own report is trusted.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CountingProxy", "Engine", "Moto", "Request", "wait_for"]


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: int  # bytes of body


@dataclass
class _Counts:
    requests: list[Request] = field(default_factory=list)
    bytes_up: int = 0


class CountingProxy:
    """127.0.0.1:port -> upstream, counting each request; `down()` refuses connections and
    cuts the open ones, `up()` listens again on the same port."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._lock = threading.Lock()
        self._counts = _Counts()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._listening = threading.Event()
        self.slow_down = False  # answer every new connection's request with 503 SlowDown
        self._closed = False
        self._thread: threading.Thread | None = None
        self.port = 0
        self.up()

    def up(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.port = s.getsockname()[1]
        with self._lock:
            self._listener = s
        self._listening.set()
        if self._thread is None:  # one accept thread for the proxy's life (down/up too)
            self._thread = threading.Thread(target=self._accept, daemon=True)
            self._thread.start()

    def down(self) -> None:
        """Connections are refused (nothing listens) and the open ones are cut."""
        self._listening.clear()
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        self.drop()

    def drop(self) -> None:
        """Cut the open connections (keep-alive pools), keep listening."""
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def close(self) -> None:
        self._closed = True
        self.down()
        self._listening.set()
        if self._thread is not None:
            self._thread.join(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self._counts = _Counts()

    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._counts.requests)

    def bytes_up(self) -> int:
        with self._lock:
            return self._counts.bytes_up

    def count(
        self, method: str | None = None, pred: Callable[[Request], bool] | None = None
    ) -> int:
        return sum(
            1
            for r in self.requests()
            if (method is None or r.method == method) and (pred is None or pred(r))
        )

    def _accept(self) -> None:
        while not self._closed:
            self._listening.wait()
            with self._lock:
                listener = self._listener
            if listener is None:
                continue
            try:
                client, _ = listener.accept()
            except OSError:
                continue  # down(), or close()
            if self.slow_down:
                threading.Thread(target=self._refuse, args=(client,), daemon=True).start()
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, server}
            threading.Thread(target=self._up, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()

    def _refuse(self, client: socket.socket) -> None:
        """Answer one request with S3's 503 SlowDown, then close."""
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = client.recv(65536)
                if not data:
                    return
                buf += data
            with self._lock:
                self._counts.requests.append(Request("SLOWDOWN", "", 0))
            body = (
                b"<Error><Code>SlowDown</Code>"
                b"<Message>Please reduce your request rate.</Message></Error>"
            )
            client.sendall(
                b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        except OSError:
            pass
        finally:
            client.close()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close(src, dst)

    def _close(self, *socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
            with self._lock:
                self._conns.discard(s)

    def _up(self, client: socket.socket, server: socket.socket) -> None:
        """Client -> server, parsing requests as they pass."""
        buf = b""
        body_left = 0
        try:
            while data := client.recv(65536):
                server.sendall(data)
                with self._lock:
                    self._counts.bytes_up += len(data)
                buf += data
                while True:
                    if body_left:
                        take = min(body_left, len(buf))
                        body_left -= take
                        buf = buf[take:]
                        if body_left:
                            break
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    head = buf[:end].decode("latin-1").split("\r\n")
                    buf = buf[end + 4 :]
                    method, path = [*head[0].split(" "), "", ""][:2]
                    length = 0
                    for line in head[1:]:
                        name, _, value = line.partition(":")
                        if name.strip().lower() == "content-length":
                            length = int(value.strip())
                    with self._lock:
                        self._counts.requests.append(Request(method, path, length))
                    body_left = length
        except OSError:
            pass
        finally:
            self._close(client, server)


class Engine:
    """An S3 engine for a test: its own endpoint (`direct`, for the test's checks, not
    counted) and a CountingProxy in front that the code under test talks to."""

    def __init__(
        self, name: str, upstream: tuple[str, int], access_key: str, secret_key: str
    ) -> None:
        self.name = name
        self.direct = "http://{}:{}".format(*upstream)
        self.proxy = CountingProxy(upstream)
        self.access_key = access_key
        self.secret = secret_key

    def env(self) -> dict[str, str]:
        """The standard AWS chain, pointing at the proxy."""
        return {
            "AWS_ENDPOINT_URL": self.proxy.url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def client(self) -> Any:
        """A plain client for the test's own checks (directly to the engine: not counted)."""
        import boto3
        from botocore.config import Config as BotoConfig

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.direct,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret,
            region_name="us-east-1",
            config=BotoConfig(
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                s3={"addressing_style": "path"},
            ),
        )

    def new_bucket(self) -> str:
        name = "sw-" + uuid.uuid4().hex[:20]
        client = self.client()
        client.create_bucket(Bucket=name)
        client.close()
        return name

    def stop(self) -> None:
        self.proxy.close()


class Moto(Engine):
    """moto's S3 server (ThreadedMotoServer: real HTTP, in-process) on a free port."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        super().__init__(
            "moto",
            self.server.get_host_and_port(),
            "AKIASESSIONWATCHER",
            "sw-test-secret-" + uuid.uuid4().hex,
        )

    def stop(self) -> None:
        super().stop()
        self.server.stop()


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def env_vars(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
