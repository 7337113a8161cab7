"""The counting proxy of the object-store bench and soak: counts requests and bytes exactly
through keep-alive connections, and its faults (drop, stall, refuse) reach the client."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from ceph import Rgw

from bench.proxy import Counts, Proxy, RequestCounter


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:
        n = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(n)
        self._reply(b"ok")

    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(0.5)
        self._reply(b"x" * 1000)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def origin() -> Iterator[int]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever)
    t.start()
    try:
        yield int(srv.server_address[1])
    finally:
        srv.shutdown()
        srv.server_close()
        t.join()


def test_counts_requests_and_bytes_on_keep_alive(origin: int) -> None:
    with Proxy(origin) as px:
        c = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
        c.request("PUT", "/b/k", body=b"a" * 100_000)
        assert c.getresponse().read() == b"ok"
        c.request("GET", "/b/k")
        assert len(c.getresponse().read()) == 1000
        c.request("PUT", "/b/k?partNumber=2&uploadId=x", body=b"b" * 10, headers={})
        c.getresponse().read()
        c.request("GET", "/b?list-type=2")
        c.getresponse().read()
        c.close()
        n = px.counts()
    assert n.requests == 4
    assert n.by_method == {"PUT": 2, "GET": 2}
    assert n.by_kind == {"put": 1, "get": 1, "part": 1, "list": 1}
    assert 100_010 < n.bytes_up < 101_000
    assert 2000 < n.bytes_down < 3000


def test_request_counter_chunked_body_and_split_feeds() -> None:
    counts = Counts()
    rc = RequestCounter(counts)
    stream = (
        b"PUT /b/k HTTP/1.1\r\nTransfer-Encoding: chunked\r\nx-amz-copy-source: /b/j\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
        b"HEAD /b/k HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    for i in range(len(stream)):  # one byte at a time
        rc.feed(stream[i : i + 1])
    assert counts.requests == 2
    assert counts.by_kind == {"copy": 1, "head": 1}


def test_drop_stall_refuse(origin: int) -> None:
    with Proxy(origin) as px:
        c = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
        c.request("GET", "/slow")
        time.sleep(0.1)
        assert px.drop() == 1
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            c.getresponse().read()
        c.close()

        c = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
        c.request("GET", "/")
        c.getresponse().read()
        t0 = time.monotonic()
        assert px.stall(0.5) == 1
        c.request("GET", "/")
        assert len(c.getresponse().read()) == 1000
        assert time.monotonic() - t0 >= 0.45
        c.close()

        px.refuse(0.5)
        c = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            c.request("GET", "/")
            c.getresponse().read()
        c.close()
        time.sleep(0.6)
        c = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
        c.request("GET", "/")
        assert c.getresponse().status == 200
        c.close()
        n = px.counts()
    assert (n.dropped, n.stalled, n.refused) == (1, 1, 1)


def test_counts_s3_calls_to_ceph(ceph_rgw: Rgw) -> None:
    with Proxy(ceph_rgw.rgw_port) as px:
        s3 = ceph_rgw.client(px.endpoint)
        s3.create_bucket(Bucket="proxy-count")
        s3.put_object(Bucket="proxy-count", Key="a/b", Body=b"z" * 50_000)
        s3.head_object(Bucket="proxy-count", Key="a/b")
        s3.list_objects_v2(Bucket="proxy-count")
        n = px.counts()
        s3.close()
    assert n.by_kind == {"create-bucket": 1, "put": 1, "head": 1, "list": 1}
    assert 50_000 < n.bytes_up < 55_000
