"""Which users' file systems are stuck: I/O on their behalf that has not come back in time.

A home on a hung NFS server, an autofs path whose server is gone, or a FUSE file system
that a user mounted with `allow_other` and whose daemon never answers, blocks any system
call that touches it, uninterruptibly. Nothing can cancel that call; what we can do is
notice it, stop sending more of that user's work into it, and keep serving everyone else
from other threads. Every piece of I/O done for one user runs inside `guard.io(user)`:

- a user whose I/O has been running for `bound` seconds is reported stuck (`sweep`, called
  by the control loop every second), once per episode, and the thread that is stuck is
  named so that its owner can replace it;
- while a user is stuck, `io(user)` raises `UserStuck` at once: their work is skipped
  (counted, and picked up by the first pass after they come back);
- when the stuck call returns, the user is no longer stuck (one INFO line).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .logfmt import fields
from .safefs import escape

__all__ = ["Retired", "StuckGuard", "UserStuck"]

log = logging.getLogger(__name__)


class UserStuck(Exception):
    """The user's file system is stuck: their I/O is skipped until it comes back."""

    def __init__(self, user: str) -> None:
        super().__init__(user)
        self.user = user


class Retired(BaseException):
    """Raised in a thread that was replaced while it was stuck, as soon as its call returns
    (and at its next `io`): its owner has handed the work to another thread, so this one
    must not go on changing shared state. A BaseException, so that the `except Exception`
    and `except OSError` on its way out do not swallow it; `finally` blocks still run."""


@dataclass
class _Call:
    user: str
    thread: threading.Thread
    started: float
    reported: bool = False


class StuckGuard:
    def __init__(
        self,
        bound: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_unstuck: Callable[[str], None] | None = None,
    ) -> None:
        self.bound = bound
        self._clock = clock
        self._on_unstuck = on_unstuck
        self._lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count()
        self._stuck: dict[str, int] = {}  # user -> stuck calls still in the kernel
        self._retired: set[threading.Thread] = set()

    def retire(self, thread: threading.Thread) -> None:
        """`thread` has been replaced: it ends (`Retired`) once its stuck call returns."""
        with self._lock:
            self._retired.add(thread)

    @contextmanager
    def io(self, user: str) -> Iterator[None]:
        me = threading.current_thread()
        with self._lock:
            if me in self._retired:
                self._retired.discard(me)
                raise Retired
            if user in self._stuck:
                raise UserStuck(user)
            ident = next(self._ids)
            self._calls[ident] = _Call(user, threading.current_thread(), self._clock())
        try:
            yield
        finally:
            back = False
            retired = False
            with self._lock:
                call = self._calls.pop(ident)
                if me in self._retired:
                    self._retired.discard(me)
                    retired = True
                if call.reported:
                    left = self._stuck[user] - 1
                    if left:
                        self._stuck[user] = left
                    else:
                        del self._stuck[user]
                        back = True
            if back:
                log.info(
                    "user %s: file system answers again after %.0f s",
                    escape(user),
                    self._clock() - call.started,
                    extra=fields(user, reason="unstuck"),
                )
                if self._on_unstuck is not None:
                    self._on_unstuck(user)
            if retired:
                raise Retired

    def beat(self) -> None:
        """The current thread's call is making progress (a pass over a home of 100,000
        files, each entry a quick system call): its clock starts again. A call counts as
        stuck when no single step has come back within the bound, not when the whole
        walk of a big home takes longer than that."""
        me = threading.current_thread()
        now = self._clock()
        with self._lock:
            for call in self._calls.values():
                if call.thread is me and not call.reported:
                    call.started = now

    def sweep(self) -> list[tuple[str, threading.Thread]]:
        """Calls that have just passed the bound: (user, the thread blocked in it). Each is
        reported once; the user is stuck from now until all their stuck calls return."""
        now = self._clock()
        found: list[tuple[str, threading.Thread]] = []
        with self._lock:
            for call in self._calls.values():
                if not call.reported and now - call.started >= self.bound:
                    call.reported = True
                    first = call.user not in self._stuck
                    self._stuck[call.user] = self._stuck.get(call.user, 0) + 1
                    found.append((call.user, call.thread))
                    if first:
                        log.warning(
                            "user %s: file system stuck (a call has not returned for %.0f s); "
                            "skipping this user until it answers",
                            escape(call.user),
                            now - call.started,
                            extra=fields(call.user, reason="stuck"),
                        )
        return found

    def is_stuck(self, user: str) -> bool:
        with self._lock:
            return user in self._stuck

    def stuck(self) -> list[str]:
        with self._lock:
            return sorted(self._stuck)

    def in_flight(self) -> int:
        """Calls running now, stuck or not: at stop, a thread still in one may never end."""
        with self._lock:
            return len(self._calls)

    def blocked_threads(self) -> list[threading.Thread]:
        """The threads still blocked in a call that was reported stuck."""
        with self._lock:
            return [c.thread for c in self._calls.values() if c.reported]
