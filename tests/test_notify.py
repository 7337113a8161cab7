"""sd_notify over a real datagram socket (path and abstract), and the watchdog interval."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from session_watcher.notify import Notifier, watchdog_interval


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "n.sock")
    if len(path) >= 100:  # sun_path is 108 bytes
        pytest.skip("tmp_path too long for a unix socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5.0)
    yield s, path
    s.close()


def test_no_socket_means_nothing_is_attempted() -> None:
    n = Notifier.from_environ({})
    assert not n.enabled
    assert n.send("READY=1") is False
    n.close()


def test_sends_fields_as_one_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = Notifier.from_environ({"NOTIFY_SOCKET": path})
    try:
        assert n.enabled
        assert n.send("READY=1", "STATUS=watching 2 users")
        assert sock.recv(4096) == b"READY=1\nSTATUS=watching 2 users"
    finally:
        n.close()
    assert n.send("STOPPING=1") is False  # closed: a no-op, never an error


def test_abstract_address() -> None:
    name = f"sw-notify-{uuid.uuid4().hex}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(5.0)
    n = Notifier(f"@{name}")
    try:
        assert n.send("WATCHDOG=1")
        assert s.recv(4096) == b"WATCHDOG=1"
    finally:
        n.close()
        s.close()


def test_relative_address_is_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier("relative/sock")
    assert not n.enabled and n.send("READY=1") is False
    assert any("ignoring NOTIFY_SOCKET" in r.getMessage() for r in caplog.records)


def test_a_missing_listener_is_not_an_error(tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "nobody-listens"))
    try:
        assert n.send("READY=1") is False
    finally:
        n.close()


@pytest.mark.parametrize(
    ("env", "pid", "want"),
    [
        ({}, 42, None),
        ({"WATCHDOG_USEC": "0"}, 42, None),
        ({"WATCHDOG_USEC": "junk"}, 42, None),
        ({"WATCHDOG_USEC": "200000"}, 42, 0.1),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 42, None),  # another process's
    ],
)
def test_watchdog_interval(env: dict[str, str], pid: int, want: float | None) -> None:
    assert watchdog_interval(env, pid) == want
