"""Which homes qualify, and the safe walk from the home root to a user's sessions directory."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

from .config import Config
from .copy import SourceDir
from .logfmt import fields
from .ratelimit import LogLimiter
from .safefs import Refused, errno_name, escape, open_dir_at
from .stuck import UserStuck

__all__ = [
    "Home",
    "HomeRefused",
    "home_qualifies",
    "is_session_name",
    "list_homes",
    "open_home",
    "open_sessions_dir",
    "walk_user",
]

log = logging.getLogger(__name__)


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
        say.log(
            log,
            logging.WARNING,
            home.name,
            "refused:" + e.kind,
            "refused user %s: %s",
            escape(home.name),
            e.reason,
            extra=fields(home.name, reason=e.kind),
        )
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
