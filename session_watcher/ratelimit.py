"""Per-user rate limits: log lines a user can cause, and bytes a user's files can make us write.

Both are decisions over numbers and a time that the caller passes in, so tests drive them on
synthetic time; the callers (the copy engine, the live copier) own the effects.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "COPIES_BURST",
    "COPIES_PER_SECOND",
    "LOG_WINDOW_SECONDS",
    "ByteBudget",
    "LogLimiter",
    "TokenBucket",
]

# A user may cause one WARNING/ERROR line per kind, then one summary with a count at most
# this often, however fast they repeat the cause (a FIFO opened in a loop, a symlink swap
# between two events, a file truncated and rewritten, a full store on every close).
LOG_WINDOW_SECONDS = 60.0
# How many (user, kind) windows are remembered: bounded memory whatever users do; an
# evicted window only means its next line is logged again.
_LIMITER_MAX = 16384


@dataclass
class _Window:
    opened: float
    suppressed: int = 0


class LogLimiter:
    """One line per (user, kind) per window; repeats are counted and summarised once the
    window has passed ("... and N more like it"), when the next one comes. Thread-safe.

    Owned by whoever logs (the service for its lifetime, a `reconcile` run for its pass):
    no module-level state. `clock` is injectable for tests.
    """

    def __init__(
        self,
        window: float = LOG_WINDOW_SECONDS,
        *,
        clock: Callable[[], float] = time.monotonic,
        size: int = _LIMITER_MAX,
    ) -> None:
        self.window = window
        self._clock = clock
        self._size = size
        self._lock = threading.Lock()
        self._windows: OrderedDict[tuple[str, str], _Window] = OrderedDict()
        self.suppressed_total = 0

    def admit(self, user: str, kind: str) -> tuple[bool, int]:
        """(log this one?, how many were suppressed before it in the last window)."""
        now = self._clock()
        key = (user, kind)
        with self._lock:
            w = self._windows.get(key)
            if w is None or now - w.opened >= self.window:
                before = 0 if w is None else w.suppressed
                self._windows[key] = _Window(now)
                self._windows.move_to_end(key)
                if len(self._windows) > self._size:
                    self._windows.popitem(last=False)
                return True, before
            w.suppressed += 1
            self.suppressed_total += 1
            return False, 0

    def log(
        self,
        logger: logging.Logger,
        level: int,
        user: str,
        kind: str,
        msg: str,
        *args: object,
        extra: Mapping[str, Any] | None = None,
    ) -> bool:
        """Log `msg` at `level` if (user, kind) may; else at DEBUG (still there with -v).
        Returns whether it went out at `level`."""
        ok, before = self.admit(user, kind)
        if not ok:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(msg, *args, extra=extra)
            return False
        if before:
            msg += " (and %d more like it in the last %.0f s)"
            args = (*args, before, self.window)
        logger.log(level, msg, *args, extra=extra)
        return True

    def forget(self) -> None:
        with self._lock:
            self._windows.clear()


class TokenBucket:
    """`rate` units per second, up to `burst` saved. Not thread-safe (ByteBudget locks)."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = now

    def refill(self, now: float) -> None:
        if now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = max(self.at, now)

    def wait_for(self, need: float, now: float) -> float:
        """Seconds until `need` units are there (0: now)."""
        self.refill(now)
        if self.tokens >= need:
            return 0.0
        return (need - self.tokens) / self.rate


# Copies one user's files may cause a second, with a burst: about ten times what Claude
# Code's busiest session does (a flush every 100 ms, a few subagents beside it). Each copy
# costs two fsyncs on the store's disk, which every other user shares: a user renaming
# 50,000 names in and out must not turn the disk into a queue in front of the others.
COPIES_PER_SECOND = 100.0
COPIES_BURST = 1000.0
# A copy this small is never held back by bytes, only by copies: told "later", the user's
# copies per second are spent, for every file of theirs.
SMALL_COPY = 1 << 20


class ByteBudget:
    """What one user's files may make the service write: `rate` bytes/s with a `burst`, and
    `copies` copies/s with a burst of `copies_burst`.

    Bytes: a copy of at most `small` bytes always goes at once (a live transcript's copy is
    a few KB to a few MB: never held back by bytes), and is charged. A larger copy waits
    until the bucket holds min(its size, burst), then is charged in full: the bucket may go
    into debt, so a 1 GB file `touch`ed in a loop is copied about once per 1 GB / rate,
    while the user's small transcripts keep landing. Copies: every copy takes one token,
    which a real session never runs out of. Per user, so nobody pays for another.
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        small: int = SMALL_COPY,
        copies: float = COPIES_PER_SECOND,
        copies_burst: float = COPIES_BURST,
        clock: Callable[[], float] = time.monotonic,
        size: int = _LIMITER_MAX,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.small = small
        self.copies = copies
        self.copies_burst = copies_burst
        self._clock = clock
        self._size = size
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[TokenBucket, TokenBucket]] = OrderedDict()

    def spent(self, user: str) -> bool:
        """The user's copies per second are spent: any copy of theirs would wait."""
        if self.copies <= 0:
            return False
        now = self._clock()
        with self._lock:
            pair = self._buckets.get(user)
            return pair is not None and pair[1].wait_for(1.0, now) > 0

    def admit(self, user: str, nbytes: int) -> float:
        """0.0: write `nbytes` now (charged). Otherwise the seconds to wait (not charged).
        A rate of 0 (bytes or copies) is no limit on that."""
        if self.rate <= 0 and self.copies <= 0:
            return 0.0
        now = self._clock()
        with self._lock:
            pair = self._buckets.get(user)
            if pair is None:
                pair = self._buckets[user] = (
                    TokenBucket(self.rate, self.burst, now),
                    TokenBucket(self.copies, self.copies_burst, now),
                )
                if len(self._buckets) > self._size:
                    # A full bucket forgotten costs nothing; a user in debt forgotten gets
                    # a fresh burst. Bounded by users with copies in the last few minutes.
                    self._buckets.popitem(last=False)
            self._buckets.move_to_end(user)
            b, c = pair
            wait = c.wait_for(1.0, now) if self.copies > 0 else 0.0
            if wait > 0:
                return wait
            if self.rate > 0 and nbytes > self.small:
                wait = b.wait_for(min(float(nbytes), self.burst), now)
                if wait > 0:
                    return wait
            else:
                b.refill(now)
            if self.rate > 0:
                b.tokens -= nbytes
            if self.copies > 0:
                c.tokens -= 1.0
            return 0.0
