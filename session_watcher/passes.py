"""The walker: the one thread that walks homes for the service. It runs what is asked of it,
coalesced: passes (full, or over a few users), rescans of the watch set (full, or the 5 s
poll), retries of degraded directories, and the periodic full pass.

Coalescing: at most one pass runs and one waits; asking again only widens the waiting one
(users are merged, a full pass absorbs them). A user whose events were shed by the work
queue, or whose inotify queue overflowed, is served by a pass over those users, not over
everyone. Full passes asked for by overflows are spaced at least `OVERFLOW_SPACING` apart:
nothing is lost by waiting (the pass that comes sees every file), and a user who floods
events cannot make the service walk every home back to back.

If the walker itself gets stuck in a user's blocking file system, the control loop calls
`replace()`: a new walker thread takes over (skipping stuck users), and the old one ends
when its call returns.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .stuck import Retired

__all__ = ["OVERFLOW_SPACING", "Walker", "WalkerJobs"]

log = logging.getLogger(__name__)

OVERFLOW_SPACING = 10.0


@dataclass(frozen=True)
class WalkerJobs:
    """What the walker runs; each may raise (logged, the walker goes on)."""

    run_pass: Callable[[set[str] | None], None]
    rescan: Callable[[bool, set[str] | None], None]  # (full, only these users)
    retry_degraded: Callable[[], None]


class Walker:
    def __init__(
        self,
        jobs: WalkerJobs,
        stop: threading.Event,
        *,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._jobs = jobs
        self._stop = stop
        self._interval = interval
        self._clock = clock
        self._cond = threading.Condition()
        self._pass_users: set[str] | None = set()  # None = a full pass is asked for
        self._pass_asked = False
        self._urgent = False  # asked by something else than an overflow: never delayed
        self._rescan: bool | None = None  # None: no rescan asked; True: full
        self._rescan_users: set[str] = set()  # a rescan of only these (after their overflow)
        self._degraded = False
        self._generation = 0
        self._thread: threading.Thread | None = None
        self._next_full = clock() + interval if interval else None
        self._last_overflow_pass = float("-inf")  # when a full pass last ran for one
        self.busy_since: float | None = None

    # --- asking (any thread) ---------------------------------------------------------------

    def request_pass(self, users: set[str] | None, *, overflow: bool = False) -> None:
        """Ask for a pass over `users` (None: every home)."""
        with self._cond:
            if users is None or self._pass_users is None:
                self._pass_users = None
            else:
                self._pass_users |= users
            self._pass_asked = True
            self._urgent = self._urgent or not overflow or users is not None
            self._cond.notify_all()

    def _not_before(self) -> float:
        if self._urgent or self._pass_users is not None:
            return float("-inf")
        return self._last_overflow_pass + OVERFLOW_SPACING

    def request_rescan(self, *, full: bool, users: set[str] | None = None) -> None:
        """Full: walk every home. Not full: the poll (homes not watched yet), plus a walk of
        `users` (whose watches may have lost an event)."""
        with self._cond:
            self._rescan = bool(self._rescan) or full
            if users:
                self._rescan_users |= users
            self._cond.notify_all()

    def request_degraded(self) -> None:
        with self._cond:
            self._degraded = True
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # --- the thread ---------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            self._spawn()

    def _spawn(self) -> None:
        self._generation += 1
        gen = self._generation
        self._thread = threading.Thread(
            target=self._run, args=(gen,), name=f"walker-{gen}", daemon=True
        )
        self._thread.start()

    def replace(self) -> None:
        """The current walker is stuck in a system call: start another in its place. What
        the stuck one was doing is asked for again (a full pass; stuck users are skipped)."""
        with self._cond:
            log.warning("walker thread stuck; starting another in its place")
            self._pass_users = None
            self._pass_asked = True
            self._urgent = True
            self._spawn()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def alive(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    def join(self, timeout: float) -> bool:
        t = self._thread
        if t is not None and t.is_alive():
            t.join(timeout)
            return not t.is_alive()
        return True

    def _take(self) -> tuple[str, Callable[[], None]] | None:
        """The next job, or None to wait. Rescans first (cheap, and a pass needs the watches
        set before it, so that nothing closed during the pass is lost), then degraded
        retries, then passes."""
        now = self._clock()
        if self._rescan is not None:
            full, self._rescan = self._rescan, None
            again, self._rescan_users = self._rescan_users, set()
            return ("rescan", functools.partial(self._jobs.rescan, full, None if full else again))
        if self._degraded:
            self._degraded = False
            return ("degraded", self._jobs.retry_degraded)
        due_full = self._next_full is not None and now >= self._next_full
        if (self._pass_asked and now >= self._not_before()) or due_full:
            users = self._pass_users if self._pass_asked else None
            if due_full:
                users = None
            if users is None and self._pass_asked and not self._urgent:
                self._last_overflow_pass = now
            self._pass_asked, self._pass_users, self._urgent = False, set(), False
            if users is None and self._interval:
                self._next_full = now + self._interval
            return ("pass", functools.partial(self._jobs.run_pass, users))
        return None

    def _timeout(self) -> float | None:
        now = self._clock()
        times = []
        if self._next_full is not None:
            times.append(self._next_full - now)
        if self._pass_asked:
            times.append(self._not_before() - now)
        return max(0.0, min(times)) if times else None

    def _run(self, gen: int) -> None:
        while not self._stop.is_set():
            with self._cond:
                if gen != self._generation:
                    return  # replaced while stuck: the new walker has the work
                job = self._take()
                if job is None:
                    self._cond.wait(self._timeout())
                    continue
            kind, step = job
            self.busy_since = self._clock()
            try:
                step()
            except Retired:  # replaced while stuck: the new walker has the work
                return
            except OSError as e:  # an unusable root this time; the next one tries again
                log.error("%s failed: %s", kind, e)
            except Exception:  # a bug: the traceback is what a developer needs
                log.exception("%s failed", kind)
            finally:
                self.busy_since = None
