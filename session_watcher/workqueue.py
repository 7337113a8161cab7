"""Per-file coalescing work queue with adaptive spacing, run by a few worker threads.

Why not a plain queue: a writer that closes a file 10 times a second (Claude Code's 100 ms
flush) or 1,000 times in a burst must cost a handful of copies, not one per close. Per key
there is at most one job running and one pending; a new event for a pending key only
keeps the earliest trigger time. And a key's next run waits `spacing` times as long as its
last run took, or what the handler asked for with `pace()` (the service: in proportion to
the bytes copied), capped so that no key lags more than `max_lag`: a 20 MB transcript is
copied about twice a second while a 10 KB one still lands within a millisecond of its
close.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

__all__ = ["WorkQueue"]

log = logging.getLogger(__name__)

MAX_DELAY = 3600.0  # no key waits longer than this, whatever it asks for


@dataclass
class _Entry:
    pending: bool = False
    running: bool = False
    due: float = 0.0
    trigger: float | None = None  # wall time of the earliest event this run answers
    last_end: float = 0.0
    last_cost: float = 0.0
    min_gap: float = 0.0  # asked for by the handler with `pace()`


# handler(key, trigger) -> optional delay in seconds after which to run the key again
Handler = Callable[[Hashable, "float | None"], "float | None"]


class WorkQueue:
    def __init__(
        self,
        handler: Handler,
        *,
        workers: int = 4,
        spacing: float = 3.0,
        max_lag: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        name: str = "copy",
    ) -> None:
        self._handler = handler
        self._spacing = spacing
        self._max_lag = max_lag
        self._clock = clock
        self._cond = threading.Condition()
        self._entries: dict[Hashable, _Entry] = {}
        self._heap: list[tuple[float, int, Hashable]] = []
        self._seq = itertools.count()
        self._stopping = False
        self._busy = 0
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def submit(self, key: Hashable, *, trigger: float | None = None, delay: float = 0.0) -> None:
        """Ask for `key` to be handled (again) no sooner than `delay` seconds from now."""
        now = self._clock()
        delay = min(max(0.0, delay), MAX_DELAY)  # a user-set mtime in year 2500 included
        with self._cond:
            if self._stopping:
                return
            e = self._entries.get(key)
            if e is None:
                e = self._entries[key] = _Entry()
            due = max(now + delay, e.last_end + self._gap(e))
            if trigger is not None and (e.trigger is None or trigger < e.trigger):
                e.trigger = trigger
            if e.pending and e.due <= due:
                return  # already queued, at least as early
            e.pending = True
            e.due = due
            if not e.running:
                heapq.heappush(self._heap, (due, next(self._seq), key))
                self._cond.notify()

    def _gap(self, e: _Entry) -> float:
        # A few times the last run's cost (duty cycle), at least what the handler asked
        # for, but never so long that the key's data falls more than `max_lag` behind: one
        # fsync that stalls on a busy disk must not push the next copy out by seconds.
        want = max(self._spacing * e.last_cost, e.min_gap)
        return min(want, max(0.0, self._max_lag - e.last_cost))

    def pace(self, key: Hashable, seconds: float) -> None:
        """From inside the handler: leave at least `seconds` (capped by `max_lag`) before
        the key's next run, e.g. in proportion to the bytes a copy wrote."""
        with self._cond:
            e = self._entries.get(key)
            if e is not None:
                e.min_gap = seconds

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def idle(self) -> bool:
        with self._cond:
            return self._busy == 0 and not any(e.pending for e in self._entries.values())

    def prune(self, older_than: float = 60.0) -> None:
        """Forget keys that have been idle a while (their spacing no longer matters)."""
        cutoff = self._clock() - older_than
        with self._cond:
            for key in [
                k
                for k, e in self._entries.items()
                if not e.pending and not e.running and e.last_end < cutoff
            ]:
                del self._entries[key]

    def __len__(self) -> int:
        with self._cond:
            return len(self._entries)

    def stop(self, timeout: float = 10.0) -> bool:
        """Drop pending work, let running jobs finish; True if all workers ended in time."""
        with self._cond:
            self._stopping = True
            self._heap.clear()
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _next(self) -> tuple[Hashable, float | None] | None:
        with self._cond:
            while not self._stopping:
                if not self._heap:
                    self._cond.wait()
                    continue
                due, _, key = self._heap[0]
                wait = due - self._clock()
                if wait > 0:
                    # Bounded: Condition.wait raises OverflowError past ~292 years.
                    self._cond.wait(min(wait, MAX_DELAY))
                    continue
                heapq.heappop(self._heap)
                e = self._entries.get(key)
                if e is None or e.running or not e.pending or e.due != due:
                    continue  # a stale heap item: superseded by an earlier or later submit
                e.pending = False
                e.running = True
                trigger, e.trigger = e.trigger, None
                self._busy += 1
                return key, trigger
            return None

    def _work(self) -> None:
        while True:
            try:
                job = self._next()
            except Exception:  # nothing may kill a worker: that would stop every copy
                log.exception("work queue error")
                continue
            if job is None:
                return
            key, trigger = job
            started = self._clock()
            again: float | None = None
            try:
                again = self._handler(key, trigger)
            except Exception:  # a bug must not kill the worker: log it, keep serving
                log.exception("unexpected error handling %r", key)
            ended = self._clock()
            with self._cond:
                self._busy -= 1
                e = self._entries[key]
                e.running = False
                e.last_end = ended
                e.last_cost = ended - started
                if again is not None and not self._stopping:
                    due = ended + again
                    if not e.pending or due < e.due:
                        e.pending = True
                        e.due = due
                if e.pending and not self._stopping:
                    e.due = max(e.due, e.last_end + self._gap(e))
                    heapq.heappush(self._heap, (e.due, next(self._seq), key))
                    self._cond.notify()
