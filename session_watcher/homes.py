"""Which homes qualify, and the safe walk from the home root to a user's sessions directory."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from .config import Config
from .copy import SourceDir
from .safefs import Refused, escape, open_dir_at

__all__ = [
    "Home",
    "HomeRefused",
    "home_qualifies",
    "is_session_name",
    "list_homes",
    "open_sessions_dir",
    "walk_user",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Home:
    name: str
    uid: int


class HomeRefused(Exception):
    """A home whose walk to its sessions directory is unsafe: the whole user is skipped."""


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


def list_homes(root_fd: int, config: Config) -> Iterator[Home]:
    """Qualifying homes under the opened home root (lstat only: a symlink never qualifies)."""
    with os.scandir(root_fd) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
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
    return SourceDir(home.name, home.uid, fd)


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


def walk_user(root_fd: int, home: Home, config: Config) -> SourceDir | None:
    """`open_sessions_dir` with the refusal logged once as a WARNING, and any other error
    (EIO, ESTALE on a network home, ...) as one ERROR: one bad home never ends the pass."""
    try:
        source = open_sessions_dir(root_fd, home, config)
        if source is None:
            log.debug("home %s has no sessions directory", escape(home.name))
        return source
    except HomeRefused as e:
        log.warning("refused user %s for this pass: %s", escape(home.name), e)
        return None
    except OSError as e:
        code = e.errno or 0
        log.error(
            "could not open the sessions directory of %s: %s (%s)",
            escape(home.name),
            os.strerror(code) if code else e,
            errno.errorcode.get(code, "?"),
        )
        return None
