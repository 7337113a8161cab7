"""The service as a real process, for tests: `session-watcher run` on a tree with its log in
a file, waits on log lines and store contents, writers that run as a user, and a socket
standing in for systemd's NOTIFY_SOCKET. The `start` and `notify_path` fixtures (conftest)
build on it; test modules import from here, never from one another."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from helpers import Tree, User, run_as, wait_for

START_TIMEOUT = 15.0

# --- the service as a subprocess ------------------------------------------------------------


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    log_path: Path
    _log_file: IO[bytes] = field(repr=False)

    def log(self) -> str:
        return self.log_path.read_bytes().decode("utf-8", "backslashreplace")

    def lines(self, needle: str) -> list[str]:
        return [line for line in self.log().splitlines() if needle in line]

    def copies(self, user: str, name: str) -> list[str]:
        return self.lines(f"copied '{user}/{name}' (")

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"service exited with {self.proc.returncode}; log:\n{self.log()[-4000:]}"
            )

    def wait_log(self, needle: str, *, count: int = 1, timeout: float = 10.0) -> list[str]:
        def found() -> list[str] | None:
            self._check_alive()
            got = self.lines(needle)
            return got if len(got) >= count else None

        try:
            return wait_for(found, timeout=timeout, what=f"{count} log line(s) with {needle!r}")
        except AssertionError as e:
            raise AssertionError(f"{e}; log:\n{self.log()[-4000:]}") from None

    def send(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        self.send(sig)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)  # a test may have stopped it
                self.proc.kill()
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self._log_file.close()


StartFn = Callable[..., Service]


def stored_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def wait_stored(
    tree: Tree, user: str | User, name: str, data: bytes, timeout: float = 10.0
) -> None:
    path = tree.stored(user, name)

    def landed() -> bool:
        return stored_bytes(path) == data

    try:
        wait_for(landed, timeout=timeout, what=f"{path} to hold the source's content")
    except AssertionError:
        got = stored_bytes(path)
        raise AssertionError(
            f"{path}: want {len(data)} bytes, have "
            f"{'nothing' if got is None else f'{len(got)} bytes'}"
        ) from None


def temp_files(root: Path) -> list[Path]:
    return sorted(root.rglob(".session-watcher.*.tmp")) if root.exists() else []


COPY_LINE = re.compile(r"copied '([^']+)' \((\d+) bytes, ([\d.]+) ms after the event\)")


def line(i: int, pad: int = 40) -> bytes:
    return b'{"type":"assistant","i":%d,"text":"%s"}\n' % (i, b"x" * pad)


# Writers run as the user: one process doing many open/append/close cycles, like
# Claude Code's 100 ms flushes (O_APPEND, write, close), fast enough to make real bursts.
APPENDER = r"""
import os, sys, time
paths, count = sys.argv[1].split(","), int(sys.argv[2])
pad, every = int(sys.argv[3]), float(sys.argv[4])
flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
for i in range(count):
    fd = os.open(paths[i % len(paths)], flags, 0o600)
    os.write(fd, b'{"type":"assistant","i":%d,"text":"%s"}\n' % (i, b"x" * pad))
    os.close(fd)
    if every:
        time.sleep(every)
"""


def append_as(
    u: User, paths: list[Path], count: int, *, pad: int = 40, every: float = 0.0
) -> dict[Path, bytes]:
    """Append `count` lines round-robin over `paths` as `u`, one open/write/close per line;
    returns what each file gained."""
    run_as(
        u.uid,
        u.gid,
        [
            sys.executable,
            "-c",
            APPENDER,
            ",".join(map(str, paths)),
            str(count),
            str(pad),
            str(every),
        ],
    )
    gained: dict[Path, bytes] = {p: b"" for p in paths}
    for i in range(count):
        gained[paths[i % len(paths)]] += line(i, pad)
    return gained


# --- sd_notify ------------------------------------------------------------------------------


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, address: str) -> None:
        self.address = address  # what goes into NOTIFY_SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[str] = []

    def wait(self, prefix: str, *, count: int = 1, timeout: float = 10.0) -> list[str]:
        """Receive until `count` datagrams hold a line starting with `prefix`; returns
        every line received so far."""
        deadline = time.monotonic() + timeout

        def matches() -> int:
            return sum(line_.startswith(prefix) for line_ in self.lines())

        while matches() < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {prefix!r} within {timeout} s; got {self.messages}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.messages.append(data.decode())
        return self.lines()

    def lines(self) -> list[str]:
        return [line_ for m in self.messages for line_ in m.splitlines()]

    def close(self) -> None:
        self.sock.close()
