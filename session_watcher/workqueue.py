"""Per-file coalescing work queue, fair between users, run by a few worker threads.

Why not a plain queue: a writer that closes a file 10 times a second (Claude Code's 100 ms
flush) or 1,000 times in a burst must cost a handful of copies, not one per close. Per key
(user, name) there is at most one job running and one pending; a new event for a pending
key only keeps the earliest trigger time. A key's next run waits at least `min_gap` (a close
flood costs at most 1 / min_gap copies a second per file) and what the handler asked for
with `pace()` (the service: in proportion to the bytes copied, so a 20 MB transcript is
copied about twice a second). The wait never depends on how long the last run took: one slow
fsync on a busy disk must not hold back the next copy of a small file.

Fairness: due keys are served round robin by user, one running job per user. A user with
200,000 pending files waits behind their own files, never in front of another user's, and a
user whose file system blocks holds one worker (which the service replaces: `add_worker`),
and a user whose budget is spent rests (`rest`): none of their keys is taken until then.
Pending keys are bounded per user; past the bound new keys are shed (and every new key of
that user after them, until the pending ones are taken), and `on_shed(user)` is called once
they are (the service answers with a pass over that user: nothing is lost). Not at the shed
itself: a pass then would walk the directory while the queue is still full, and, asked for
at the first shed key of a burst, may list it before the later ones exist (20,000 files
renamed in, 182 never copied); asked for at every shed key, it runs back to back for as
long as the burst lasts (a pass storm every other user waits on).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass, field

__all__ = ["WorkQueue"]

log = logging.getLogger(__name__)

MAX_DELAY = 3600.0  # no key waits longer than this, whatever it asks for
# Replacements for workers stuck in a user's blocking file system: one per stuck user (a
# stuck user's further work is skipped, not sent into the same hole), so this bounds how
# many users with hung mounts the service keeps serving everyone else around. A thread
# blocked in the kernel costs a few KB of memory.
MAX_EXTRA_WORKERS = 128


@dataclass
class _Entry:
    pending: bool = False
    running: bool = False
    due: float = 0.0
    trigger: float | None = None  # wall time of the earliest event this run answers
    last_end: float = float("-inf")
    min_gap: float = 0.0  # asked for by the handler with `pace()`


@dataclass
class _User:
    heap: list[tuple[float, int, Hashable]] = field(default_factory=list)
    pending: int = 0
    running: bool = False
    ready: bool = False  # in the round-robin deque
    owed: bool = False  # keys were shed: `on_shed` once the pending ones are taken
    rest_until: float = float("-inf")  # none of the user's keys runs before (see `rest`)


# handler(key, trigger) -> optional delay in seconds after which to run the key again
Handler = Callable[[Hashable, "float | None"], "float | None"]


def _user_of(key: Hashable) -> Hashable:
    return key[0] if isinstance(key, tuple) and key else key


class WorkQueue:
    def __init__(
        self,
        handler: Handler,
        *,
        workers: int = 4,
        min_gap: float = 0.05,
        max_pending_per_user: int = 10_000,
        on_shed: Callable[[Hashable], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "copy",
    ) -> None:
        self._handler = handler
        self._min_gap = min_gap
        self._max_pending = max_pending_per_user
        self._on_shed = on_shed
        self._clock = clock
        self._name = name
        self._cond = threading.Condition()
        self._entries: dict[Hashable, _Entry] = {}
        self._users: dict[Hashable, _User] = {}
        self._timer: list[tuple[float, int, Hashable]] = []  # (due, seq, user); may be stale
        self._ready: deque[Hashable] = deque()
        self._seq = itertools.count()
        self._stopping = False
        self._busy = 0
        self._base = workers
        self._wanted = workers
        self._live = 0
        self._threads: list[threading.Thread] = []
        self._owed: list[Hashable] = []  # users whose pass for shed keys is now due
        self._started = False

    def start(self) -> None:
        with self._cond:
            self._started = True
            for _ in range(self._wanted):
                self._spawn()

    def _spawn(self) -> None:
        t = threading.Thread(target=self._work, name=f"{self._name}-{next(self._seq)}", daemon=True)
        self._threads.append(t)
        self._live += 1
        t.start()

    def set_extra(self, n: int) -> None:
        """Run `n` workers more than configured, in place of as many stuck in a blocking
        system call (bounded by MAX_EXTRA_WORKERS); surplus workers end after their job."""
        with self._cond:
            if self._stopping:
                return
            self._wanted = self._base + max(0, min(n, MAX_EXTRA_WORKERS))
            while self._started and self._live < self._wanted:
                self._spawn()
            self._cond.notify_all()

    # --- submitting ----------------------------------------------------------------------

    def submit(
        self,
        key: Hashable,
        *,
        trigger: float | None = None,
        delay: float = 0.0,
    ) -> bool:
        """Ask for `key` to be handled (again) no sooner than `delay` seconds from now.
        False: past the user's bound, the key is shed (see the module's docstring)."""
        now = self._clock()
        delay = min(max(0.0, delay), MAX_DELAY)  # a user-set mtime in year 2500 included
        with self._cond:
            if self._stopping:
                return False
            user = _user_of(key)
            u = self._users.get(user)
            if u is None:
                u = self._users[user] = _User()
            e = self._entries.get(key)
            if e is None or not e.pending:
                # Once shed, new keys are shed until the pending ones are taken: a user
                # making keys faster than they are served must not postpone that pass
                # for as long as they keep it up (10,000 keys at 100 copies/s: 100 s).
                if u.owed or u.pending >= self._max_pending:
                    u.owed = True
                    return False
                if e is None:
                    e = self._entries[key] = _Entry()
            self._ask(u, user, key, e, now, delay, trigger)
            return True

    def _ask(
        self,
        u: _User,
        user: Hashable,
        key: Hashable,
        e: _Entry,
        now: float,
        delay: float,
        trigger: float | None,
    ) -> None:
        due = max(now + delay, e.last_end + self._gap(e))
        if trigger is not None and (e.trigger is None or trigger < e.trigger):
            e.trigger = trigger
        if e.pending and e.due <= due:
            return  # already queued, at least as early
        if not e.pending:
            u.pending += 1
        e.pending = True
        e.due = due
        if not e.running:
            heapq.heappush(u.heap, (due, next(self._seq), key))
            if not u.running and not u.ready:
                heapq.heappush(self._timer, (due, next(self._seq), user))
            self._cond.notify()

    def _gap(self, e: _Entry) -> float:
        return max(self._min_gap, e.min_gap)

    def pace(self, key: Hashable, seconds: float) -> None:
        """From inside the handler: leave at least `seconds` before the key's next run,
        e.g. in proportion to the bytes a copy wrote."""
        with self._cond:
            e = self._entries.get(key)
            if e is not None:
                e.min_gap = min(max(0.0, seconds), MAX_DELAY)

    def rest(self, user: Hashable, seconds: float) -> None:
        """From inside the handler: none of `user`'s keys runs for `seconds` (their byte or
        copy budget is spent). Without it a user with 10,000 keys due and an empty budget
        would have each key opened, refused and queued again in turn, a busy loop of
        system calls and GIL hand-overs that every other user's copies wait behind."""
        with self._cond:
            u = self._users.get(user)
            if u is not None:
                until = self._clock() + min(max(0.0, seconds), MAX_DELAY)
                u.rest_until = max(u.rest_until, until)

    # --- state -----------------------------------------------------------------------------

    def alive(self) -> bool:
        """At least the configured number of workers are running (stuck ones included)."""
        with self._cond:
            return sum(t.is_alive() for t in self._threads) >= self._base

    def idle(self) -> bool:
        with self._cond:
            return self._busy == 0 and not any(u.pending for u in self._users.values())

    def pending(self, user: Hashable) -> int:
        with self._cond:
            u = self._users.get(user)
            return 0 if u is None else u.pending

    def owe(self, user: Hashable) -> bool:
        """For a caller with more of `user`'s keys than the queue takes (a pass walking a
        directory of 200,000 files past the user's budget): True if a key submitted now
        would be shed; the caller may then stop, the rest are owed like shed keys
        (`on_shed` once the pending ones are taken)."""
        with self._cond:
            u = self._users.get(user)
            if u is None or not (u.owed or u.pending >= self._max_pending):
                return False
            u.owed = True
            return True

    def prune(self, older_than: float = 60.0) -> None:
        """Forget keys and users that have been idle a while (their spacing no longer
        matters): memory follows recent activity, not every file ever seen."""
        cutoff = self._clock() - older_than
        with self._cond:
            for key in [
                k
                for k, e in self._entries.items()
                if not e.pending and not e.running and e.last_end < cutoff
            ]:
                del self._entries[key]
            for user in [
                k
                for k, u in self._users.items()
                if not u.pending and not u.running and not u.ready and not u.heap
            ]:
                del self._users[user]

    def __len__(self) -> int:
        with self._cond:
            return len(self._entries)

    def stop(self, timeout: float = 10.0, *, abandon: Collection[threading.Thread] = ()) -> bool:
        """Drop pending work, let running jobs finish; True if all workers ended in time.
        Threads in `abandon` (known to be blocked in a stuck file system) are not waited
        for: they would only eat the stop budget."""
        with self._cond:
            self._stopping = True
            self._timer.clear()
            self._ready.clear()
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in list(self._threads):
            if t.is_alive() and t not in abandon:
                t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    # --- workers ---------------------------------------------------------------------------

    def _promote(self, now: float) -> float | None:
        """Move users whose first key is due onto the round-robin deque; returns the time
        until the next one is due (None: nothing waits)."""
        while self._timer:
            due, _, user = self._timer[0]
            if due > now:
                return due - now
            heapq.heappop(self._timer)
            u = self._users.get(user)
            if u is None or u.running or u.ready or not u.heap:
                continue
            head = max(u.heap[0][0], u.rest_until)
            if head > now:  # stale timer item: the user's first key moved later, or rests
                heapq.heappush(self._timer, (head, next(self._seq), user))
                continue
            u.ready = True
            self._ready.append(user)
        return None

    def _take(self, now: float) -> tuple[Hashable, float | None] | None:
        while self._ready:
            user = self._ready.popleft()
            u = self._users.get(user)
            if u is None:
                continue
            u.ready = False
            if u.running:
                continue
            if u.rest_until > now:
                heapq.heappush(self._timer, (u.rest_until, next(self._seq), user))
                continue
            while u.heap:
                due, _, key = u.heap[0]
                e = self._entries.get(key)
                if e is None or e.running or not e.pending or e.due != due:
                    heapq.heappop(u.heap)  # stale: superseded by an earlier or later submit
                    continue
                if due > now:
                    heapq.heappush(self._timer, (due, next(self._seq), user))
                    break
                heapq.heappop(u.heap)
                e.pending = False
                e.running = True
                u.pending -= 1
                if u.owed and u.pending == 0:
                    u.owed = False
                    self._owed.append(user)
                u.running = True
                trigger, e.trigger = e.trigger, None
                self._busy += 1
                return key, trigger
        return None

    def _next(self) -> tuple[Hashable, float | None] | None:
        with self._cond:
            while not self._stopping:
                if self._live > self._wanted:  # a replacement is no longer needed
                    return None
                now = self._clock()
                wait = self._promote(now)
                job = self._take(now)
                if job is not None:
                    return job
                # Bounded: Condition.wait raises OverflowError past ~292 years.
                self._cond.wait(None if wait is None else min(wait, MAX_DELAY))
            return None

    def _work(self) -> None:
        try:
            while True:
                try:
                    job = self._next()
                except Exception:  # nothing may kill a worker: that would stop every copy
                    log.exception("work queue error")
                    continue
                if job is None:
                    return
                self._pay_owed()
                self._run(*job)
        finally:
            with self._cond:
                self._live -= 1

    def _pay_owed(self) -> None:
        with self._cond:
            owed, self._owed = self._owed, []
        for user in owed:
            if self._on_shed is not None:
                try:
                    self._on_shed(user)
                except Exception:  # nothing may kill a worker
                    log.exception("work queue: on_shed failed")

    def _run(self, key: Hashable, trigger: float | None) -> None:
        again: float | None = None
        try:
            again = self._handler(key, trigger)
        except Exception:  # a bug must not kill the worker: log it, keep serving
            log.exception("unexpected error handling %r", key)
        ended = self._clock()
        with self._cond:
            self._busy -= 1
            e = self._entries[key]
            user = _user_of(key)
            u = self._users[user]
            e.running = False
            u.running = False
            e.last_end = ended
            if self._stopping:
                return
            if again is not None:
                due = ended + min(max(0.0, again), MAX_DELAY)
                if not e.pending:
                    u.pending += 1
                    e.pending = True
                    e.due = due
                elif due < e.due:
                    e.due = due
            if e.pending:
                e.due = max(e.due, e.last_end + self._gap(e))
                heapq.heappush(u.heap, (e.due, next(self._seq), key))
            if u.heap and not u.ready:
                due = max(u.heap[0][0], u.rest_until)
                heapq.heappush(self._timer, (due, next(self._seq), user))
            self._cond.notify()
