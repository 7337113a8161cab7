"""Live copies: what a worker does for one (user, name) an event asked for, and when to try
again after a failure. Everything the copy needs from the rest of the service (the store
of the moment, the counters, the stuck guard, the clock) is passed in."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from .config import Config
from .copy import Outcome, Result, SourceDir, sync_file
from .homes import HomeRefused, Walk, log_home_refused, open_home, open_source_path, say_refused
from .logfmt import fields
from .ratelimit import SMALL_COPY, ByteBudget, LogLimiter
from .safefs import Refused, close_quietly, errno_name, escape, open_root_dir
from .store import Store, UserStore
from .stuck import StuckGuard, UserStuck
from .workqueue import WorkQueue

__all__ = ["PACE_BYTES_PER_SECOND", "LiveCopier", "retry_delay"]

log = logging.getLogger(__name__)

PACE_BYTES_PER_SECOND = 40e6  # a copy of N bytes waits N / this before the file's next one
# A failed copy (ENOSPC, EIO, ...) is tried again after 2 s, then after as long as it has
# been failing (so about 4, 8, ...), at most a minute (`retry_delay`): a session that went
# idle while the store was full still lands soon after space is back.
RETRY_FIRST_SECONDS = 2.0
RETRY_MAX_SECONDS = 60.0
STUCK_RETRY_SECONDS = 30.0  # a stuck user's file is looked at again this much later
CTIME_MEMORY = 50_000  # files whose last copied ctime is remembered (about 5 MB)


def retry_delay(failing_for: float) -> float:
    """Wait before the next try of a copy that has been failing for `failing_for` seconds:
    2 s at first, then as long as it has been failing (so about doubling), at most 60 s."""
    return min(RETRY_MAX_SECONDS, max(RETRY_FIRST_SECONDS, failing_for))


@dataclass(frozen=True)
class Wiring:
    """What the live copier calls back: the store of the moment (each full pass makes a
    new one) and where results are counted; with --depth over 1, `watch_dir` watches a
    directory a worker walked (`Watcher.add_nested`) and `no_dir` says there was nothing
    to watch where a resumed session's directory would be (`Watcher.note_absent`)."""

    store: Callable[[], Store]
    count: Callable[[Result], None]
    watch_dir: Callable[[SourceDir, os.stat_result], bool] | None = None
    no_dir: Callable[[str, str], None] | None = None


class LiveCopier:
    def __init__(
        self,
        config: Config,
        wiring: Wiring,
        guard: StuckGuard,
        limiter: LogLimiter,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        on_shed: Callable[[Hashable], None] | None = None,
    ) -> None:
        self.config = config
        self.wiring = wiring
        self.guard = guard
        self.limiter = limiter
        self._clock = clock
        self._wall = wall
        self.budget = ByteBudget(
            config.user_write_mb_s * 1e6,
            config.user_write_mb_s * 16e6,
            copies=config.user_copies_s,
            copies_burst=config.user_copies_s * 10,
            clock=clock,
        )
        self.queue = WorkQueue(self.handle, workers=config.workers, on_shed=on_shed, clock=clock)
        self._failed: dict[Hashable, float] = {}  # key -> when its copies started failing
        # key -> the source's (device, inode, ctime) when we last copied it or found it up
        # to date: an event forces a copy only if the source changed since (sync_file's
        # `force`). Bounded: a file forgotten is forced once more on its next event.
        self._ctimes: OrderedDict[Hashable, tuple[int, int, int]] = OrderedDict()
        self._ctimes_lock = threading.Lock()

    def submit(self, user: str, name: str, when: float | None, delay: float) -> None:
        """From the watcher (its reader thread): quick, no I/O. `name` is the file's path
        relative to the sessions directory (`proj/sess.jsonl` with --depth over 1)."""
        self.queue.submit((user, name), trigger=when, delay=delay)

    def submit_dir(self, user: str, rel: str, when: float | None) -> None:
        """From the watcher: a directory `rel` below `user`'s sessions directory appeared
        (or a resumed session's may be there): walk it, watch it, copy what is in it."""
        self.queue.submit((user, rel, "dir"), trigger=when)

    def handle(self, key: Hashable, trigger: float | None) -> float | None:
        """The queue's handler: copy once; returns when to look at the key again."""
        assert isinstance(key, tuple)
        user, name = key[0], key[1]
        if len(key) == 3:
            try:
                with self.guard.io(user):
                    self._walk_dir(user, name)
            except UserStuck:
                return STUCK_RETRY_SECONDS
            return None
        # A real event, or a retry of a failed copy: copy even if size and mtime match (a
        # rewrite in place of the same length with its mtime set back), unless the source's
        # ctime says it has not changed since our last copy.
        force = trigger is not None or key in self._failed
        with self._ctimes_lock:
            copied_id = self._ctimes.get(key)
        try:
            with self.guard.io(user):
                result = self._copy(user, name, trigger, force, copied_id)
        except UserStuck:
            return STUCK_RETRY_SECONDS
        if result is None:
            self.retry_after(key, None)
            return None
        self._remember(key, result)
        self.wiring.count(result)
        if result.outcome is Outcome.COPIED:
            # Copies of a big hot file are spaced by their size too, so a 20 MB transcript
            # closed every 100 ms is copied about twice a second, not ten times.
            self.queue.pace(key, result.nbytes / PACE_BYTES_PER_SECOND)
        retry = self.retry_after(key, result)
        if retry is not None:
            return retry
        if result.recheck_at is not None:
            return max(0.0, result.recheck_at - self._wall())
        return None

    def _copy(
        self,
        user: str,
        name: str,
        trigger: float | None,
        force: bool = False,
        copied_id: tuple[int, int, int] | None = None,
    ) -> Result | None:
        cfg = self.config
        home_fd: int | None = None
        source: SourceDir | None = None
        store_fd: int | None = None
        user_store: UserStore | None = None
        store = self.wiring.store()
        try:
            home_fd = open_root_dir(cfg.home_root)
            try:
                source = open_home(home_fd, user, cfg)
            except HomeRefused as e:
                log_home_refused(self.limiter, user, e)
                return None
            if source is None:
                return None
            rel, _, leaf = name.rpartition("/")
            if rel:
                try:
                    sub = open_source_path(source, rel, cfg)
                except Refused as e:
                    say_refused(self.limiter, user, rel, e)
                    return None
                except FileNotFoundError:
                    return None
                os.close(source.fd)
                source = sub
            try:
                store_fd = store.open_root(create=True)
            except Refused as e:  # the store root swapped for a symlink: never followed
                raise OSError(errno.ELOOP, f"store root: {e.reason}") from None
            user_store = store.user_store(store_fd, user)
            return sync_file(
                cfg,
                source,
                user_store,
                leaf,
                now=self._wall(),
                since=trigger,
                limiter=self.limiter,
                admit=lambda n: self._admit(user, n),
                force=force,
                copied_id=copied_id,
            )
        except OSError as e:
            self.limiter.log(
                log,
                logging.ERROR,
                user,
                "failed:" + errno_name(e.errno),
                "failed %s: %s",
                escape(f"{user}/{name}"),
                e,
                extra=fields(user, name, errno=errno_name(e.errno)),
            )
            return Result(Outcome.FAILED, detail=str(e), errno=e.errno)
        finally:
            if user_store is not None:
                user_store.close()
            close_quietly(store_fd)
            if source is not None:
                os.close(source.fd)
            close_quietly(home_fd)

    def _admit(self, user: str, nbytes: int) -> float:
        """The user's budget for one copy. Told "later" because the user's copies per
        second are spent, the queue rests the user that long, so their other due keys are
        not opened only to be refused. A big copy may wait on bytes alone, which must not
        hold back the user's small transcripts: then only that key waits."""
        wait = self.budget.admit(user, nbytes)
        if wait > 0 and (nbytes <= SMALL_COPY or self.budget.spent(user)):
            self.queue.rest(user, wait)
        return wait

    def _walk_dir(self, user: str, rel: str) -> None:
        """A worker's walk of one new (or newly active) directory below `user`'s sessions
        directory: the same checks as a pass at every level, each directory watched before
        it is listed (a file closed after that is an event; one closed before is listed),
        its files handed to the queue like events (the quick check skips those in place)."""
        cfg = self.config
        home_fd: int | None = None
        source: SourceDir | None = None
        sub: SourceDir | None = None
        try:
            home_fd = open_root_dir(cfg.home_root)
            try:
                source = open_home(home_fd, user, cfg)
            except HomeRefused:
                return  # the pass and the rescan say so
            if source is None:
                return
            try:
                sub = open_source_path(source, rel, cfg)
            except Refused as e:
                say_refused(self.limiter, user, rel, e)
                self._no_dir(user, rel)
                return
            except FileNotFoundError:
                self._no_dir(user, rel)
                return
            watch = self.wiring.watch_dir
            if watch is not None:
                watch(sub, os.fstat(sub.fd))
            for visit in Walk(cfg, self.limiter, self._wall(), hot=True).visits(sub):
                if visit.kind == "enter" and watch is not None and visit.st is not None:
                    watch(visit.source, visit.st)
                elif visit.kind == "file" and visit.entry is not None and visit.st is not None:
                    if visit.st.st_size == 0:
                        # Just created, its writer not done: the watch is in place, so its
                        # close is an event. Copied now, it would land empty and hold the
                        # close's copy back by the queue's spacing.
                        continue
                    self.queue.submit((user, visit.source.key(visit.entry.name)))
        except OSError as e:
            self.limiter.log(
                log,
                logging.ERROR,
                user,
                "failed:" + errno_name(e.errno),
                "cannot walk %s: %s",
                escape(f"{user}/{rel}"),
                e,
                extra=fields(user, rel, errno=errno_name(e.errno)),
            )
        finally:
            if sub is not None and sub is not source:
                os.close(sub.fd)
            if source is not None:
                os.close(source.fd)
            close_quietly(home_fd)

    def _no_dir(self, user: str, rel: str) -> None:
        if self.wiring.no_dir is not None:
            self.wiring.no_dir(user, rel)

    def _remember(self, key: Hashable, result: Result) -> None:
        if result.source_id is None:
            return
        with self._ctimes_lock:
            self._ctimes[key] = result.source_id
            self._ctimes.move_to_end(key)
            if len(self._ctimes) > CTIME_MEMORY:
                self._ctimes.popitem(last=False)

    def retry_after(self, key: Hashable, result: Result | None) -> float | None:
        """Seconds until a failed copy is tried again (None: it did not fail).

        The wait grows with how long the file has been failing (2 s, then about doubling
        with each timed retry, at most a minute), not with how many times: a writer that
        closes every 100 ms while the store is full for two seconds must not push its
        file's next try a minute past the moment space comes back."""
        now = self._clock()
        if result is None or result.outcome is not Outcome.FAILED:
            self._failed.pop(key, None)
            return None
        since = self._failed.setdefault(key, now)  # dict ops are atomic under the GIL
        return retry_delay(now - since)

    def after_pass(self, source: SourceDir, name: str, result: Result) -> None:
        """A pass's result for one file: a failure is retried on the live timer, a held-back
        tail is looked at again when the source will be quiet."""
        key = (source.user, source.key(name))
        self._remember(key, result)
        retry = self.retry_after(key, result)
        if retry is not None:
            self.queue.submit(key, delay=retry)
        elif result.recheck_at is not None:
            delay = max(0.0, result.recheck_at - self._wall())
            self.queue.submit(key, delay=delay)
