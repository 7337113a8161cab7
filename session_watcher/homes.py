"""Which homes qualify, and the safe walk from the home root to a user's sessions directory."""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from .config import Config
from .copy import SourceDir
from .logfmt import fields
from .ratelimit import LogLimiter
from .safefs import Refused, errno_name, escape, open_dir_at
from .stuck import UserStuck

__all__ = [
    "DIR_ENTRY_LIMIT",
    "USER_ENTRY_LIMIT",
    "Home",
    "HomeRefused",
    "Visit",
    "Walk",
    "home_qualifies",
    "is_session_name",
    "list_homes",
    "log_home_refused",
    "open_home",
    "open_sessions_dir",
    "open_source_path",
    "open_subdir",
    "say_refused",
    "walk_user",
]

log = logging.getLogger(__name__)

# With --depth over 1, what one user can make a walk look at: entries (files, directories,
# anything) of one directory, and of the whole tree of one user. Past either bound the rest
# is not looked at in that walk (one WARNING, kind "bound"): the files already listed are
# copied, the rest waits for the user to tidy up; live events in watched directories still
# copy. 50,000 sessions in one project and 500,000 entries in all are far past any real
# Claude Code history (the store's own limit is --max-user-files, 100,000 by default).
DIR_ENTRY_LIMIT = 50_000
USER_ENTRY_LIMIT = 500_000


@dataclass(frozen=True)
class Home:
    name: str
    uid: int


class HomeRefused(Refused):
    """A home whose walk to its sessions directory is unsafe: the whole user is skipped.
    Its `kind` is "home" or "mount" (a component on another file system than the home)."""

    def __init__(self, reason: str, kind: str = "home") -> None:
        super().__init__(reason, kind)


def home_qualifies(name: str, st: os.stat_result, config: Config) -> bool:
    """A direct child of the home root, not hidden, a real directory, owned by a uid in
    range, not excluded."""
    return (
        not name.startswith(".")
        and stat.S_ISDIR(st.st_mode)
        and config.min_uid <= st.st_uid <= config.max_uid
        and name not in config.exclude_users
    )


def is_session_name(name: str) -> bool:
    return name.endswith(".jsonl") and not name.startswith(".")


def list_homes(
    root_fd: int,
    config: Config,
    guard: Callable[[str], AbstractContextManager[None]] | None = None,
) -> Iterator[Home]:
    """Qualifying homes under the opened home root (lstat only: a symlink never qualifies).

    `guard(name)` wraps the lstat of each home: a home that is itself the mount point of a
    file system that blocks (a user's FUSE mount on their own home) blocks its lstat, so
    the service runs it under its stuck guard, which raises for a user known to be stuck
    (the home is then left out)."""
    with os.scandir(root_fd) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            try:
                if guard is None:
                    st = entry.stat(follow_symlinks=False)
                else:
                    with guard(entry.name):
                        st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except UserStuck:  # this home waits until its file system answers again
                continue
            if home_qualifies(entry.name, st, config):
                yield Home(entry.name, st.st_uid)
            elif log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "home %s passed over: %s", escape(entry.name), _why_not(st, entry.name, config)
                )


def _why_not(st: os.stat_result, name: str, config: Config) -> str:
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory (a symlink never qualifies)"
    if name in config.exclude_users:
        return "excluded"
    return f"owner uid {st.st_uid} outside {config.min_uid}..{config.max_uid}"


def open_sessions_dir(root_fd: int, home: Home, config: Config) -> SourceDir | None:
    """Walk home → user → sessions, each component opened relative to its parent with
    O_NOFOLLOW and checked with fstat on what was opened.

    Returns None when the home has no sessions directory (nothing to do, no noise).
    Raises HomeRefused (with the reason) when a component is a symlink, not a directory,
    owned by someone else, or unreadable; OSError for anything unexpected.
    """
    try:
        fd, st = _step(root_fd, home.name, home.name)
    except FileNotFoundError:
        return None
    # Re-check on the descriptor: the entry may have been swapped since the scan.
    if not home_qualifies(home.name, st, config) or st.st_uid != home.uid:
        os.close(fd)
        raise HomeRefused(f"{escape(home.name)} changed owner or type during the pass")
    dev = None if config.cross_mounts else st.st_dev
    for part in config.sessions_parts:
        try:
            nxt, st = _step(fd, part, home.name)
        except FileNotFoundError:
            return None
        finally:
            os.close(fd)
        fd = nxt
        if st.st_uid not in (home.uid, 0):
            os.close(fd)
            raise HomeRefused(
                f"{escape(home.name)}: {escape(part)} is owned by uid {st.st_uid}, "
                f"not by the home's owner {home.uid} or root"
            )
        if dev is not None and st.st_dev != dev:
            os.close(fd)
            raise HomeRefused(
                f"{escape(home.name)}: {escape(part)} is on another file system than the home "
                "(--cross-mounts allows it)",
                "mount",
            )
    return SourceDir(home.name, home.uid, fd, dev)


def open_home(root_fd: int, name: str, config: Config) -> SourceDir | None:
    """The live path's walk for one home by name: lstat, qualify, `open_sessions_dir`.
    None when the home is gone, does not qualify or has no sessions directory."""
    try:
        st = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not home_qualifies(name, st, config):
        return None
    return open_sessions_dir(root_fd, Home(name, st.st_uid), config)


def _step(parent_fd: int, part: str, user: str) -> tuple[int, os.stat_result]:
    try:
        return open_dir_at(parent_fd, part)
    except Refused as e:
        raise HomeRefused(f"{escape(user)}: {escape(part)} is {e.reason}") from None
    except PermissionError:
        raise HomeRefused(f"{escape(user)}: {escape(part)} is not readable") from None
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise FileNotFoundError(e.errno, e.strerror) from None
        raise


def log_home_refused(limiter: LogLimiter, user: str, e: HomeRefused) -> None:
    """The one WARNING for a home whose walk is unsafe: limited per user and kind."""
    limiter.log(
        log,
        logging.WARNING,
        user,
        "refused:" + e.kind,
        "refused user %s: %s",
        escape(user),
        e.reason,
        extra=fields(user, reason=e.kind),
    )


def walk_user(
    root_fd: int, home: Home, config: Config, limiter: LogLimiter | None = None
) -> SourceDir | None:
    """`open_sessions_dir` with a refusal logged as one WARNING and any other error (EIO,
    ESTALE on a network home, ...) as one ERROR, both limited per user by `limiter`: one
    bad home never ends the pass, and a user swapping a symlink in and out cannot flood
    the log."""
    say = limiter if limiter is not None else LogLimiter(0.0)
    try:
        source = open_sessions_dir(root_fd, home, config)
        if source is None:
            log.debug("home %s has no sessions directory", escape(home.name))
        return source
    except HomeRefused as e:
        log_home_refused(say, home.name, e)
        return None
    except OSError as e:
        code = e.errno or 0
        say.log(
            log,
            logging.ERROR,
            home.name,
            "failed:" + errno_name(code),
            "could not open the sessions directory of %s: %s (%s)",
            escape(home.name),
            os.strerror(code) if code else e,
            errno_name(code),
            extra=fields(home.name, errno=errno_name(code)),
        )
        return None


# --- below the sessions directory (--depth over 1) -------------------------------------------


def say_refused(limiter: LogLimiter | None, user: str, rel: str, e: Refused) -> None:
    """One WARNING for a refused directory `rel` (below `user`'s sessions directory),
    limited per user and kind; its structured fields are user, file (`rel`) and reason."""
    say = limiter if limiter is not None else LogLimiter(0.0)
    say.log(
        log,
        logging.WARNING,
        user,
        "refused:" + e.kind,
        "refused %s: %s",
        escape(f"{user}/{rel}" if rel else user),
        e.reason,
        extra=fields(user, rel or None, reason=e.kind),
    )


def open_subdir(parent: SourceDir, name: str, config: Config) -> SourceDir:
    """One directory below `parent`, opened relative to it with O_NOFOLLOW and checked on
    what was opened: a real directory, owned by the home's owner, on the home's device
    (unless --cross-mounts), its name not hidden, its files within --depth. Raises Refused
    (kinds symlink, other, hidden, depth, owner, mount) or OSError (ENOENT, EACCES, ...)."""
    rel = parent.key(name)
    if name.startswith("."):
        raise Refused("a directory whose name starts with '.'", "hidden")
    if parent.level + 1 > config.depth:
        raise Refused(f"a directory deeper than --depth {config.depth}", "depth")
    fd, st = open_dir_at(parent.fd, name)
    if st.st_uid != parent.uid:
        os.close(fd)
        raise Refused(
            f"a directory owned by uid {st.st_uid}, not by the home's owner {parent.uid}", "owner"
        )
    if parent.dev is not None and st.st_dev != parent.dev:
        os.close(fd)
        raise Refused("a directory on another file system than its home", "mount")
    return SourceDir(parent.user, parent.uid, fd, parent.dev, rel)


def open_source_path(top: SourceDir, rel: str, config: Config) -> SourceDir:
    """The directory `rel` below the sessions directory `top`, walked one component at a
    time with `open_subdir` (the intermediate descriptors are closed; `top`'s is not)."""
    current = top
    try:
        for part in rel.split("/") if rel else ():
            nxt = open_subdir(current, part, config)
            if current is not top:
                os.close(current.fd)
            current = nxt
    except BaseException:
        if current is not top:
            os.close(current.fd)
        raise
    return current


@dataclass(frozen=True)
class Visit:
    """What `Walk` yields. kind "file": `entry` is a `*.jsonl` entry of `source` (a
    directory at any level), `st` its lstat (None: it vanished). kind "enter": `source` was
    just opened (before it is listed), `st` its fstat, `watch` whether a service should
    watch it (every first-level directory, and deeper ones of active sessions). kind
    "leave": the walk is done with `source`; its descriptor closes when the walk goes on."""

    kind: str
    source: SourceDir
    entry: os.DirEntry[str] | None = None
    st: os.stat_result | None = None
    watch: bool = False


@dataclass
class Walk:
    """The walk of one user's sessions directory, down to --depth levels, with the same
    checks at every level (`open_subdir`) and bounded entries (DIR_ENTRY_LIMIT per
    directory, USER_ENTRY_LIMIT per user, with --depth over 1 only: the flat layout is
    walked exactly as before). Refusals are one WARNING each (limited per user and kind by
    `limiter`), and the walk goes on. `hot` forces every directory below the start to
    count as active (a session that just became active again)."""

    config: Config
    limiter: LogLimiter | None = None
    now: float = field(default_factory=time.time)
    hot: bool = False
    stop: Callable[[], bool] = lambda: False
    dir_limit: int = DIR_ENTRY_LIMIT
    user_limit: int = USER_ENTRY_LIMIT
    entries: int = 0

    def visits(self, top: SourceDir) -> Iterator[Visit]:
        """Depth first from `top` (which the caller opened and closes); directories below
        it are opened and closed by the walk. The "file" visits of a directory come before
        its "leave"; a consumer that hands files to other threads waits for them there."""
        yield from self._dir(top, self.hot)

    def _recent(self, mtime: float | None) -> bool:
        return mtime is not None and self.now - mtime < self.config.active_window

    def _dir(self, source: SourceDir, hot: bool) -> Iterator[Visit]:
        nested = self.config.depth > 1
        subdirs: list[str] = []
        mtimes: dict[str, float] = {}
        seen = 0
        with os.scandir(source.fd) as it:
            for entry in it:
                if self.stop():
                    break
                if nested:
                    seen += 1
                    self.entries += 1
                    if self.entries > self.user_limit:
                        self._bound(source, f"more than {self.user_limit} entries in all")
                        break
                    if seen > self.dir_limit:
                        self._bound(source, f"more than {self.dir_limit} entries")
                        break
                if is_session_name(entry.name):
                    try:
                        st: os.stat_result | None = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        st = None
                    if nested and st is not None:
                        mtimes[entry.name[: -len(".jsonl")]] = st.st_mtime
                    yield Visit("file", source, entry, st)
                elif nested:  # deeper than --depth too: refused, with a WARNING
                    try:
                        if entry.is_dir(follow_symlinks=False) or entry.is_symlink():
                            subdirs.append(entry.name)
                    except OSError:
                        continue
        yield Visit("leave", source)
        for name in subdirs:
            if self.stop() or self.entries > self.user_limit:
                break
            try:
                sub = open_subdir(source, name, self.config)
            except Refused as e:
                say_refused(self.limiter, source.user, source.key(name), e)
                continue
            except FileNotFoundError:
                continue
            except OSError as e:
                say_refused(
                    self.limiter,
                    source.user,
                    source.key(name),
                    Refused(f"not readable ({errno_name(e.errno)})", "other"),
                )
                continue
            try:
                st = os.fstat(sub.fd)
                # A first-level directory (a project) is always watched; a deeper one
                # (a session's, its subagents/) while its session is active: it or the
                # transcript named after it changed within the window, or it is inside
                # an active one. A project's activity is not inherited (a new session in
                # it would make every old one count as active).
                first = sub.level == 2
                sub_hot = hot or self._recent(st.st_mtime) or self._recent(mtimes.get(name))
                yield Visit("enter", sub, st=st, watch=first or sub_hot)
                yield from self._dir(sub, self.hot if first else sub_hot)
            finally:
                os.close(sub.fd)

    def _bound(self, source: SourceDir, what: str) -> None:
        say_refused(
            self.limiter,
            source.user,
            source.rel,
            Refused(
                f"{what}; the rest is not looked at in this walk (the entries listed so "
                "far are copied; files in watched directories still land live)",
                "bound",
            ),
        )
