"""The service's state file: what `session-watcher status` shows as the service's own view.

Written atomically (temp file in the same directory, then rename) so a reader sees the old
or the new document, never half of one. The same writer serves the metrics file.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .safefs import escape

__all__ = ["AtomicFile", "LastError", "age", "read_state", "render_state", "write_atomic"]

log = logging.getLogger(__name__)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data`: a temp file in the same directory (same file system, so
    the rename is atomic), created with O_EXCL|O_NOFOLLOW under a random name (a symlink
    planted at a predictable temp name is never written through), given `mode` explicitly
    (the unit's UMask=0077 would leave it unreadable to node_exporter or an operator), then
    renamed over the target. The temp name starts with a dot and ends in .tmp, so neither
    node_exporter (*.prom) nor a *.json glob picks it up."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class AtomicFile:
    """A file the service rewrites now and then; a failure to write it is one WARNING
    (again only after it worked in between, or the error changed), never a crash: outside
    systemd /run/session-watcher does not exist and the service must run all the same."""

    def __init__(self, path: Path, what: str, min_interval: float = 1.0) -> None:
        self.path = path
        self.what = what
        self.min_interval = min_interval
        self._last = float("-inf")
        self._warned: str | None = None

    def due(self, now: float) -> bool:
        return now - self._last >= self.min_interval

    def write(self, render: Callable[[], bytes], *, now: float, force: bool = False) -> bool:
        """Write `render()` unless the last write was under `min_interval` ago (`now` is
        monotonic). True when written."""
        if not force and not self.due(now):
            return False
        self._last = now
        try:
            write_atomic(self.path, render())
        except OSError as e:
            why = e.strerror or str(e)
            if self._warned != why:
                log.warning(
                    "cannot write the %s %s: %s; carrying on without it",
                    self.what,
                    escape(str(self.path)),
                    why,
                )
                self._warned = why
            return False
        if self._warned is not None:
            log.info("%s %s written again", self.what, escape(str(self.path)))
            self._warned = None
        return True


def render_state(state: dict[str, Any]) -> bytes:
    return (json.dumps(state, indent=2, sort_keys=True) + "\n").encode()


def read_state(path: Path) -> dict[str, Any] | None:
    """The state document, or None when there is no state file (service never ran here).
    Raises ValueError for a file that is not a JSON object."""
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
    except FileNotFoundError:
        return None
    doc = json.loads(raw)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def age(doc: dict[str, Any], now: float | None = None) -> float | None:
    """Seconds since the service last wrote the state document."""
    written = doc.get("updated_at")
    if not isinstance(written, int | float):
        return None
    return (time.time() if now is None else now) - written


class LastError(logging.Handler):
    """Remembers the last ERROR the package logged, for the state file's `last_error`."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: dict[str, Any] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.last = {"at": round(record.created, 3), "msg": record.getMessage()}
        except Exception:  # a logging handler must never raise into the caller
            self.handleError(record)

    def install(self, logger: str = "session_watcher") -> None:
        logging.getLogger(logger).addHandler(self)

    def uninstall(self, logger: str = "session_watcher") -> None:
        logging.getLogger(logger).removeHandler(self)
