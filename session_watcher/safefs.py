"""Descriptor-relative, symlink-refusing file system primitives, and names made safe to log.

Everything here runs as root over directories that users control, so a path is never
resolved as a whole: each component is opened relative to its parent's descriptor with
O_NOFOLLOW, and checks look at the opened descriptor (fstat), not at a path that can be
swapped between the check and the use.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = [
    "DIR_FLAGS",
    "FILE_FLAGS",
    "Refused",
    "close_quietly",
    "errno_name",
    "escape",
    "open_dir_at",
    "open_root_dir",
]

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO that slipped past lstat must not hang the open; O_NOCTTY: a tty
# device must never become our controlling terminal.
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


class Refused(Exception):
    """An entry we will not touch (symlink, wrong type, wrong owner, too large): logged, counted.

    `kind` is a word from a small fixed set (`copy.REFUSAL_KINDS`): a metrics label and the
    key of the per-user log limit; `reason` is the human words for the log line."""

    def __init__(self, reason: str, kind: str = "other") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind

    @classmethod
    def of(cls, why: tuple[str, str]) -> Refused:
        """From a `copy.Refusal` (kind, reason)."""
        return cls(why[1], why[0])


def errno_name(code: int | None) -> str:
    """ENOSPC, EIO, ...: the one name for an errno in logs, metrics and the state file."""
    return errno.errorcode.get(code or 0, "unknown")


def escape(name: str | bytes) -> str:
    """A user-controlled name as one printable, quoted token: newlines, escapes and
    undecodable bytes become backslash escapes, so a name cannot forge a log line."""
    raw = name if isinstance(name, bytes) else os.fsencode(name)
    out = []
    for ch in raw.decode("utf-8", errors="surrogateescape"):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch in "\\'":
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return "'" + "".join(out) + "'"


def close_quietly(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def open_root_dir(path: os.PathLike[str] | str) -> int:
    """Open a configured root (home root, store root). Its parents are the operator's, so
    they resolve normally; the last component itself must not be a symlink."""
    return os.open(path, DIR_FLAGS)


def open_dir_at(parent_fd: int, name: str) -> tuple[int, os.stat_result]:
    """Open one directory component relative to `parent_fd`, refusing symlinks.

    Raises Refused for a symlink or a non-directory, OSError (ENOENT, EACCES, ...) otherwise.
    """
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            try:
                st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            except OSError:
                raise e from None
            if stat.S_ISLNK(st.st_mode):
                raise Refused("a symlink", "symlink") from None
            raise Refused("not a directory", "other") from None
        raise
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    return fd, st
