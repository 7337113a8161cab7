"""The set of watched sessions directories, kept in line with the homes on disk.

Rescans (full: every home walked; poll: only homes not watched yet, and the home root's own
identity), the directories that could not be watched ("degraded", served by a scan every
30 s) and their retries. Every walk of a home runs under the stuck guard, so a home whose
file system blocks holds only itself. Runs on the walker thread (see passes.py)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager

from .config import Config
from .homes import (
    DIR_ENTRY_LIMIT,
    Home,
    HomeRefused,
    home_qualifies,
    list_homes,
    log_home_refused,
    open_home,
    open_sessions_dir,
    open_subdir,
)
from .logfmt import fields
from .ratelimit import LogLimiter
from .safefs import Refused, errno_name, escape, open_root_dir
from .stuck import UserStuck
from .watch import Watcher

__all__ = ["WatchSet"]

log = logging.getLogger(__name__)

Ident = tuple[int, int]


class WatchSet:
    def __init__(
        self,
        config: Config,
        watcher: Watcher,
        guard: Callable[[str], AbstractContextManager[None]],
        limiter: LogLimiter,
        request_pass: Callable[[set[str] | None], None],
    ) -> None:
        self.config = config
        self.watcher = watcher
        self._guard = guard
        self._limiter = limiter
        self._request_pass = request_pass
        self._degraded: set[str] = set()
        self._root: Ident | None = None  # the home root's (st_dev, st_ino) at the last scan
        # The poll's listing of the home root, and the root's (dev, ino, mtime) it is of.
        self._listing: frozenset[str] = frozenset()
        self._listing_key: tuple[int, int, int] | None = None
        self.started = False  # before the first pass, new homes need no pass of their own

    def degraded(self) -> list[str]:
        users = set(self._degraded) | self.watcher.nested_failed()
        return sorted(self.watcher.sessions_path(u) for u in users)

    def _still_degraded(self) -> set[str]:
        """Users served by a scan: their sessions directory, or one below it (--depth over
        1), could not be watched. One episode covers both (one WARNING, one INFO)."""
        return self._degraded | self.watcher.nested_failed()

    def rescan(self, *, full: bool, users: set[str] | None = None) -> None:
        """Bring the set of watches in line with the homes on disk.

        Full: every qualifying home is walked (after home-root events and with every full
        pass). Not full (the 5 s poll): only homes not watched yet, so that a home whose
        owner was set after `useradd` created it, or whose sessions directory came later,
        is picked up without walking thousands of watched homes every few seconds; plus
        `users`, walked again (their queue overflowed: a lost IN_DELETE_SELF would leave a
        watch on a directory that is gone). A home root that is another directory than
        the one watched (`mv /home /home.old` and a new /home) makes it full.
        """
        cfg = self.config
        home_fd = open_root_dir(cfg.home_root)
        try:
            full = self._root_changed(home_fd) or full
            if full:
                self.watcher.drop_dead()  # a watch whose reader ended is watched afresh
            self.watcher.reap()  # deleted or moved away: unwatched, re-added below if back
            watched = self.watcher.users()
            found: dict[str, Ident] = {}
            homes: Iterable[Home] = (
                list_homes(home_fd, cfg, self._guard)
                if full
                else self._unwatched(home_fd, found, users or set())
            )
            for home in homes:
                ident = self._walk(home_fd, home)
                if ident is not None:
                    found[home.name] = ident
        finally:
            os.close(home_fd)
        for user, ident in watched.items():
            if found.get(user) != ident:
                log.info("sessions directory of %s went or changed; unwatching it", escape(user))
                self.watcher.remove(user)
        for user in list(self._degraded):
            if user not in found:
                self._degraded.discard(user)
        # One copy of the watched set, not one per home: at 5,000 homes a lookup per home
        # rebuilt the whole map each time (25 M steps every 5 s poll, 20% of a core idle).
        current = self.watcher.users()
        new_users: set[str] = set()
        for user, ident in found.items():
            if user in current or user in self._degraded:
                continue
            if self._add(user, ident):
                log.info("watching %s", escape(self.watcher.sessions_path(user)))
            else:
                self._degraded.add(user)
            new_users.add(user)
        self.watcher.settle(self._still_degraded())
        if new_users and self.started:
            self._request_pass(new_users)  # copy what is already there

    def _root_changed(self, home_fd: int) -> bool:
        """Whether the home root just opened is not the one watched (replaced: `mv /home
        /home.old` and a new /home; or its watch went with it): then it is watched again
        and every home walked again, since the poll trusts watched homes by name."""
        st = os.fstat(home_fd)
        ident = (st.st_dev, st.st_ino)
        if ident == self.watcher.root_ident():
            self._root = ident
            return False
        replaced = ident != self._root
        if replaced and self._root is not None:
            log.info("the home root was replaced; watching the new one, walking every home")
        self._root = ident
        return self.watcher.watch_root(ident) or replaced

    def _add(self, user: str, ident: Ident) -> bool:
        try:
            with self._guard(user):  # inotify_add_watch resolves the path: it can block
                return self.watcher.add(user, ident)
        except UserStuck:
            return False

    def _unwatched(self, home_fd: int, found: dict[str, Ident], again: set[str]) -> Iterator[Home]:
        """The poll's view: names only for the homes already watched or degraded (they
        go into `found` as they are; a full rescan re-checks their owners), an lstat only
        for the others. The listing itself is reused while the home root's mtime is the
        same (no home was added, removed or renamed), and the sorting is set operations:
        at 50,000 watched homes a poll costs a few milliseconds, not a directory listing
        and a Python loop over every name (the bench's idle-CPU target)."""
        st = os.fstat(home_fd)
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        if key != self._listing_key:
            with os.scandir(home_fd) as it:
                self._listing = frozenset(e.name for e in it if not e.name.startswith("."))
            self._listing_key = key
        names = self._listing
        watched = self.watcher.users()
        found.update(watched)
        for gone in (watched.keys() - names) | again:
            found.pop(gone, None)
        found.update(dict.fromkeys(self._degraded & names, (0, 0)))
        for name in (names - found.keys()) | (again & names):
            try:
                with self._guard(name):
                    st = os.stat(name, dir_fd=home_fd, follow_symlinks=False)
            except (FileNotFoundError, UserStuck):
                continue
            if home_qualifies(name, st, self.config):
                yield Home(name, st.st_uid)

    def _walk(self, home_fd: int, home: Home) -> Ident | None:
        """The sessions directory's identity, or None (none, refused, stuck, unreadable)."""
        try:
            with self._guard(home.name):
                source = open_sessions_dir(home_fd, home, self.config)
                if source is None:
                    return None
                try:
                    st = os.fstat(source.fd)
                    return (st.st_dev, st.st_ino)
                finally:
                    os.close(source.fd)
        except UserStuck:
            return None
        except HomeRefused as e:
            log_home_refused(self._limiter, home.name, e)
            return None
        except OSError as e:
            self._limiter.log(
                log,
                logging.WARNING,
                home.name,
                "failed:" + errno_name(e.errno),
                "cannot open sessions of %s: %s",
                escape(home.name),
                e,
                extra=fields(home.name, errno=errno_name(e.errno)),
            )
            return None

    def watch_first_level(self, stop: Callable[[], bool] = lambda: False) -> int:
        """With --depth over 1: watch every first-level directory (a project) of every
        watched user, without listing any file: what must be watched before READY=1, so
        that a transcript closed in any project from then on is an event. The session and
        subagents/ directories of active sessions are watched by the first pass, which
        goes on after READY=1 (and each of them as soon as its session is written to).
        Refusals are left for that pass to say. Returns the directories watched."""
        n = 0
        home_fd = open_root_dir(self.config.home_root)
        try:
            for user in self.watcher.users():
                if stop():
                    break
                try:
                    with self._guard(user):
                        n += self._watch_first_level(home_fd, user)
                except UserStuck:
                    continue
                except (HomeRefused, OSError) as e:
                    log.debug("first-level watches of %s: %s", escape(user), e)
        finally:
            os.close(home_fd)
        return n

    def _watch_first_level(self, home_fd: int, user: str) -> int:
        source = open_home(home_fd, user, self.config)
        if source is None:
            return 0
        n = 0
        try:
            with os.scandir(source.fd) as it:
                names = []
                for i, entry in enumerate(it):
                    if i >= DIR_ENTRY_LIMIT:
                        break
                    if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                        names.append(entry.name)
            for name in names:
                try:
                    sub = open_subdir(source, name, self.config)
                except (Refused, OSError):
                    continue
                try:
                    if self.watcher.add_nested(sub, os.fstat(sub.fd)):
                        n += 1
                finally:
                    os.close(sub.fd)
        finally:
            os.close(source.fd)
        return n

    def retry_degraded(self) -> None:
        """Try to watch the degraded directories again; scan the ones that still fail.
        Users with a directory below their sessions directory not watched get a pass,
        which tries to watch it again as it walks (and copies what the watch missed)."""
        nested = self.watcher.nested_failed()
        if not self._degraded:
            if nested:
                self._request_pass(nested)
            return
        users = set(self._degraded)
        home_fd = open_root_dir(self.config.home_root)
        try:
            for user in users:
                try:
                    with self._guard(user):
                        st = os.stat(user, dir_fd=home_fd, follow_symlinks=False)
                except FileNotFoundError:
                    self._degraded.discard(user)
                    continue
                except UserStuck:
                    continue
                ident = self._walk(home_fd, Home(user, st.st_uid))
                if ident is None:
                    self._degraded.discard(user)
                elif self._add(user, ident):
                    # One INFO when the last one is back (the watcher's), not one each.
                    log.debug("watching %s again", escape(self.watcher.sessions_path(user)))
                    self._degraded.discard(user)
        finally:
            os.close(home_fd)
        self.watcher.settle(self._still_degraded())
        # Those now watched get one pass to catch up, those still degraded their scan.
        self._request_pass(users | nested)
