"""What a raw inotify event means to the service: a pure function of (mask, name), so the
reader thread decides without touching the file system.

The masks are what the kernel is asked for; each bit is there for a reason:

- IN_CLOSE_WRITE: a writer closed a transcript (Claude Code: every ~100 ms flush);
- IN_MOVED_TO: a file renamed into place (rsync, editors, `mv` from elsewhere): the
  destination name is complete, no close follows. IN_MOVED_FROM is not asked for: a name
  leaving the directory needs nothing (the store is an archive), and every event asked
  for costs a slot in the kernel queue whose overflow costs a pass;
- IN_CREATE: a new name; a file created by open(O_CREAT) is empty and its writer's close
  follows within microseconds, so it is asked for `CREATED_DELAY` later and the close's
  request (due at once) supersedes it. A name created without a close (`ln`, `mkfifo`,
  `ln -s`) still lands, or is refused, that much later. No lstat decides this: a
  path-based call on the reader thread would let one user's hung file system (FUSE, NFS)
  stop every user's events;
- IN_ATTRIB: an mtime set after the close (`cp -p`, tar, `touch -r`);
- IN_DELETE_SELF / IN_MOVE_SELF / IN_UNMOUNT (and IN_IGNORED, which watchdog turns into
  `on_watch_deleted`): the watched directory went or moved away; whatever is at its path
  now is walked and watched afresh by a rescan;
- IN_ONLYDIR | IN_DONT_FOLLOW: the watch is added by path after the safe walk verified the
  directory; a symlink swapped in since is refused by the kernel, never followed;
- IN_EXCL_UNLINK: no events for a name after it was unlinked (nothing to copy).

The home root: directories created, deleted or renamed in it (a home appeared or went),
and its own deletion or move (`mv /home /home.old`, a restore that recreates it).
"""

from __future__ import annotations

import enum

from watchdog.observers.inotify_c import InotifyConstants as C
from watchdog.observers.inotify_c import Mask

from .homes import is_session_name

__all__ = [
    "CREATED_DELAY",
    "ROOT_MASK",
    "SESSIONS_MASK",
    "Action",
    "root_action",
    "sessions_action",
]

SESSIONS_MASK = Mask(
    C.IN_CLOSE_WRITE
    | C.IN_MOVED_TO
    | C.IN_CREATE
    | C.IN_ATTRIB
    | C.IN_DELETE_SELF
    | C.IN_MOVE_SELF
    | C.IN_ONLYDIR
    | C.IN_DONT_FOLLOW
    | C.IN_EXCL_UNLINK
)
ROOT_MASK = Mask(
    C.IN_CREATE
    | C.IN_DELETE
    | C.IN_MOVED_FROM
    | C.IN_MOVED_TO
    | C.IN_DELETE_SELF
    | C.IN_MOVE_SELF
    | C.IN_ONLYDIR
    | C.IN_DONT_FOLLOW  # like open_root_dir: the root's last component is no symlink
)

_GONE = C.IN_DELETE_SELF | C.IN_MOVE_SELF | C.IN_UNMOUNT | C.IN_IGNORED
_FILE_NOW = C.IN_CLOSE_WRITE | C.IN_MOVED_TO | C.IN_ATTRIB
_HOME_CHANGED = C.IN_CREATE | C.IN_DELETE | C.IN_MOVED_FROM | C.IN_MOVED_TO

# Seconds after its IN_CREATE that a created file is copied if no close asks sooner.
CREATED_DELAY = 1.0


class Action(enum.Enum):
    NONE = "none"
    COPY_NOW = "copy now"  # a close, a rename in, an attribute change: copy at once
    COPY_LATER = "copy later"  # created: copy after CREATED_DELAY unless a close comes first
    GONE = "gone"  # the watched directory itself went: drop its watch, rescan
    CHANGED = "changed"  # the home root: a home appeared, went or was renamed: rescan


def sessions_action(mask: int, name: str) -> Action:
    """The event `mask` for `name` ("" for the directory itself) on a sessions watch."""
    if mask & _GONE:
        return Action.GONE
    if not name or mask & C.IN_ISDIR or not is_session_name(name):
        return Action.NONE
    if mask & _FILE_NOW:
        return Action.COPY_NOW
    if mask & C.IN_CREATE:
        return Action.COPY_LATER
    return Action.NONE


def root_action(mask: int) -> Action:
    """The event `mask` on the home root's watch."""
    if mask & _GONE:
        return Action.GONE
    if mask & C.IN_ISDIR and mask & _HOME_CHANGED:
        return Action.CHANGED
    return Action.NONE
