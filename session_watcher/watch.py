"""inotify watches (through watchdog) on every qualifying user's sessions directory and on
the home root, turned into (user, name) work items. Nothing here copies: the handler only
looks the event up and hands it on, because one slow copy on watchdog's dispatcher
thread would stall every event, and one exception there kills the observer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import ObservedWatch
from watchdog.observers.inotify import InotifyEmitter, InotifyObserver
from watchdog.observers.inotify_c import InotifyConstants, Mask
from watchdog.observers.inotify_move_event_grouper import (
    GroupedInotifyEvent,
    PathedInotifyEvent,
)

from .config import Config
from .homes import is_session_name
from .safefs import escape

__all__ = ["OVERFLOW_LOGGER", "OverflowDetector", "Watcher"]

log = logging.getLogger(__name__)

OVERFLOW_LOGGER = "watchdog.observers.inotify_c"

# The kernel mask follows from these: IN_CLOSE_WRITE | IN_MOVE | IN_CREATE | IN_DELETE_SELF,
# and through _Emitter IN_ATTRIB (an mtime set after the close: `cp -p`, tar, `touch -r`)
# and IN_MOVE_SELF (the directory renamed away: `mv sessions sessions.old`).
SESSION_EVENTS: list[type[FileSystemEvent]] = [
    FileClosedEvent,
    FileMovedEvent,
    FileCreatedEvent,
    FileAttribEvent,
    DirDeletedEvent,
    DirMovedEvent,
]
HOME_ROOT_EVENTS: list[type[FileSystemEvent]] = [DirCreatedEvent, DirDeletedEvent, DirMovedEvent]

# A file that open(O_CREAT) just made is empty, and its writer's close follows within
# microseconds. Copying it at once would install an empty file in the store, and that
# copy's cost would space out (delay) the copy the close asks for. So a created file is
# asked for this much later; the close's request supersedes it. A file moved in from
# elsewhere (no close follows) still lands, this much later. Whether it is empty is not
# asked on the dispatcher thread: an lstat there, in a user's file system that hangs,
# would stop every user's events (issue 14); event handling only looks names up.
CREATED_EMPTY_DELAY = 1.0


@dataclass(frozen=True)
class UserWatch:
    user: str
    path: str
    ident: tuple[int, int]  # (st_dev, st_ino) of the sessions directory when scheduled
    watch: ObservedWatch


class OverflowDetector(logging.Handler):
    """watchdog 7.1 reports a kernel queue overflow only as a log record; catch it there.

    A filter on watchdog's logger, with that logger forced to WARNING, so it fires whatever
    level the operator chose. The record itself is dropped: `on_overflow` logs the
    service's own line, limited per minute, because one user's close flood overflows the
    queue several times a second and each of watchdog's lines would reach the journal."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self._on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        self._keep(record)

    def _keep(self, record: logging.LogRecord) -> bool:
        if "overflow" in record.getMessage().lower():
            self._on_overflow()
            return False
        return True

    def install(self) -> None:
        logger = logging.getLogger(OVERFLOW_LOGGER)
        if logger.getEffectiveLevel() > logging.WARNING:
            logger.setLevel(logging.WARNING)
        logger.addFilter(self._keep)

    def uninstall(self) -> None:
        logging.getLogger(OVERFLOW_LOGGER).removeFilter(self._keep)


class _Emitter(InotifyEmitter):
    """watchdog 7.1's inotify emitter plus two kernel events it leaves out:

    - IN_ATTRIB when FileAttribEvent is in the filter: its filter-to-mask map knows only
      FileModifiedEvent, which would also add IN_MODIFY (an event per write);
    - IN_MOVE_SELF when DirMovedEvent is in the filter (non-recursive watches), reported
      as DirMovedEvent(watched path, ""): watchdog neither asks for it nor reports it, so
      a watched directory renamed away went unnoticed while its watch followed the old
      inode under the old name.
    """

    def get_event_mask_from_filter(self) -> Mask:
        mask = super().get_event_mask_from_filter()
        wanted = self._event_filter or frozenset()
        if FileAttribEvent in wanted:
            mask = Mask(mask | InotifyConstants.IN_ATTRIB)
        if DirMovedEvent in wanted and not self.watch.is_recursive:
            mask = Mask(mask | InotifyConstants.IN_MOVE_SELF)
        return mask

    def build_and_queue_event(
        self, event: GroupedInotifyEvent, *, full_events: bool = False
    ) -> None:
        if isinstance(event, PathedInotifyEvent) and event.ev.is_move_self:
            self.queue_event(DirMovedEvent(self.watch.path, ""))
            return
        super().build_and_queue_event(event, full_events=full_events)


class _Observer(InotifyObserver):
    """InotifyObserver with _Emitter; `reader` is watchdog's InotifyFD thread, which reads
    the kernel queue for every watch (if it ends, no event arrives any more)."""

    def __init__(self) -> None:
        super().__init__()
        self._emitter_class = _Emitter

    @property
    def reader(self) -> threading.Thread:
        return self._inotify_fd

    def emitter_alive(self, watch: ObservedWatch) -> bool:
        """Whether the watch still has a running emitter (watchdog stops it for good when
        the watched directory is deleted)."""
        with self._lock:
            emitter = self._emitter_for_watch.get(watch)
        return emitter is not None and emitter.is_alive()


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher) -> None:
        self._w = watcher

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._w._on_event(event)
        except Exception:  # never let anything escape into watchdog's thread
            log.exception("error handling event %r", event)


class Watcher:
    """Owns the observer and the map sessions-directory path -> user.

    `on_file(user, name, when, delay)` is called (on the dispatcher thread: it must be
    quick) for a closed, created or renamed-in session file: copy it `delay` seconds from
    now, for the event at wall time `when` (None: no event to measure latency from);
    `on_change()` when the home root or a watched directory changed so that watches need
    a rescan.
    """

    def __init__(
        self,
        config: Config,
        on_file: Callable[[str, str, float | None, float], None],
        on_change: Callable[[], None],
    ) -> None:
        self.config = config
        self._on_file = on_file
        self._on_change = on_change
        self._observer = _Observer()
        self._handler = _Handler(self)
        self._lock = threading.Lock()
        self._by_path: dict[str, UserWatch] = {}
        self._by_user: dict[str, UserWatch] = {}
        # Dropped from the maps when their directory was deleted or renamed away (or their
        # emitter died); unscheduled by the control thread (reap) before any re-watch.
        self._stale: list[UserWatch] = []
        self._root_path = os.path.normpath(str(config.home_root))
        self._root_watch: ObservedWatch | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._observer.start()
        try:
            self._root_watch = self._observer.schedule(
                self._handler, self._root_path, recursive=False, event_filter=HOME_ROOT_EVENTS
            )
        except OSError as e:
            log.warning(
                "cannot watch the home root %s (%s); new homes are found by polling",
                escape(self._root_path),
                e,
            )

    def rewatch_root(self) -> None:
        """The home root was replaced (its watch follows the old directory): watch the
        directory now at the configured path."""
        if self._root_watch is not None:
            try:
                self._observer.unschedule(self._root_watch)
            except (KeyError, OSError):
                pass
            self._root_watch = None
        try:
            self._root_watch = self._observer.schedule(
                self._handler, self._root_path, recursive=False, event_filter=HOME_ROOT_EVENTS
            )
        except OSError as e:
            log.warning("cannot watch the home root %s (%s)", escape(self._root_path), e)

    def stop(self, timeout: float = 5.0) -> None:
        self._observer.stop()
        self._observer.join(timeout)

    def alive(self) -> bool:
        """The dispatcher and the inotify reader threads; not the 5,000 emitters (a dead
        one costs one user its events until the next full rescan finds it: `drop_dead`)."""
        return self._observer.is_alive() and self._observer.reader.is_alive()

    # --- watches --------------------------------------------------------------------------

    def sessions_path(self, user: str) -> str:
        return os.path.join(self._root_path, user, *self.config.sessions_parts)

    def users(self) -> dict[str, tuple[int, int]]:
        with self._lock:
            return {u: w.ident for u, w in self._by_user.items()}

    def add(self, user: str, ident: tuple[int, int]) -> bool:
        """Watch a user's sessions directory. False (with one WARNING) if it cannot be
        watched: ENOSPC (watch limit), EMFILE, EACCES, ..."""
        path = self.sessions_path(user)
        self.reap()  # else watchdog would keep the dead watch on this same path
        try:
            watch = self._observer.schedule(
                self._handler, path, recursive=False, event_filter=SESSION_EVENTS
            )
        except OSError as e:
            log.warning(
                "cannot watch %s (%s); serving it by a scan every 30 s",
                escape(path),
                e.strerror or e,
            )
            return False
        uw = UserWatch(user, path, ident, watch)
        with self._lock:
            self._by_path[path] = uw
            self._by_user[user] = uw
        log.debug("watching %s", escape(path))
        return True

    def remove(self, user: str) -> None:
        """Unschedule; watchdog silently ignores re-scheduling a path it still holds, so a
        deleted-then-recreated directory must be unscheduled before it is watched again."""
        with self._lock:
            uw = self._by_user.pop(user, None)
            if uw is not None:
                self._by_path.pop(uw.path, None)
        if uw is None:
            return
        try:
            self._observer.unschedule(uw.watch)
        except (KeyError, OSError) as e:  # already gone with its directory
            log.debug("unschedule %s: %r", escape(uw.path), e)

    def drop_dead(self) -> None:
        """Mark stale the watches whose emitter thread has ended (control thread, on full
        rescans: a dict lookup and is_alive per watch)."""
        with self._lock:
            watches = list(self._by_user.values())
        for uw in watches:
            if not self._observer.emitter_alive(uw.watch):
                log.warning("watch on %s had stopped; watching it again", escape(uw.path))
                self._drop(uw.path)

    def reap(self) -> None:
        """Unschedule the stale watches (control thread: unschedule joins the emitter)."""
        with self._lock:
            stale, self._stale = self._stale, []
        for uw in stale:
            log.info("sessions directory of %s went or changed; unwatching it", escape(uw.user))
            try:
                self._observer.unschedule(uw.watch)
            except (KeyError, OSError) as e:  # already unscheduled
                log.debug("unschedule %s: %r", escape(uw.path), e)

    def _drop(self, path: str) -> bool:
        """Forget the watch on `path` at once; reap() unschedules it later. Quick: it runs
        on the dispatcher thread too."""
        with self._lock:
            uw = self._by_path.pop(path, None)
            if uw is None:
                return False
            if self._by_user.get(uw.user) is uw:
                del self._by_user[uw.user]
            self._stale.append(uw)
        return True

    def count(self) -> int:
        with self._lock:
            return len(self._by_user)

    # --- events (dispatcher thread) -----------------------------------------------------

    def _on_event(self, event: FileSystemEvent) -> None:
        when = time.time()
        src = os.fsdecode(event.src_path)
        if isinstance(event, FileMovedEvent):
            self._file(os.fsdecode(event.dest_path), when)
        elif isinstance(event, FileClosedEvent | FileAttribEvent):
            self._file(src, when)
        elif isinstance(event, FileCreatedEvent):
            self._file(src, when, created=True)
        elif isinstance(event, DirDeletedEvent | DirMovedEvent) and self._drop(src):
            # A watched directory was deleted (watchdog has stopped its emitter for good)
            # or renamed away (its watch follows the old inode): whatever the inode of the
            # directory now at that path, it is watched afresh by the rescan.
            self._on_change()
        elif isinstance(event, DirCreatedEvent | DirDeletedEvent | DirMovedEvent) and (
            os.path.dirname(src) == self._root_path
        ):
            # A home appeared, went or was renamed.
            self._on_change()

    def _file(self, path: str, when: float, *, created: bool = False) -> None:
        directory, name = os.path.split(path)
        uw = self._by_path.get(directory)
        if uw is None or not is_session_name(name):
            return
        self._on_file(uw.user, name, when, CREATED_EMPTY_DELAY if created else 0.0)
