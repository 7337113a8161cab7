"""A minimal inotify reader over ctypes: the benchmark detects arrivals in a store the way
a consumer would, from the kernel's IN_MOVED_TO/IN_CLOSE_WRITE, never by polling (polling
would add its own interval to every latency figure)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct

__all__ = ["IN_CLOSE_WRITE", "IN_MOVED_TO", "IN_Q_OVERFLOW", "Inotify"]

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_Q_OVERFLOW = 0x00004000
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


class Inotify:
    """One inotify descriptor; `read()` returns (wd, mask, name) for every queued event."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"inotify_init1: {os.strerror(e)}")
        self.fd: int = fd

    def add(self, path: str, mask: int) -> int:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"inotify_add_watch {path}: {os.strerror(e)}")
        return int(wd)

    def read(self) -> list[tuple[int, int, str]]:
        try:
            buf = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        out: list[tuple[int, int, str]] = []
        pos = 0
        while pos + _HEADER.size <= len(buf):
            wd, mask, _cookie, length = _HEADER.unpack_from(buf, pos)
            pos += _HEADER.size
            name = buf[pos : pos + length].rstrip(b"\0")
            pos += length
            out.append((wd, mask, os.fsdecode(name)))
        return out

    def close(self) -> None:
        os.close(self.fd)
