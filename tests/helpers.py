"""Shared test helpers: real trees with real owners, writes as a user, waits with deadlines,
the CLI as a real subprocess. Used by every test module (and `conftest.py`'s fixtures)."""

from __future__ import annotations

import grp
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from session_watcher.config import ENV_PREFIX, Config

__all__ = [
    "IS_ROOT",
    "TEST_GROUP",
    "Tree",
    "User",
    "cli_env",
    "log_lines",
    "root_only",
    "run_as",
    "run_cli",
    "snapshot",
    "wait_for",
    "write_as",
]

T = TypeVar("T")

IS_ROOT = os.geteuid() == 0
root_only = pytest.mark.skipif(not IS_ROOT, reason="needs root (chown, setpriv, mount)")


def _pick_group() -> str:
    # An existing group that is not root's: `users` on Debian. Not as root, only a group we
    # are in can be given to a file: our own.
    if not IS_ROOT:
        return grp.getgrgid(os.getegid()).gr_name
    for name in ("users", "nogroup"):
        try:
            grp.getgrnam(name)
            return name
        except KeyError:
            continue
    return grp.getgrgid(os.getegid()).gr_name


TEST_GROUP = _pick_group()
TEST_GID = grp.getgrnam(TEST_GROUP).gr_gid


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    interval: float = 0.01,
    what: str = "",
) -> T:
    """Poll `predicate` until it returns something truthy (returned) or the deadline passes
    (AssertionError naming `what`)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def run_as(
    uid: int, gid: int, argv: list[str | bytes], *, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` as uid/gid with no supplementary groups (as root), else as ourselves."""
    prefix: list[str | bytes] = []
    if IS_ROOT:
        prefix = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    return subprocess.run(
        [*prefix, *argv], input=input, capture_output=True, check=True, timeout=30
    )


def write_as(
    uid: int, gid: int, path: Path | str | bytes, data: bytes, *, append: bool = False
) -> None:
    """Create (umask 077, so mode 0600 like the real client) or append to `path` as uid."""
    redirect = ">>" if append else ">"
    run_as(
        uid,
        gid,
        ["sh", "-c", f'umask 077 && cat {redirect} "$1"', "sh", os.fsencode(path)],
        input=data,
    )


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: Path
    sessions: Path


class Tree:
    """A home root with users (real directories, chowned to uid 1000+i as root) and a store
    path next to it (not created: the code under test creates it)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.home_root = base / "home"
        self.target = base / "store"
        self.home_root.mkdir(mode=0o755)
        self.users: dict[str, User] = {}

    def add_user(self, name: str, uid: int | None = None, *, sessions_dir: bool = True) -> User:
        if uid is None:
            uid = 1000 + len(self.users) if IS_ROOT else os.geteuid()
        home = self.home_root / name
        sessions = home / "user" / "sessions"
        home.mkdir(mode=0o750)
        made = [home]
        if sessions_dir:
            sessions.mkdir(mode=0o700, parents=True)
            made += [home / "user", sessions]
        if IS_ROOT:
            for p in made:
                os.chown(p, uid, uid)
        user = User(name, uid, uid, home, sessions)
        self.users[name] = user
        return user

    def user(self, user: str | User) -> User:
        return user if isinstance(user, User) else self.users[user]

    def write(
        self,
        user: str | User,
        name: str,
        data: bytes,
        *,
        append: bool = False,
        mtime: float | None = None,
    ) -> Path:
        """Write a session file as its user (setpriv); `mtime` sets its mtime afterwards
        (epoch seconds), e.g. to make it quiet or hot regardless of the clock."""
        u = self.user(user)
        path = u.sessions / name
        write_as(u.uid, u.gid, path, data, append=append)
        if mtime is not None:
            os.utime(path, (mtime, mtime), follow_symlinks=False)
        return path

    def write_fast(self, user: str | User, name: str, data: bytes, mode: int = 0o600) -> Path:
        """Write as root, then chown: for big files where the writer's identity is moot."""
        u = self.user(user)
        path = u.sessions / name
        path.write_bytes(data)
        os.chmod(path, mode)
        if IS_ROOT:
            os.chown(path, u.uid, u.gid)
        return path

    def source(self, user: str | User, name: str) -> Path:
        return self.user(user).sessions / name

    def stored(self, user: str | User, name: str) -> Path:
        return self.target / self.user(user).name / name

    def min_uid(self) -> int:
        return 1000 if IS_ROOT else min(1000, os.geteuid())

    def config(self, **overrides: Any) -> Config:
        values: dict[str, Any] = {
            "home_root": self.home_root,
            "target": self.target,
            "group": TEST_GROUP,
            "min_uid": self.min_uid(),
            "max_uid": max(60000, os.geteuid()),
        }
        values.update(overrides)
        return Config(**values)

    def cli_args(self, *extra: str) -> list[str]:
        """Arguments for `reconcile` on this tree (uid range widened when not root)."""
        return [
            "--home-root",
            str(self.home_root),
            "--target",
            str(self.target),
            "--group",
            TEST_GROUP,
            "--min-uid",
            str(self.min_uid()),
            "--max-uid",
            str(max(60000, os.geteuid())),
            *extra,
        ]


def make_base() -> Path:
    """A fresh directory under the system temp dir that other uids can traverse (pytest's
    own basetemp is 0700 root-only, so a user process could not reach its home there)."""
    base = Path(tempfile.mkdtemp(prefix="sw-test-"))
    base.chmod(0o755)
    return base


def remove_base(base: Path) -> None:
    shutil.rmtree(base, ignore_errors=True)


# The keys of `reconcile --json` and of `PassStats.as_dict()`: the contract of issue 2.
STATS_KEYS = frozenset(
    {
        "users_processed",
        "files_copied",
        "files_skipped",
        "files_refused",
        "files_failed",
        "bytes_copied",
        "duration_s",
    }
)


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a CLI subprocess: ours minus any SESSION_WATCHER_* setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.pop("JOURNAL_STREAM", None)
    # Never the real /run/session-watcher/state.json: on a host running the service, a test
    # would overwrite (or `status` would read) the live one. This directory does not exist,
    # which is also what the default is like on a machine without the unit.
    env[ENV_PREFIX + "STATE_FILE"] = os.path.join(
        tempfile.gettempdir(), f"session-watcher-tests-{os.getpid()}-absent", "state.json"
    )
    env.update(extra or {})
    return env


def run_cli(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """`python -m session_watcher ARGS` as a real process; stdout/stderr as text."""
    return subprocess.run(
        [sys.executable, "-m", "session_watcher", *args],
        capture_output=True,
        text=True,
        errors="backslashreplace",
        env=cli_env(env),
        timeout=timeout,
        check=False,
    )


def log_lines(records: Iterable[logging.LogRecord], level: int) -> list[str]:
    """Messages of our package's records at exactly `level`."""
    return [
        r.getMessage()
        for r in records
        if r.levelno == level and r.name.startswith("session_watcher")
    ]


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under `root` (not following links) with its mode, size and mtime (ns)."""
    out: dict[str, tuple[int, int, int]] = {}
    if not os.path.lexists(root):
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [*dirnames, *filenames]:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[p] = (st.st_mode, st.st_size, st.st_mtime_ns)
    st = os.lstat(root)
    out[str(root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out
