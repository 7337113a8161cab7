"""The arrival observer, run as its own process (`python -m bench.observer DIR...`) so the
writer's work never delays its timestamps (and vice versa).

It watches each store directory for IN_MOVED_TO | IN_CLOSE_WRITE, takes CLOCK_MONOTONIC
(system-wide on Linux, so comparable with the writer's close times) as soon as read()
returns, then reads the landed file's last line to learn which append it contains. It
prints "ready" once the watches are set, and when its stdin closes it prints one JSON list
of [dir_index, name, t, size, seq] records and exits.

One copy is one arrival (`Arrivals`): a tool that writes in place (cp) shows IN_CLOSE_WRITE,
one that renames a temp file into place (rsync) IN_MOVED_TO; session-watcher, which closes
its temp file after the rename (its flock must be held until then), shows IN_MOVED_TO and
then IN_CLOSE_WRITE under the final name. That close is the same copy, not a second one.
"""

from __future__ import annotations

import json
import os
import re
import select
import sys
import time

from .inotify import IN_CLOSE_WRITE, IN_MOVED_TO, IN_Q_OVERFLOW, Inotify

__all__ = ["Arrivals", "last_seq", "main"]

_SEQ = re.compile(rb'"seq":(\d+)')
_TAIL = 16 * 1024  # longer than any line the writers produce


def last_seq(fd: int, size: int) -> int:
    """The seq of the last complete line in the first `size` bytes, or -1."""
    n = min(size, _TAIL)
    data = os.pread(fd, n, size - n)
    end = data.rfind(b"\n")
    if end < 0:
        return -1
    start = data.rfind(b"\n", 0, end) + 1
    m = _SEQ.search(data, start, end)
    return int(m.group(1)) if m else -1


class Arrivals:
    """Which inotify events (wd, mask, name) are the arrival of a new copy in the store."""

    def __init__(self) -> None:
        # Names whose last event was IN_MOVED_TO: a close that follows is that copy's.
        self._renamed_in: set[tuple[int, str]] = set()

    def is_arrival(self, wd: int, mask: int, name: str) -> bool:
        # Temp files (rsync's ".name.XXXXXX", ours ".session-watcher.*.tmp") are not
        # arrivals; only the final name counts.
        if name.startswith(".") or not name.endswith(".jsonl"):
            return False
        key = (wd, name)
        if mask & IN_MOVED_TO:
            self._renamed_in.add(key)
            return True
        if mask & IN_CLOSE_WRITE:
            if key in self._renamed_in:
                self._renamed_in.discard(key)
                return False  # the copier closing the file it has just renamed in
            return True
        return False


def main(argv: list[str]) -> int:
    ino = Inotify()
    dirs: dict[int, tuple[int, str]] = {}
    for i, d in enumerate(argv):
        dirs[ino.add(d, IN_MOVED_TO | IN_CLOSE_WRITE)] = (i, d)
    records: list[tuple[int, str, float, int, int]] = []
    arrivals = Arrivals()
    overflows = 0
    poller = select.poll()
    poller.register(ino.fd, select.POLLIN)
    poller.register(sys.stdin.fileno(), select.POLLIN | select.POLLHUP)
    print("ready", flush=True)
    running = True
    while running:
        for fd, _ in poller.poll():
            if fd != ino.fd:
                running = False
                continue
            t = time.monotonic()
            for wd, mask, name in ino.read():
                if mask & IN_Q_OVERFLOW:
                    overflows += 1
                    continue
                if wd not in dirs or not arrivals.is_arrival(wd, mask, name):
                    continue
                index, d = dirs[wd]
                try:
                    fd2 = os.open(os.path.join(d, name), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                try:
                    size = os.fstat(fd2).st_size
                    seq = last_seq(fd2, size)
                finally:
                    os.close(fd2)
                records.append((index, name, t, size, seq))
    json.dump({"records": records, "overflows": overflows}, sys.stdout)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
