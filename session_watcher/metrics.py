"""Prometheus metrics of the running service, for node_exporter's textfile collector.

A private CollectorRegistry (never the global one: a library user's own metrics stay
theirs). Label values come from small fixed sets only (refusal kinds, errno names, pass
scope), never from user names or paths, so the series count stays bounded whatever users
name their files.
"""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from . import __version__
from .copy import REFUSAL_KINDS, Outcome, Result
from .reconcile import PassStats
from .safefs import errno_name
from .state import AtomicFile

__all__ = ["REFUSAL_KINDS", "WRITE_SECONDS", "Metrics"]

WRITE_SECONDS = 15.0
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PASS_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600)


class Metrics:
    def __init__(self, path: Path | None = None) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        p = "session_watcher_"
        self.copies = Counter(p + "copies", "Files copied into the store.", registry=r)
        self.bytes = Counter(p + "copied_bytes", "Bytes copied into the store.", registry=r)
        self.refusals = Counter(
            p + "refusals", "Source entries refused, by kind.", ["reason"], registry=r
        )
        self.failures = Counter(
            p + "failures", "Copies that failed, by errno name.", ["errno"], registry=r
        )
        self.overflows = Counter(
            p + "overflows", "Kernel event queue overflows (each starts a full pass).", registry=r
        )
        self.passes = Counter(
            p + "passes", "Reconciliation passes run (full or a few users).", ["scope"], registry=r
        )
        self.pass_duration = Histogram(
            p + "pass_duration_seconds",
            "Duration of full reconciliation passes.",
            buckets=PASS_BUCKETS,
            registry=r,
        )
        self.last_pass_copied = Gauge(
            p + "last_pass_files_copied",
            "Files the last full pass had to copy (live watching had missed or not yet done them).",
            registry=r,
        )
        self.last_pass_failed = Gauge(
            p + "last_pass_files_failed", "Files that failed in the last full pass.", registry=r
        )
        self.last_pass_time = Gauge(
            p + "last_pass_timestamp_seconds", "When the last full pass ended.", registry=r
        )
        self.latency = Histogram(
            p + "event_to_landed_seconds",
            "From the event that triggered a copy to the copy being in the store.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.watched_users = Gauge(
            p + "watched_users", "Users whose sessions directory is watched.", registry=r
        )
        self.degraded = Gauge(
            p + "degraded_directories",
            "Sessions directories that could not be watched (served by a 30 s scan).",
            registry=r,
        )
        self.stuck = Gauge(
            p + "stuck_users",
            "Users whose file system has not answered in time (their work is skipped).",
            registry=r,
        )
        self.over_quota = Gauge(
            p + "over_quota_users",
            "Users whose new copies are refused: over --max-user-bytes or --max-user-files.",
            registry=r,
        )
        self.ready = Gauge(
            p + "ready", "1 once the initial pass is done and watches are set.", registry=r
        )
        self.start_time = Gauge(p + "start_time_seconds", "When the service started.", registry=r)
        self.updated = Gauge(
            p + "last_update_timestamp_seconds", "When this metrics file was written.", registry=r
        )
        info = Gauge(p + "build_info", "Version of session-watcher.", ["version"], registry=r)
        info.labels(version=__version__).set(1)
        self.start_time.set(time.time())
        # Every label value exists from the start, so rate() and alerts see a 0, not no data.
        for kind in REFUSAL_KINDS:
            self.refusals.labels(reason=kind)
        for scope in ("full", "users"):
            self.passes.labels(scope=scope)
        self.file = None if path is None else AtomicFile(path, "metrics file", WRITE_SECONDS)

    def record(self, result: Result) -> None:
        """One file's result, from a live copy or a pass."""
        if result.outcome is Outcome.COPIED:
            self.copies.inc()
            self.bytes.inc(result.nbytes)
            if result.latency is not None:
                self.latency.observe(max(0.0, result.latency))
        elif result.outcome is Outcome.REFUSED:
            self.refusals.labels(reason=result.kind or "other").inc()
        elif result.outcome is Outcome.FAILED:
            self.failures.labels(errno=errno_name(result.errno)).inc()

    def record_pass(self, stats: PassStats, *, full: bool) -> None:
        self.passes.labels(scope="full" if full else "users").inc()
        if full:
            self.pass_duration.observe(stats.duration_s)
            self.last_pass_copied.set(stats.files_copied)
            self.last_pass_failed.set(stats.files_failed)
            self.last_pass_time.set(time.time())

    def render(self) -> bytes:
        self.updated.set(time.time())
        return generate_latest(self.registry)

    def write(self, *, now: float, force: bool = False) -> bool:
        """Rewrite the metrics file if one is configured and 15 s have passed (`now` is
        monotonic). Never raises for an unwritable file: one WARNING."""
        if self.file is None:
            return False
        return self.file.write(self.render, now=now, force=force)
