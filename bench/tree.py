"""Generated trees: homes with `user/sessions/*.jsonl`, and stores pre-filled to match.

Every line the writers produce starts with `{"seq":N,` so the observer can tell which
append a landed copy contains from its last line alone.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Tree", "append", "line", "prefill_store", "write_file"]

SESSIONS = ("user", "sessions")


def line(seq: int, size: int) -> bytes:
    """One JSON line of about `size` bytes (newline included)."""
    head = b'{"seq":%d,"type":"assistant","pad":"' % seq
    pad = max(0, size - len(head) - 3)
    return head + b"x" * pad + b'"}\n'


def write_file(path: Path, nbytes: int, seq: int = 0, line_size: int = 2048) -> None:
    """A transcript of about `nbytes` bytes of whole lines (built from one repeated block:
    generating gigabytes must cost disk time only)."""
    one = line(seq, line_size)
    block = one * max(1, (1 << 20) // len(one))
    with open(path, "wb") as f:
        left = nbytes
        while left >= len(block):
            f.write(block)
            left -= len(block)
        if left > 0:
            f.write(one * -(-left // len(one)))  # round up to whole lines


def append(path: Path, data: bytes, write_size: int = 512 * 1024) -> None:
    """Append the way Claude Code does: O_APPEND, the chunk in `write_size` write()s, close."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view[:write_size])
            view = view[n:]
    finally:
        os.close(fd)


@dataclass
class Tree:
    """A home root; every home owned by root (the service runs with --min-uid 0)."""

    root: Path
    files: dict[str, list[str]] = field(default_factory=dict)  # user -> names

    def sessions(self, user: str) -> Path:
        return self.root.joinpath(user, *SESSIONS)

    def path(self, user: str, name: str) -> Path:
        return self.sessions(user) / name

    def add_user(self, user: str) -> Path:
        d = self.sessions(user)
        d.mkdir(parents=True, exist_ok=True)
        self.files.setdefault(user, [])
        return d

    def add_file(self, user: str, name: str, nbytes: int) -> Path:
        p = self.add_user(user) / name
        write_file(p, nbytes)
        self.files[user].append(name)
        return p

    def pairs(self) -> list[tuple[str, str]]:
        return [(u, n) for u, names in self.files.items() for n in names]

    def session_dirs(self) -> list[Path]:
        return [self.sessions(u) for u in self.files]

    def total_bytes(self) -> int:
        return sum(self.path(u, n).stat().st_size for u, n in self.pairs())


def prefill_store(tree: Tree, store: Path) -> None:
    """`store/<user>/<name>` as an exact copy (mtime included), so every peer starts in
    sync and session-watcher's quick check (size + mtime) sees nothing to do."""
    for user, names in tree.files.items():
        d = store / user
        d.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy2(tree.path(user, name), d / name)
