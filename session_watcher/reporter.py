"""What the service tells the world: totals since start, STATUS= for systemd, the state file
(`session-watcher status` reads it) and the metrics file.

It reads the other parts through a `View` of plain callables, so it never imports them and
a test can hand it fixed numbers.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from .config import Config
from .copy import Result
from .metrics import Metrics
from .notify import Notifier
from .reconcile import PassStats
from .state import AtomicFile, LastError, render_state

__all__ = ["HEARTBEAT_SECONDS", "PUBLISH_SECONDS", "Reporter", "Totals", "View"]

PUBLISH_SECONDS = 1.0  # state file at most this often (when it changed)
HEARTBEAT_SECONDS = 15.0  # ... and at least this often, so a reader can tell it is alive


@dataclass
class Totals:
    """Since start; read by STATUS= and the state file. File outcomes are tallied by the
    pass's own `PassStats.record`, so the two never disagree on what counts as what."""

    files: PassStats = field(default_factory=PassStats)
    overflows: int = 0
    passes: int = 0

    def as_dict(self) -> dict[str, int]:
        f = self.files
        return {
            "copies": f.files_copied,
            "bytes": f.bytes_copied,
            "refusals": f.files_refused,
            "failures": f.files_failed,
            "overflows": self.overflows,
            "passes": self.passes,
        }


@dataclass(frozen=True)
class View:
    """How the reporter sees the rest of the service (each a cheap, thread-safe call)."""

    watched: Callable[[], int]
    degraded: Callable[[], list[str]]
    stuck: Callable[[], list[str]]
    over_quota: Callable[[], list[str]]
    running: Callable[[], bool]
    ready: Callable[[], bool]


class Reporter:
    def __init__(
        self,
        config: Config,
        notifier: Notifier,
        view: View,
        *,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.notifier = notifier
        self.view = view
        self._wall = wall
        self._clock = clock
        self.metrics = Metrics(config.metrics_file)
        self.state_file = AtomicFile(config.state_file, "state file", PUBLISH_SECONDS)
        self.last_error = LastError()
        self.totals = Totals()
        self.started_at = wall()
        self.last_pass: PassStats | None = None
        self.last_pass_at: float | None = None
        self._lock = threading.Lock()
        self._published: tuple[str, float] = ("", float("-inf"))

    # --- counting (any thread) ---------------------------------------------------------------

    def count(self, result: Result) -> None:
        self.metrics.record(result)
        self.totals.files.record(result)  # PassStats: locked on its own

    def overflow(self) -> None:
        with self._lock:
            self.totals.overflows += 1
        self.metrics.overflows.inc()

    def pass_done(self, stats: PassStats, *, full: bool) -> None:
        self.metrics.record_pass(stats, full=full)
        with self._lock:
            self.totals.passes += 1
            if full:
                self.last_pass = stats
                self.last_pass_at = self._wall()
        self.status()

    # --- output ----------------------------------------------------------------------------

    def status(self) -> None:
        """STATUS= for `systemctl status`: one line."""
        v = self.view
        degraded, stuck = v.degraded(), v.stuck()
        with self._lock:
            p = self.last_pass
            t = self.totals.files
            text = (
                f"watching {v.watched()} users"
                + (f", {len(degraded)} by scan" if degraded else "")
                + (f", {len(stuck)} stuck" if stuck else "")
                + f"; since start {t.files_copied} copied, {t.files_refused} refused, "
                f"{t.files_failed} failed"
            )
            if p is not None:
                text += (
                    f"; last pass {p.files_copied} copied, {p.files_skipped} skipped, "
                    f"{p.files_failed} failed"
                )
        self.notifier.send("STATUS=" + text)

    def state(self) -> dict[str, Any]:
        """The state file's document: what `session-watcher status` shows as our view."""
        v = self.view
        with self._lock:
            p = self.last_pass
            last_pass = None
            if p is not None:
                last_pass = {"at": self.last_pass_at, **p.as_dict()}
            totals = self.totals.as_dict()
        return {
            "version": __version__,
            "pid": os.getpid(),
            "running": v.running(),
            "ready": v.ready(),
            "started_at": round(self.started_at, 3),
            "home_root": str(self.config.home_root),
            "target": self.config.target_text,
            "users_watched": v.watched(),
            "degraded": v.degraded(),
            "stuck": v.stuck(),
            "over_quota": v.over_quota(),
            "last_pass": last_pass,
            "totals": totals,
            "last_error": self.last_error.last,
        }

    def publish(self, *, force: bool = False) -> None:
        """State file when it changed (at most once a second) or every 15 s; metrics file
        every 15 s. Runs on the control thread."""
        now = self._clock()
        v = self.view
        m = self.metrics
        m.watched_users.set(v.watched())
        m.degraded.set(len(v.degraded()))
        m.stuck.set(len(v.stuck()))
        m.over_quota.set(len(v.over_quota()))
        m.ready.set(1 if v.ready() and v.running() else 0)
        m.write(now=now, force=force)
        doc = self.state()
        key = json.dumps(doc, sort_keys=True)
        last_key, last_at = self._published
        if not force and key == last_key and now - last_at < HEARTBEAT_SECONDS:
            return
        doc["updated_at"] = round(self._wall(), 3)
        if self.state_file.write(lambda: render_state(doc), now=now, force=force):
            self._published = (key, now)
