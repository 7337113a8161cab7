"""The full reconciliation pass: every qualifying file of every qualifying home, once."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from .config import Config
from .copy import Outcome, Result, SourceDir, quick_skip, sync_file
from .homes import Home, Walk, list_homes, walk_user
from .objstore import store_for_target
from .ratelimit import SMALL_COPY, LogLimiter
from .safefs import Refused, close_quietly, escape, open_dir_at, open_root_dir
from .store import Store, UserStore, lookup_gid
from .stuck import UserStuck

# Copies of one user queued on the pass's pool at once (see _pass_user).
_MAX_IN_FLIGHT = 64

__all__ = ["DirWatches", "PassStats", "Progress", "reconcile", "store_for"]

log = logging.getLogger(__name__)


class DirWatches(Protocol):
    """What a pass tells the service's watcher about the directories below each sessions
    directory (--depth over 1): `begin(user)` before a user's walk (a token), `visit` for
    each directory entered (`watch`: whether it should be watched), `end` after it
    (`complete`: the whole tree was walked, so watches of directories not visited or no
    longer active, and older than the token, can go)."""

    def begin(self, user: str) -> int: ...

    def visit(self, source: SourceDir, st: os.stat_result, watch: bool) -> None: ...

    def end(self, user: str, token: int, complete: bool) -> None: ...


@dataclass
class PassStats:
    """Counts of one pass; `as_dict()` gives the keys of `--json` and of the library API."""

    users_processed: int = 0
    files_copied: int = 0
    files_skipped: int = 0
    files_refused: int = 0
    files_failed: int = 0
    bytes_copied: int = 0
    duration_s: float = 0.0
    homes_done: int = field(default=0, repr=False, compare=False)  # for progress only
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_skipped(self, n: int) -> None:
        with self._lock:
            self.files_skipped += n

    def record(self, result: Result) -> None:
        with self._lock:
            if result.outcome is Outcome.COPIED:
                self.files_copied += 1
                self.bytes_copied += result.nbytes
            elif result.outcome in (Outcome.SKIPPED, Outcome.VANISHED):
                self.files_skipped += 1
            elif result.outcome is Outcome.REFUSED:
                self.files_refused += 1
            else:
                self.files_failed += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "users_processed": self.users_processed,
            "files_copied": self.files_copied,
            "files_skipped": self.files_skipped,
            "files_refused": self.files_refused,
            "files_failed": self.files_failed,
            "bytes_copied": self.bytes_copied,
            "duration_s": round(self.duration_s, 3),
        }


@dataclass(frozen=True)
class Progress:
    """Where a pass is, for a progress display: homes done of those found, bytes so far."""

    users_done: int
    users_total: int
    bytes_copied: int


def store_for(
    config: Config,
    *,
    dry_run: bool = False,
    previous: Store | None = None,
    paced: bool = False,
    limiter: LogLimiter | None = None,
) -> Store:
    """The store of `config.target`: a directory Store with the group looked up (warns
    once when the group does not exist), or an object store (objstore.py) that takes over
    `previous`'s bucket connection; `paced`: the live service's upload pacing. A directory
    Store takes over `previous`'s quota episodes (and, nested, its usage)."""
    if config.bucket is not None:
        return store_for_target(config, None, dry_run=dry_run, previous=previous, paced=paced)
    gid = lookup_gid(config.group)
    if gid is None:
        log.warning("group %s not found, using default group", escape(config.group))
    store = Store(config, gid, dry_run=dry_run, limiter=limiter)
    return store if previous is None else store.inherit(previous)


def reconcile(
    config: Config,
    *,
    dry_run: bool = False,
    now: Callable[[], float] = time.time,
    on_result: Callable[[SourceDir, str, Result], None] | None = None,
    only: Collection[str] | None = None,
    stop: threading.Event | None = None,
    store: Store | None = None,
    progress: Callable[[Progress], None] | None = None,
    limiter: LogLimiter | None = None,
    guard: Callable[[str], AbstractContextManager[None]] | None = None,
    beat: Callable[[], None] | None = None,
    watches: DirWatches | None = None,
    admit: Callable[[str, int], float] | None = None,
    held_full: Callable[[str], bool] | None = None,
) -> PassStats:
    """Run one full pass and return its counts. Never raises for a bad file or user.

    Raises OSError only when the home root or the store root cannot be opened at all.
    `on_result` lets the service see each file's result (to schedule a held-back tail);
    `only` limits the pass to those home names; `stop` ends it early between users;
    `store` reuses the caller's Store (group already looked up) instead of a new one;
    `progress` is called as homes finish and files are copied (the CLI draws a bar with it;
    the homes are then listed up front, which costs memory per home, not per file);
    `limiter` limits log lines per user and kind (default: one per user and kind per
    minute, for this pass); `guard(user)` wraps each user's I/O (the service's stuck
    guard: a user whose file system blocks is skipped, not waited for); `watches` is told
    of every directory below a sessions directory (`DirWatches`); `admit(user, nbytes)` is
    the user's byte budget (`ByteBudget.admit`): a copy it holds back is a SKIPPED result
    with `recheck_at` (None: copies go at disk speed, as `session-watcher reconcile` does);
    `held_full(user)` says whoever takes those (`on_result`) can take no more of the
    user's: the user's walk stops there, and the taker owes the user another pass.
    """
    own_store = store is None
    if store is None:
        store = store_for(config, dry_run=dry_run, limiter=limiter)
    try:
        return _reconcile(
            config,
            store,
            dry_run,
            now,
            on_result,
            only,
            stop,
            progress,
            limiter,
            guard,
            beat,
            watches,
            admit,
            held_full,
        )
    finally:
        if own_store:
            store.close()


def _reconcile(
    config: Config,
    store: Store,
    dry_run: bool,
    now: Callable[[], float],
    on_result: Callable[[SourceDir, str, Result], None] | None,
    only: Collection[str] | None,
    stop: threading.Event | None,
    progress: Callable[[Progress], None] | None,
    limiter: LogLimiter | None,
    guard: Callable[[str], AbstractContextManager[None]] | None,
    beat: Callable[[], None] | None,
    watches: DirWatches | None,
    admit: Callable[[str, int], float] | None,
    held_full: Callable[[str], bool] | None,
) -> PassStats:
    if limiter is None:
        limiter = LogLimiter()
    each = guard if guard is not None else _no_guard
    started = time.monotonic()
    stats = PassStats()
    home_fd = open_root_dir(config.home_root)
    # Copies (not checks) run on a few threads: a copy waits on the disk (copy_file_range,
    # two fsyncs) with the GIL released, so a cold pass keeps the disk busy; the no-op
    # checks stay on this thread, where the GIL would only make them slower. The threads
    # are made on the first copy, so a pass with nothing to copy starts none.
    pool = (
        None
        if dry_run or config.workers <= 1
        else ThreadPoolExecutor(config.workers, thread_name_prefix="pass-copy")
    )
    try:
        try:
            store_fd = store.open_root(create=True)
        except Refused as e:
            raise OSError(f"store {escape(config.target_text)}: {e.reason}") from None
        except OSError as e:
            raise OSError(e.errno, f"store {escape(config.target_text)}: {e.strerror}") from None
        try:
            homes: Iterable[Home] = list_homes(home_fd, config, guard)
            total = 0
            if progress is not None:
                homes = [h for h in homes if only is None or h.name in only]
                total = len(homes)
                progress(Progress(0, total, 0))
                on_result = _with_progress(on_result, progress, stats, total)
            ctx = _Pass(
                config,
                store,
                dry_run,
                stats,
                on_result,
                stop,
                pool,
                limiter,
                beat,
                watches,
                admit,
                held_full,
            )
            visited: set[str] = set()
            for home in homes:
                if stop is not None and stop.is_set():
                    break
                if only is not None and home.name not in only:
                    continue
                visited.add(home.name)  # its store directory is swept by its own pass
                try:
                    with each(home.name):
                        if _pass_home(ctx, home_fd, home, store_fd, now()):
                            stats.users_processed += 1
                except UserStuck:
                    log.debug("pass: user %s is stuck; skipped", escape(home.name))
                finally:
                    if progress is not None:
                        stats.homes_done += 1
                        progress(Progress(stats.homes_done, total, stats.bytes_copied))
            if only is None and store_fd is not None and not (stop and stop.is_set()):
                _sweep_other_store_dirs(store, store_fd, visited)
        finally:
            close_quietly(store_fd)
    finally:
        os.close(home_fd)
        if pool is not None:
            pool.shutdown(wait=True)
    stats.duration_s = time.monotonic() - started
    log.info(
        "pass %s: %d users, %d copied, %d skipped, %d refused, %d failed, %d bytes in %.2f s",
        "(dry run) done" if dry_run else "done",
        stats.users_processed,
        stats.files_copied,
        stats.files_skipped,
        stats.files_refused,
        stats.files_failed,
        stats.bytes_copied,
        stats.duration_s,
    )
    return stats


def _with_progress(
    on_result: Callable[[SourceDir, str, Result], None] | None,
    progress: Callable[[Progress], None],
    stats: PassStats,
    total: int,
) -> Callable[[SourceDir, str, Result], None]:
    def both(source: SourceDir, name: str, result: Result) -> None:
        if on_result is not None:
            on_result(source, name, result)
        if result.outcome is Outcome.COPIED:
            progress(Progress(stats.homes_done, total, stats.bytes_copied))

    return both


@contextmanager
def _no_guard(user: str) -> Iterator[None]:
    yield


@dataclass(frozen=True, slots=True)
class _Pass:
    """What one pass's per-user steps share (see `reconcile` for each)."""

    config: Config
    store: Store
    dry_run: bool
    stats: PassStats
    on_result: Callable[[SourceDir, str, Result], None] | None
    stop: threading.Event | None
    pool: ThreadPoolExecutor | None
    limiter: LogLimiter
    beat: Callable[[], None] | None
    watches: DirWatches | None
    admit: Callable[[str, int], float] | None
    held_full: Callable[[str], bool] | None


def _pass_home(ctx: _Pass, home_fd: int, home: Home, store_fd: int | None, now: float) -> bool:
    source = walk_user(home_fd, home, ctx.config, ctx.limiter)
    if source is None:
        return False
    try:
        return _pass_user(ctx, store_fd, source, now)
    finally:
        os.close(source.fd)


def _leave_store_dir(store: Store, user_store: UserStore, source: SourceDir, now: float) -> None:
    """The pass is done with the files of `source`: temp files a crash left in its store
    directory go, and the store directories it is done with are closed."""
    dir_fd = user_store.cached(source.rel)
    try:
        if dir_fd is not None:
            store.remove_stale_temps(dir_fd, f"{source.user}/{source.rel}", now)
    except OSError as e:
        log.error("store directory of %s: %s", escape(f"{source.user}/{source.rel}"), e)
    finally:
        user_store.forget(source.rel)


def _sweep_other_store_dirs(store: Store, store_fd: int, visited: set[str]) -> None:
    """Temp files a crash left in store directories whose home is gone or was renamed
    (the store is an archive: those directories stay, and no user's pass visits them)."""
    if store.dry_run:
        return
    try:
        with os.scandir(store_fd) as it:
            names = [
                e.name for e in it if e.name not in visited and e.is_dir(follow_symlinks=False)
            ]
    except OSError as e:
        log.error("could not list the store: %s", e)
        return
    for name in names:
        try:
            fd, _ = open_dir_at(store_fd, name)
        except (Refused, OSError):
            continue  # gone, or a planted symlink: never followed
        try:
            store.remove_stale_temps(fd, name)
        except OSError as e:
            log.error("store directory of %s: %s", escape(name), e)
        finally:
            os.close(fd)


def _pass_user(ctx: _Pass, store_fd: int | None, source: SourceDir, now: float) -> bool:
    """One user's files, at every level down to --depth (`homes.Walk`); True when the user
    had at least one qualifying file. `stop` is checked before each file, so a service
    asked to stop is not held by a big home. Up-to-date files are counted here, without a
    Result or `on_result`; the others go through `sync_file`, on `pool` when there is one.
    `watches` (the service's) is told of each directory below the sessions directory as
    the walk enters it, before it is listed: a file closed in it after that is an event.
    A copy over the user's byte budget (`admit`) is left for the live queue to pace."""
    config, store, dry_run, stats, on_result = (
        ctx.config,
        ctx.store,
        ctx.dry_run,
        ctx.stats,
        ctx.on_result,
    )
    stop, pool, limiter, beat, watches = ctx.stop, ctx.pool, ctx.limiter, ctx.beat, ctx.watches
    user = source.user
    admit: Callable[[int], float] | None = None
    over: list[float] = []  # when the user's budget said "later": the rest of theirs wait too
    if ctx.admit is not None:
        budget = ctx.admit

        def admit(nbytes: int) -> float:
            wait = budget(user, nbytes)
            if wait > 0 and nbytes <= SMALL_COPY:
                over.append(now + wait)  # copies spent: the next small one would wait too
            return wait

    user_store = store.user_store(store_fd, source.user)
    seen = False
    unusable: OSError | None = None
    skipped = 0
    pending: list[Future[None]] = []

    def report(dir_source: SourceDir, name: str, result: Result) -> None:
        stats.record(result)
        if on_result is not None:
            on_result(dir_source, name, result)

    def hand_on(dir_source: SourceDir, name: str) -> None:
        # Over budget: the live queue copies it at the user's pace. Not even opened here,
        # so a pass over 200,000 changed files of one user stays a cheap walk.
        report(dir_source, name, Result(Outcome.SKIPPED, recheck_at=over[0]))

    def sync(dir_source: SourceDir, name: str, st: os.stat_result) -> None:
        if stop is not None and stop.is_set():
            return  # queued on the pool before the stop: left for the next pass
        if over:  # set after this file was queued on the pool
            hand_on(dir_source, name)
            return
        result = sync_file(
            config,
            dir_source,
            user_store,
            name,
            now=now,
            dry_run=dry_run,
            lstat=st,
            limiter=limiter,
            admit=admit,
        )
        report(dir_source, name, result)

    try:
        try:
            dir_fd = user_store.fd(create=False)
            if dir_fd is not None:
                store.remove_stale_temps(dir_fd, source.user, now)
        except OSError as e:
            if e.errno == errno.ELOOP:
                # A symlink planted as the user's store directory: never followed. Every
                # file of the user fails, but one line says why, not one line per file.
                unusable = e
                log.error(
                    "store directory of %s: %s; its files are not copied this pass",
                    escape(source.user),
                    e.strerror,
                )
            else:
                log.error("store directory of %s: %s", escape(source.user), e)
        full = False  # the user's held-back files have nowhere to go: the walk ends

        def walk_ends() -> bool:
            return full or (stop is not None and stop.is_set())

        walk = Walk(config, limiter, now, stop=walk_ends)
        token = watches.begin(source.user) if watches is not None else 0
        for visit in walk.visits(source):
            if beat is not None:
                beat()  # a big directory is slow, not stuck: see StuckGuard.beat
            if visit.kind == "enter":
                if watches is not None and visit.st is not None:
                    watches.visit(visit.source, visit.st, visit.watch)
                continue
            if visit.kind == "leave":
                if visit.source.rel:
                    # Its copies use its descriptor, which the walk closes next: all of
                    # them end first. Then the store directory's own leftovers go, and
                    # its descriptor (the store is never held open whole).
                    futures.wait(pending)
                    for future in pending:
                        future.result()
                    pending = []
                    _leave_store_dir(store, user_store, visit.source, now)
                continue
            entry, st = visit.entry, visit.st
            assert entry is not None
            seen = True
            if st is None:
                skipped += 1  # vanished: not a failure
                continue
            dir_source = visit.source
            name = entry.name
            if unusable is not None:
                report(
                    dir_source,
                    name,
                    Result(Outcome.FAILED, detail=str(unusable), errno=unusable.errno),
                )
                continue
            try:
                if quick_skip(config, dir_source, user_store, name, st):
                    skipped += 1
                    continue
            except OSError:
                pass  # sync_file meets it again, and says what it is
            if over:
                # Handed on here, not through the pool (a thread hand-over per file of
                # 200,000 costs more than the walk), until the taker is full.
                hand_on(dir_source, name)
                if ctx.held_full is not None and ctx.held_full(user):
                    full = True
                continue
            if pool is None:
                sync(dir_source, name, st)
            else:
                if len(pending) >= _MAX_IN_FLIGHT:
                    # Bounded: a directory of 200,000 files to copy holds a few
                    # futures at a time, not one per file.
                    done, rest = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                    if beat is not None:
                        beat()
                    for future in done:
                        future.result()
                    pending = list(rest)
                pending.append(pool.submit(sync, dir_source, name, st))
        if watches is not None:
            complete = not walk_ends() and walk.entries <= walk.user_limit
            watches.end(source.user, token, complete)
            if not dry_run:
                # The service's nested store: its usage measured here, on the walker,
                # not by the user's first live copy (see Store.inherit).
                futures.wait(pending)
                store.measure(source.user, user_store.fd(create=False))
    except OSError as e:
        log.error("could not list sessions of %s: %s", escape(source.user), e)
    finally:
        # The copies use this user's descriptors: all of them end before those close
        # (all, even if one raised: its error is re-raised once the descriptors are shut).
        futures.wait(pending)
        stats.add_skipped(skipped)
        user_store.close()
        for future in pending:
            future.result()
    return seen
