"""systemd's notify protocol, spoken directly over the NOTIFY_SOCKET datagram socket.

A few lines instead of a dependency: READY=1, STATUS=, WATCHDOG=1, STOPPING=1. Without
NOTIFY_SOCKET every call is a no-op, so the same code runs under systemd, in a terminal
and in tests.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping

__all__ = ["Notifier", "watchdog_interval"]

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None) -> None:
        self._sock: socket.socket | None = None
        self._addr = ""
        if not address:
            return
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        elif not address.startswith("/"):
            log.warning("ignoring NOTIFY_SOCKET %r: not a unix socket path", address)
            return
        self._addr = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        return cls(environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> bool:
        """Send `KEY=value` lines as one datagram; False (logged at DEBUG) if it failed."""
        if self._sock is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self._addr)
        except OSError as e:
            log.debug("sd_notify failed: %s", e)
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when systemd
    asked for none (or asked another process: WATCHDOG_PID names the main process)."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and owner != str(pid):
        return None
    return int(usec) / 2e6
