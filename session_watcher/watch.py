"""inotify watches on every qualifying user's sessions directory and on the home root,
turned into (user, name) work items, on a small fixed number of reader threads.

watchdog 7.1 is the inotify layer, used below its observer: each `InotifyFD()` is one
kernel inotify instance (its own event queue) read by one thread, which calls the
`WatchCallback` registered for a watch. Its `InotifyEmitter` would add one thread per
watched directory (5,000 users: 5,009 threads; about 22,000: `can't start new thread`);
here a directory costs one watch and two dict entries, whatever their number.

Users are spread over `USER_READERS` instances by a hash of their name, the home root has
one of its own: a queue overflow (one user's flood of closes can cause it) loses the
events of the users sharing that queue only, and only they need a repair pass.

Everything on a reader thread only looks names up and hands work on: no copy, no
path-based file-system call (one user's hung FUSE or NFS mount would stall every user
sharing the reader), no exception escaping (it would end the reader: no more events).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass

from watchdog.observers.inotify_c import CallbackId, InotifyEvent, InotifyFD, WatchDescriptor
from watchdog.observers.inotify_c import InotifyConstants as C

from .config import Config
from .copy import SourceDir
from .episode import Episode
from .events import CREATED_DELAY, ROOT_MASK, SESSIONS_MASK, Action, root_action, sessions_action
from .logfmt import fields
from .safefs import errno_name, escape

__all__ = ["NESTED_WATCH_LIMIT", "USER_READERS", "Watcher", "reader_index"]

log = logging.getLogger(__name__)

# Independent inotify instances for the users (plus one for the home root). Each is one
# thread and one of the uid's `fs.inotify.max_user_instances` (128 by default). Four
# confine an overflow to about a quarter of the users at the cost of three threads.
USER_READERS = 4

Ident = tuple[int, int]  # (st_dev, st_ino)

# With --depth over 1: watches one user may hold below their sessions directory (every
# project directory, and the session and subagents/ directories of active sessions). Past
# it, the user's further directories are served like any directory that cannot be watched:
# a pass over the user every 30 s (one WARNING per episode), never a watch more.
NESTED_WATCH_LIMIT = 2_000
# (user, rel) pairs remembered as "asked for, nothing to watch there" (a session without a
# directory of its own); past this many the memory starts again (a few more walks).
_ABSENT_MEMORY = 100_000
_DIR_EVENT = C.IN_CREATE | C.IN_MOVED_TO


def reader_index(user: str, readers: int = USER_READERS) -> int:
    """Which user instance watches `user`: stable across runs (crc32, not hash())."""
    return zlib.crc32(os.fsencode(user)) % readers


@dataclass(frozen=True, slots=True)
class UserWatch:
    user: str
    path: str
    ident: Ident  # (st_dev, st_ino) of the sessions directory the walk verified
    reader: _Reader
    wd: WatchDescriptor
    cid: CallbackId
    rel: str = ""  # a directory below the sessions directory (--depth over 1)
    gen: int = 0  # when it was added, for `end` (a pass prunes only what it could see)


@dataclass(frozen=True, slots=True)
class RootWatch:
    ident: Ident
    wd: WatchDescriptor
    cid: CallbackId


class _InotifyFD(InotifyFD):
    """watchdog's instance, read and dispatched on its one thread, as in watchdog 7.1.0.

    From 7.1.1 on, `InotifyFD.run` reads into an unbounded in-process queue that a second
    thread dispatches from, so that bursts do not overflow the kernel queue. Here the
    kernel queue must stay the only buffer: one user's close flood would otherwise grow
    the service's memory without bound (270,000 closes/s outrun any dispatch), where an
    overflow costs a bounded repair pass over the users sharing the instance."""

    def run(self) -> None:
        while self.should_keep_running() and not self._closed:
            for event in self.read_events():
                self.handle_event(event)


class _Reader:
    """One inotify instance and its thread; the `WatchCallback` for all of its watches (one
    object per instance, so watchdog calls `on_queue_overflow` once per overflow, not once
    per watch). `watches` maps a watch descriptor to its user's watch: written under the
    Watcher's lock, read on the reader thread without it (one dict lookup)."""

    def __init__(self, watcher: Watcher, name: str) -> None:
        self.name = name
        self._w = watcher
        self.fd: InotifyFD | None = None
        self.watches: dict[WatchDescriptor, UserWatch] = {}

    def open(self) -> InotifyFD:
        """The running instance, started now if it is not yet. Raises OSError (EMFILE:
        `max_user_instances`) or RuntimeError (`can't start new thread`, TasksMax)."""
        if self.fd is not None:
            return self.fd
        fd = _InotifyFD()
        fd.name = f"inotify-{self.name}"
        try:
            fd.start()
        except BaseException:
            # The thread never ran, so close() would leave its reading end to it: release
            # the descriptors here.
            fd._closed = True
            fd._close_resources()
            raise
        self.fd = fd
        return fd

    def alive(self) -> bool:
        return self.fd is None or self.fd.is_alive()

    # --- WatchCallback (the reader thread) ---------------------------------------------------

    def on_event(self, event: InotifyEvent) -> None:
        self._w._guard(self._w._on_event, self, event)

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        self._w._guard(self._w._on_watch_deleted, self, wd)

    def on_queue_overflow(self) -> None:
        self._w._guard(self._w._on_queue_overflow, self)

    def on_events_lost(self) -> None:
        """watchdog 7.1.1 calls this after `on_queue_overflow` (7.1.0 does not): the repair
        is already asked for there, once, for this instance's users."""


class Watcher:
    """The watches, and the map watch -> user.

    Callbacks, all on a reader thread (quick, never blocking on the file system):
    `on_file(user, name, when, delay)` for a closed, created, renamed-in or touched session
    file: copy it `delay` seconds from now, for the event at wall time `when` (None: no
    event to measure latency from); `on_change()` when the home root or a watched
    directory changed so that watches need a rescan; `on_overflow(users)` when a kernel
    queue overflowed and the events of `users` were lost (None: the home root's queue, so
    any home may have changed).
    """

    def __init__(
        self,
        config: Config,
        on_file: Callable[[str, str, float | None, float], None],
        on_change: Callable[[], None],
        on_overflow: Callable[[set[str] | None], None],
        *,
        readers: int = USER_READERS,
        on_dir: Callable[[str, str, float | None], None] | None = None,
    ) -> None:
        self.config = config
        self._on_file = on_file
        self._on_change = on_change
        self._on_overflow = on_overflow
        self._on_dir = on_dir
        self._lock = threading.Lock()
        self._readers = [_Reader(self, str(i)) for i in range(readers)]
        self._root_reader = _Reader(self, "root")
        self._root_path = os.path.normpath(str(config.home_root))
        self._root: RootWatch | None = None
        self._root_stale: list[RootWatch] = []  # moved away: callbacks still registered
        self._by_user: dict[str, UserWatch] = {}
        # user -> ident of `_by_user`, kept alongside: `users()` is called three times by
        # every 5 s poll, and a copy of this dict is a C loop (50,000 users: 1 ms, where
        # building it from `_by_user` took 11 ms).
        self._idents: dict[str, Ident] = {}
        # Dropped from the maps when their directory was deleted or moved away; their
        # callbacks are removed by the control thread (reap) before any re-watch.
        self._stale: list[UserWatch] = []
        self._ids = itertools.count(1)  # callback ids: unique, so never one overwritten
        self._degraded = Episode()  # directories that could not be watched
        self._stopping = False
        self._guard_failed = False
        # --depth over 1: user -> rel -> watch of a directory below the sessions directory.
        self._nested: dict[str, dict[str, UserWatch]] = {}
        self._gens = itertools.count(1)
        self._visiting: dict[str, set[str]] = {}  # user -> rels a pass kept watched
        self._pass_failed: set[str] = set()  # users whose pass could not add a watch
        self._nested_failed: set[str] = set()  # users with a directory not watched
        self._absent: set[tuple[str, str]] = set()
        self._user_locks = tuple(threading.Lock() for _ in range(64))
        self._root_failing = False  # the home root's watch: one WARNING until it works

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the readers and watch the home root. Never raises: a reader that cannot
        start is tried again by the next `add` on it (its users are scanned until then)."""
        logging.getLogger(WATCHDOG_LOGGER).addFilter(_DROP_OVERFLOW_LINE)
        for reader in [self._root_reader, *self._readers]:
            try:
                reader.open()
            except (OSError, RuntimeError) as e:
                log.warning("cannot start inotify reader %s: %s", reader.name, e)
        try:
            st = os.stat(self._root_path, follow_symlinks=False)
        except OSError as e:
            log.warning("cannot watch the home root %s (%s)", escape(self._root_path), e)
            return
        self.watch_root((st.st_dev, st.st_ino))

    def stop(self, timeout: float = 5.0) -> None:
        logging.getLogger(WATCHDOG_LOGGER).removeFilter(_DROP_OVERFLOW_LINE)
        self._stopping = True  # close() reports every watch deleted: nothing to rescan
        deadline = time.monotonic() + timeout
        for reader in [self._root_reader, *self._readers]:
            if reader.fd is not None:
                reader.fd.stop()
        for reader in [self._root_reader, *self._readers]:
            if reader.fd is not None and reader.fd.is_alive():
                reader.fd.join(max(0.0, deadline - time.monotonic()))

    def alive(self) -> bool:
        """Every reader thread that was started is still reading (if one ends, its users
        get no event any more, so WATCHDOG=1 must stop)."""
        return all(r.alive() for r in [self._root_reader, *self._readers])

    def threads(self) -> int:
        """Reader threads running: a constant, whatever the number of watches."""
        readers = [self._root_reader, *self._readers]
        return sum(1 for r in readers if r.fd is not None and r.fd.is_alive())

    # --- the home root --------------------------------------------------------------------

    def root_ident(self) -> Ident | None:
        """(st_dev, st_ino) of the home root when its watch was added; None when it is not
        watched (its watch failed, or it was deleted or moved away). The control loop
        compares it with the root it opens: a different one means the root was replaced
        (`mv /home /home.old`, a restore), so every home must be walked again."""
        with self._lock:
            return None if self._root is None else self._root.ident

    def watch_root(self, ident: Ident) -> bool:
        """(Re)watch the home root, whose walk found `ident` (control thread)."""
        with self._lock:
            old, self._root = self._root, None
            stale, self._root_stale = self._root_stale, []
        reader = self._root_reader
        for w in [*stale, *([] if old is None else [old])]:
            if reader.fd is not None:
                self._remove_callback(reader.fd, w.wd, w.cid, self._root_path)
        cid = CallbackId(next(self._ids))
        try:
            fd = reader.open()
            wd = _checked(
                fd, fd.add_callback(os.fsencode(self._root_path), ROOT_MASK, reader, cid), cid
            )
        except (OSError, RuntimeError) as e:
            if not self._root_failing:
                log.warning(
                    "cannot watch the home root %s (%s); new homes are found by polling",
                    escape(self._root_path),
                    e,
                )
            self._root_failing = True
            return False
        self._root_failing = False
        with self._lock:
            self._root = RootWatch(ident, wd, cid)
        log.debug("watching the home root %s", escape(self._root_path))
        return True

    # --- watches (control thread) ---------------------------------------------------------

    def sessions_path(self, user: str) -> str:
        return os.path.join(self._root_path, user, *self.config.sessions_parts)

    def users(self) -> dict[str, Ident]:
        with self._lock:
            return self._idents.copy()

    def count(self) -> int:
        with self._lock:
            return len(self._by_user)

    def add(self, user: str, ident: Ident) -> bool:
        """Watch a user's sessions directory, which the safe walk just found as `ident`.
        False if it cannot be watched (ENOSPC: the watch limit; EMFILE; a reader that
        cannot start, ...): the caller serves it by a scan. The first such failure while
        none is failing is one WARNING; the rest are DEBUG until `settle` or `add` sees
        every directory watched again (one INFO)."""
        self.reap()  # a stale watch on this same inode would share its descriptor
        self.remove(user)
        path = self.sessions_path(user)
        reader = self._readers[reader_index(user, len(self._readers))]
        cid = CallbackId(next(self._ids))
        try:
            fd = reader.open()
            if not fd.is_alive():
                raise RuntimeError(f"inotify reader {reader.name} has stopped")
            wd = _checked(fd, fd.add_callback(os.fsencode(path), SESSIONS_MASK, reader, cid), cid)
        except Exception as e:  # never fatal: the scan fallback serves the directory
            self._failed(user, path, e)
            return False
        uw = UserWatch(user, path, ident, reader, wd, cid)
        with self._lock:
            other = reader.watches.get(wd)
            if other is None or other.user == user:
                reader.watches[wd] = uw
                self._by_user[user] = uw
                self._idents[user] = ident
        if other is not None and other.user != user:
            # One inode under two users' paths (a bind mount, a rename race): its events
            # would go to one of them only. Keep the first, scan this one.
            self._remove_callback(fd, wd, cid, path)
            self._failed(user, path, OSError(f"same directory as {escape(other.user)}'s"))
            return False
        if self._degraded.ok(user):
            self._recovered()
        return True

    def remove(self, user: str) -> None:
        """Stop watching `user`, at every level (control thread)."""
        with self._lock:
            uw = self._by_user.pop(user, None)
            self._idents.pop(user, None)
            if uw is not None and uw.reader.watches.get(uw.wd) is uw:
                del uw.reader.watches[uw.wd]
            nested = list(self._nested.pop(user, {}).values())
            for nw in nested:
                if nw.reader.watches.get(nw.wd) is nw:
                    del nw.reader.watches[nw.wd]
            self._nested_failed.discard(user)
        for w in [*([] if uw is None else [uw]), *nested]:
            if w.reader.fd is not None:
                self._remove_callback(w.reader.fd, w.wd, w.cid, w.path)

    # --- directories below the sessions directory (--depth over 1) -------------------------

    def nested_count(self) -> int:
        """Watches below the sessions directories, all users."""
        with self._lock:
            return sum(len(d) for d in self._nested.values())

    def nested_failed(self) -> set[str]:
        """Users with a directory below their sessions directory that could not be
        watched: served by a pass every 30 s until a pass watches them all."""
        with self._lock:
            return set(self._nested_failed)

    def watching(self, user: str, rel: str) -> bool:
        with self._lock:
            return rel in self._nested.get(user, {})

    def add_nested(self, source: SourceDir, st: os.stat_result) -> bool:
        """Watch the directory `source` (below a sessions directory, walked and checked by
        `homes.open_subdir`), whose fstat is `st`. True when it is watched (already, or
        now); False when it cannot be: one WARNING per episode (the watch limit, EMFILE,
        NESTED_WATCH_LIMIT), and the user is served by a pass every 30 s meanwhile."""
        user, rel = source.user, source.rel
        ident = (st.st_dev, st.st_ino)
        path = os.path.join(self.sessions_path(user), *rel.split("/"))
        reader = self._readers[reader_index(user, len(self._readers))]
        with self._user_locks[reader_index(user, len(self._user_locks))]:
            with self._lock:
                mine = self._nested.get(user, {})
                cur = mine.get(rel)
                over = cur is None and len(mine) >= NESTED_WATCH_LIMIT
            if cur is not None and cur.ident == ident and cur.reader.alive():
                return True
            self.reap()
            if cur is not None:
                self._remove_nested(cur)
            if over:
                self._nested_failure(
                    user,
                    path,
                    OSError(errno.ENOSPC, f"over {NESTED_WATCH_LIMIT} watches for one user"),
                )
                return False
            cid = CallbackId(next(self._ids))
            try:
                fd = reader.open()
                if not fd.is_alive():
                    raise RuntimeError(f"inotify reader {reader.name} has stopped")
                wd = _checked(
                    fd, fd.add_callback(os.fsencode(path), SESSIONS_MASK, reader, cid), cid
                )
            except Exception as e:  # never fatal: the scan fallback serves the directory
                self._nested_failure(user, path, e)
                return False
            uw = UserWatch(user, path, ident, reader, wd, cid, rel, next(self._gens))
            with self._lock:
                other = reader.watches.get(wd)
                if other is None:
                    reader.watches[wd] = uw
                    self._nested.setdefault(user, {})[rel] = uw
            if other is not None:
                # The same inode under another name (a hard-linked directory cannot be;
                # a bind mount or a rename race can): its events go to the first only.
                self._remove_callback(fd, wd, cid, path)
                self._nested_failure(user, path, OSError(f"same directory as {escape(other.path)}"))
                return False
            log.debug("watching %s", escape(path))
            return True

    def begin(self, user: str) -> int:
        """A pass starts walking `user`'s tree (see reconcile.DirWatches)."""
        with self._lock:
            self._visiting[user] = set()
            self._pass_failed.discard(user)
        return next(self._gens)

    def visit(self, source: SourceDir, st: os.stat_result, watch: bool) -> None:
        if not watch:
            return
        if self.add_nested(source, st):
            with self._lock:
                self._visiting.setdefault(source.user, set()).add(source.rel)
        else:
            with self._lock:
                self._pass_failed.add(source.user)

    def end(self, user: str, token: int, complete: bool) -> None:
        """A pass walked `user`'s tree: when it saw all of it, watches of directories it
        did not keep (gone, or their session no longer active) and older than `token` go;
        a user whose every directory was watched is no longer served by a scan."""
        with self._lock:
            kept = self._visiting.pop(user, set())
            failed = user in self._pass_failed
            self._pass_failed.discard(user)
            old = [
                w
                for rel, w in self._nested.get(user, {}).items()
                if rel not in kept and w.gen < token
            ]
        if complete:
            for w in old:
                self._remove_nested(w)
        if complete and not failed:
            with self._lock:
                was = user in self._nested_failed
                self._nested_failed.discard(user)
            if was and self._degraded.ok(user):
                self._recovered()

    def _nested_failure(self, user: str, path: str, e: Exception) -> None:
        with self._lock:
            self._nested_failed.add(user)
            self._pass_failed.add(user)
        self._failed(user, path, e)

    def _remove_nested(self, uw: UserWatch) -> None:
        with self._lock:
            mine = self._nested.get(uw.user, {})
            if mine.get(uw.rel) is uw:
                del mine[uw.rel]
            if uw.reader.watches.get(uw.wd) is uw:
                del uw.reader.watches[uw.wd]
            self._absent.discard((uw.user, uw.rel))
        if uw.reader.fd is not None:
            self._remove_callback(uw.reader.fd, uw.wd, uw.cid, uw.path)

    def _drop_nested(self, uw: UserWatch, *, stale: bool) -> None:
        """Forget a nested watch whose directory went or moved away, and those below it
        (reader thread too: dict work only). `stale`: callbacks still registered."""
        with self._lock:
            mine = self._nested.get(uw.user, {})
            if mine.get(uw.rel) is not uw:
                return
            prefix = uw.rel + "/"
            gone = [w for r, w in mine.items() if r == uw.rel or r.startswith(prefix)]
            for w in gone:
                del mine[w.rel]
                if w.reader.watches.get(w.wd) is w:
                    del w.reader.watches[w.wd]
                self._absent.discard((w.user, w.rel))
                if stale or w is not uw:
                    self._stale.append(w)

    def note_absent(self, user: str, rel: str) -> None:
        """Nothing to watch at `rel` (no such directory, or refused): a close of the
        transcript named after it does not ask again, until a directory is made there."""
        with self._lock:
            if len(self._absent) >= _ABSENT_MEMORY:
                self._absent.clear()
            self._absent.add((user, rel))

    def settle(self, degraded: Collection[str]) -> None:
        """The users the caller still serves by scan (those whose home went or whose
        directory is watched again are not): ends the episode of failed watches when none
        is left."""
        if self._degraded.keep(degraded):
            self._recovered()

    def drop_dead(self) -> None:
        """Forget the watches of a reader whose thread has ended: they are added again,
        and fail (served by scan) while that reader cannot run."""
        with self._lock:
            dead = [uw for uw in self._by_user.values() if not uw.reader.alive()]
        for uw in dead:
            log.warning("inotify reader of %s had stopped", escape(uw.path))
            self._drop(uw, stale=True)

    def reap(self) -> None:
        """Remove the callbacks of the watches dropped on the reader threads."""
        with self._lock:
            stale, self._stale = self._stale, []
        for uw in stale:
            if uw.rel:
                log.debug("%s went or moved; unwatching it", escape(uw.path))
            else:
                log.info("sessions directory of %s went or changed; unwatching it", escape(uw.user))
            if uw.reader.fd is not None:
                self._remove_callback(uw.reader.fd, uw.wd, uw.cid, uw.path)

    def _failed(self, user: str, path: str, e: Exception) -> None:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        code = e.errno if isinstance(e, OSError) else None
        if self._degraded.fail(user):
            log.warning(
                "cannot watch %s (%s); it and any other directory that cannot be watched "
                "are served by a scan every 30 s until watches can be added again",
                escape(path),
                reason,
                extra=fields(user, reason="watch-degraded", errno=_errno_label(code)),
            )
        else:
            log.debug("cannot watch %s (%s) either", escape(path), reason)

    def _recovered(self) -> None:
        log.info(
            "every sessions directory is watched again (%d were served by a scan)",
            self._degraded.total,
            extra=fields(reason="watch-recovered"),
        )

    @staticmethod
    def _remove_callback(fd: InotifyFD, wd: WatchDescriptor, cid: CallbackId, path: str) -> None:
        try:
            fd.remove_callbacks([(wd, cid)])
        except OSError as e:  # the watch went with its directory
            log.debug("unwatch %s: %r", escape(path), e)

    def _drop(self, uw: UserWatch, *, stale: bool) -> bool:
        """Forget `uw` at once (reader thread too: dict work only); `stale`: its callback
        is still registered, for `reap` to remove."""
        with self._lock:
            if uw.reader.watches.get(uw.wd) is uw:
                del uw.reader.watches[uw.wd]
            if self._by_user.get(uw.user) is not uw:
                return False
            del self._by_user[uw.user]
            del self._idents[uw.user]
            if stale:
                self._stale.append(uw)
            # The watches below it go with it (moved away, they would follow the old
            # tree): the rescan that follows watches the sessions directory there now,
            # and the pass it asks for watches what is below it.
            for nw in self._nested.pop(uw.user, {}).values():
                if nw.reader.watches.get(nw.wd) is nw:
                    del nw.reader.watches[nw.wd]
                self._stale.append(nw)
        return True

    # --- events (reader threads) ----------------------------------------------------------

    def _guard(self, handler: Callable[..., None], *args: object) -> None:
        """Run `handler` on a reader thread: nothing may escape (it would end the reader);
        the first failure is logged with its traceback, later ones at DEBUG."""
        try:
            handler(*args)
        except Exception:
            if not self._guard_failed:
                self._guard_failed = True
                log.exception("error handling an inotify event")
            else:
                log.debug("error handling an inotify event", exc_info=True)

    def _on_event(self, reader: _Reader, event: InotifyEvent) -> None:
        if reader is self._root_reader:
            self._on_root_event(event)
            return
        uw = reader.watches.get(event.wd)
        if uw is None:  # dropped, or an event still queued for a removed watch
            return
        name = os.fsdecode(event.name)
        nested = self.config.depth > 1
        if nested and name and event.mask & C.IN_ISDIR and event.mask & _DIR_EVENT:
            # A directory made or renamed in (a project, a session, subagents/): walked
            # and watched by a worker, its files copied; refused ones are one WARNING.
            if self._on_dir is not None:
                rel = f"{uw.rel}/{name}" if uw.rel else name
                with self._lock:
                    self._absent.discard((uw.user, rel))
                self._on_dir(uw.user, rel, time.time())
            return
        action = sessions_action(event.mask, name)
        key = f"{uw.rel}/{name}" if uw.rel else name
        if action is Action.COPY_NOW:
            self._on_file(uw.user, key, time.time(), 0.0)
            if nested:
                self._resumed(uw, name)
        elif action is Action.COPY_LATER:
            self._on_file(uw.user, key, None, CREATED_DELAY)
        elif action is Action.GONE and uw.rel:
            # Below the sessions directory: deleted (its parent's watch sees a new one
            # made), or renamed (its parent's watch sees the new name): no rescan.
            self._drop_nested(uw, stale=True)
        elif action is Action.GONE and self._drop(uw, stale=True):
            # Deleted (IN_IGNORED follows) or moved away (its watch follows the old inode
            # under the old name): whatever is at that path now is watched afresh.
            self._on_change()

    def _resumed(self, uw: UserWatch, name: str) -> None:
        """A transcript was written: if the session has a directory of its own beside it
        (`<session>/subagents/`) that is not watched (an old session, resumed), a worker
        walks and watches it now."""
        level = uw.rel.count("/") + 2 if uw.rel else 1
        if self._on_dir is None or level + 1 > self.config.depth:
            return
        stem = name[: -len(".jsonl")]
        rel = f"{uw.rel}/{stem}" if uw.rel else stem
        with self._lock:
            if rel in self._nested.get(uw.user, {}) or (uw.user, rel) in self._absent:
                return
            if len(self._absent) >= _ABSENT_MEMORY:
                self._absent.clear()
            self._absent.add((uw.user, rel))  # asked once; the walk watches it if it is there
        self._on_dir(uw.user, rel, None)

    def _on_root_event(self, event: InotifyEvent) -> None:
        with self._lock:
            root = self._root
            if root is None or event.wd != root.wd:
                return
            action = root_action(event.mask)
            if action is Action.GONE:
                self._root = None
                self._root_stale.append(root)
        if action is not Action.NONE:
            self._on_change()

    def _on_watch_deleted(self, reader: _Reader, wd: WatchDescriptor) -> None:
        """watchdog saw IN_IGNORED (or closed the instance): the kernel dropped the watch."""
        if self._stopping:
            return
        if reader is self._root_reader:
            with self._lock:
                if self._root is None or self._root.wd != wd:
                    return
                self._root = None
            self._on_change()
            return
        uw = reader.watches.get(wd)
        if uw is not None and uw.rel:
            self._drop_nested(uw, stale=False)
        elif uw is not None and self._drop(uw, stale=False):
            self._on_change()

    def _on_queue_overflow(self, reader: _Reader) -> None:
        if reader is self._root_reader:
            self._on_overflow(None)
            return
        with self._lock:
            users = {uw.user for uw in reader.watches.values()}
        self._on_overflow(users)


class _DropOverflowLine(logging.Filter):
    """watchdog logs each queue overflow as a WARNING of its own, before it calls
    `on_queue_overflow`; the service logs its own line, limited to one a minute (a user's
    close flood overflows a queue several times a second). So watchdog's is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "overflow" not in record.getMessage().lower()


WATCHDOG_LOGGER = "watchdog.observers.inotify_c"
_DROP_OVERFLOW_LINE = _DropOverflowLine()


def _checked(fd: InotifyFD, wd: WatchDescriptor, cid: CallbackId) -> WatchDescriptor:
    """watchdog 7.1 does not raise when inotify_add_watch fails with EACCES (root squashed
    on NFS): it registers the callback under descriptor -1, where no event ever comes."""
    if wd < 0:
        fd.remove_callbacks([(wd, cid)])
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))
    return wd


def _errno_label(code: int | None) -> str | None:
    return errno_name(code) if code else None
