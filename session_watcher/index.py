"""What this host uploaded to the object store: one sqlite row per object key.

The object store's answer to "what do you hold for this key?" comes from here, so a full
pass with everything in sync costs LIST requests only (the LIST's ETag and size confirm the
row), never a HEAD or a PUT. The index is a cache of the bucket, not the truth: deleted, it
is rebuilt from LIST and HEAD (the objects carry their source's size, mtime and inode as
metadata); a crash between an upload and its row costs a HEAD on the next write.

Also the instance lock: two services with one state directory would race on every key.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError
from .safefs import escape

__all__ = ["INDEX_NAME", "LOCK_NAME", "Entry", "Index", "lock_state_dir"]

INDEX_NAME = "objects.sqlite"
LOCK_NAME = "lock"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    user TEXT NOT NULL,
    size INTEGER NOT NULL,      -- bytes in the object (a line-complete prefix while hot)
    mtime_ns INTEGER NOT NULL,  -- the source's mtime when that version was read
    inode INTEGER NOT NULL,
    etag TEXT NOT NULL,         -- as HEAD/LIST give it, quotes included
    tail TEXT NOT NULL,         -- sha256 of the object's last 4 KiB: is it still a prefix?
    PRIMARY KEY (bucket, key)
);
CREATE TABLE IF NOT EXISTS learnt (  -- what this bucket's engine wants, e.g. If-Match quoting
    bucket TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (bucket, name)
)
"""


@dataclass(frozen=True)
class Entry:
    size: int
    mtime_ns: int
    inode: int
    etag: str
    tail: str = ""


def lock_state_dir(state_dir: Path) -> int:
    """Take the instance lock (an flock held for the process's life); a second instance
    with the same state directory gets a ConfigError (exit 2)."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    fd = os.open(
        state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"another session-watcher is running with state dir {escape(str(state_dir))}"
        ) from None
    return fd


class Index:
    """The rows of one bucket. Thread-safe (one connection, one lock: rows are tiny).

    `readonly` (status, dry runs) never creates or writes the file: what a LIST teaches is
    kept in memory for the process instead."""

    def __init__(self, state_dir: Path, bucket: str, *, readonly: bool = False) -> None:
        self.bucket = bucket
        self.readonly = readonly
        self._lock = threading.Lock()
        self._mem: dict[str, tuple[str, Entry]] = {}
        path = state_dir / INDEX_NAME
        self._db: sqlite3.Connection | None = None
        if readonly:
            if path.exists():
                self._db = sqlite3.connect(
                    f"file:{path}?mode=ro", uri=True, check_same_thread=False
                )
        else:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def get(self, key: str) -> Entry | None:
        with self._lock:
            if key in self._mem:
                return self._mem[key][1]
            if self._db is None:
                return None
            try:
                row = self._db.execute(
                    "SELECT size, mtime_ns, inode, etag, tail FROM objects"
                    " WHERE bucket = ? AND key = ?",
                    (self.bucket, key),
                ).fetchone()
            except sqlite3.OperationalError:  # a read-only look at an index not made yet
                return None
        return None if row is None else Entry(*row)

    def put(self, key: str, user: str, entry: Entry) -> None:
        with self._lock:
            if self.readonly or self._db is None:
                self._mem[key] = (user, entry)
                return
            self._db.execute(
                "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self.bucket,
                    key,
                    user,
                    entry.size,
                    entry.mtime_ns,
                    entry.inode,
                    entry.etag,
                    entry.tail,
                ),
            )

    def delete(self, key: str) -> None:
        with self._lock:
            self._mem.pop(key, None)
            if not self.readonly and self._db is not None:
                self._db.execute(
                    "DELETE FROM objects WHERE bucket = ? AND key = ?", (self.bucket, key)
                )

    def keys_with_prefix(self, prefix: str) -> set[str]:
        with self._lock:
            out = {k for k in self._mem if k.startswith(prefix)}
            if self._db is not None:
                try:
                    rows = self._db.execute(
                        "SELECT key FROM objects WHERE bucket = ? AND substr(key, 1, ?) = ?",
                        (self.bucket, len(prefix), prefix),
                    ).fetchall()
                except sqlite3.OperationalError:
                    rows = []
                out |= {r[0] for r in rows}
        return out

    def usage(self, user: str) -> tuple[int, int]:
        """(bytes, objects) of one user's rows: their share of the bucket, for the quotas."""
        with self._lock:
            nbytes = sum(e.size for u, e in self._mem.values() if u == user)
            files = sum(1 for u, _ in self._mem.values() if u == user)
            if self._db is not None:
                try:
                    row = self._db.execute(
                        "SELECT coalesce(sum(size), 0), count(*) FROM objects"
                        " WHERE bucket = ? AND user = ?",
                        (self.bucket, user),
                    ).fetchone()
                except sqlite3.OperationalError:
                    row = (0, 0)
                nbytes += row[0]
                files += row[1]
        return nbytes, files

    def learnt(self, name: str) -> str | None:
        with self._lock:
            if self._db is None:
                return None
            try:
                row = self._db.execute(
                    "SELECT value FROM learnt WHERE bucket = ? AND name = ?", (self.bucket, name)
                ).fetchone()
            except sqlite3.OperationalError:
                return None
        return None if row is None else str(row[0])

    def learn(self, name: str, value: str) -> None:
        with self._lock:
            if not self.readonly and self._db is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO learnt VALUES (?, ?, ?)", (self.bucket, name, value)
                )

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
