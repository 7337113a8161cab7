"""Regression tests for what `make soak` (tests/soak/soak.py) found in the product.

Each test names its finding; all run in a second or two under plain `make test`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import TEST_GID, Tree, cli_env, root_only, wait_for, write_as

from session_watcher import copy as copy_mod
from session_watcher.copy import SourceDir, sync_file
from session_watcher.reconcile import reconcile
from session_watcher.store import ORPHAN_TEMP_SECONDS, TEMP_PREFIX, Store, UserStore

LINE = b'{"type":"user","text":"hello"}\n'


def _temps(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith(TEMP_PREFIX))


# --- finding 1: a kill -9 mid-copy left its temp file in the store for an hour -------------


def test_temp_of_a_killed_copier_is_removed_by_the_next_pass(tree: Tree) -> None:
    """Soak: every `kill -9` that landed mid-copy left a `.session-watcher.*.tmp` in the
    store; the pass after the restart kept it (under an hour old), so "no temp file left"
    failed. A copy now holds an flock on its temp file before it writes to it; an unlocked
    one with data is a dead process's and goes with the next pass, while a live copy's
    stays (issue 10, defect 2: at once, not after a grace of 10 s)."""
    d = tree.base / "userstore"
    d.mkdir()
    name = f"{TEMP_PREFIX}00000000000000ab.tmp"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import fcntl, os, sys, time
                fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.write(fd, b"partial")
                print("locked", flush=True)
                time.sleep(60)
                """
            ),
            str(d / name),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"locked\n"
        store = Store(tree.config(), TEST_GID)
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            later = time.time() + ORPHAN_TEMP_SECONDS + 1
            assert store.remove_stale_temps(fd, "alice") == 0  # fresh
            assert store.remove_stale_temps(fd, "alice", now=later) == 0  # a live copy's
            holder.send_signal(signal.SIGKILL)
            holder.wait(10)
            assert store.remove_stale_temps(fd, "alice") == 1  # the crash's, at once
        finally:
            os.close(fd)
        assert _temps(d) == []
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()


def test_copy_holds_the_lock_on_its_temp_file_until_the_rename(tree: Tree) -> None:
    """The other half of finding 1: the pass must never remove a live copy's temp file,
    so the copy really holds the lock while it writes (checked from inside the copy)."""
    tree.add_user("alice")
    tree.write_fast("alice", "s.jsonl", LINE * 100)
    config = tree.config()
    store = Store(config, TEST_GID)
    root = store.open_root(create=True)
    assert root is not None
    user_store = UserStore(store, root, "alice")
    seen: list[int] = []
    real = copy_mod._copy_bytes

    def spy(src: int, dst: int, length: int, chunk: int | None = None) -> int:
        dir_fd = user_store.fd(create=False)
        assert dir_fd is not None
        old = time.time() + ORPHAN_TEMP_SECONDS + 1
        seen.append(store.remove_stale_temps(dir_fd, "alice", now=old))
        return real(src, dst, length, chunk)

    src_fd = os.open(tree.users["alice"].sessions, os.O_RDONLY | os.O_DIRECTORY)
    copy_mod._copy_bytes = spy
    try:
        result = sync_file(
            config,
            SourceDir("alice", tree.users["alice"].uid, src_fd),
            user_store,
            "s.jsonl",
            now=time.time() + 60,
        )
    finally:
        copy_mod._copy_bytes = real
        user_store.close()
        os.close(src_fd)
        os.close(root)
    assert seen == [0], "the pass removed the temp file of a copy in progress"
    assert result.outcome.value == "copied"
    assert tree.stored("alice", "s.jsonl").read_bytes() == LINE * 100
    wait_for(lambda: _temps(tree.target / "alice") == [], timeout=1, what="no temp file")


# --- finding 2: a copy that failed (ENOSPC) was never retried without a new event ----------


def _start_service(tree: Tree, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tree.base / "service.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "session_watcher", "run", *tree.cli_args(*extra)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=cli_env(),
        )
    wait_for(lambda: b"ready" in log.read_bytes(), timeout=15, what="the service to be ready")
    return proc, log


@root_only
def test_copy_failed_on_a_full_store_is_retried_once_space_is_back(
    tree: Tree, tmpfs: Callable[[Path, str], Path]
) -> None:
    """Soak: a session that went idle while the store was full (ENOSPC) stayed out of
    the store until the next full pass (10 min by default; never with
    --reconcile-interval 0), although the disk was freed seconds later. A failed copy is
    now retried with a backoff (2 s, doubling up to a minute) until it lands."""
    user = tree.add_user("alice")
    tmpfs(tree.target, "1m")
    proc, log = _start_service(
        tree, "--reconcile-interval", "0", "--settle", "0", "--state-file", str(tree.base / "s")
    )
    filler = tree.target / ".filler"
    try:
        with open(filler, "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        data = LINE * 2000  # 64 KB: cannot fit
        write_as(user.uid, user.gid, user.sessions / "s.jsonl", data)
        wait_for(lambda: b"No space left" in log.read_bytes(), what="the copy to fail")
        filler.unlink()
        stored = tree.stored("alice", "s.jsonl")
        wait_for(
            lambda: stored.exists() and stored.read_bytes() == data,
            timeout=15,
            what="the failed copy to be retried",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


# --- finding 3: a crash's temp file in the store directory of a renamed home stayed --------


def test_temp_left_under_a_renamed_homes_old_store_dir_goes_with_a_full_pass(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The soak's kill-then-rename: the service dies mid-copy of alice's file and her home
    is renamed before it is back. Her old store directory (an archive, kept) held the dead
    copy's temp file, and no pass ever looked there again: each pass only swept the store
    directories of the homes it walked. A full pass now sweeps the others too."""
    tree.add_user("alice2")
    tree.write("alice2", "s.jsonl", LINE)
    old = tree.target / "alice"
    old.mkdir(parents=True)
    (old / "kept.jsonl").write_bytes(LINE)
    orphan = old / f"{TEMP_PREFIX}00000000000000cd.tmp"
    orphan.write_bytes(b"half a cop")
    reconcile(tree.config(), only=["alice2"])
    assert orphan.exists()  # a pass limited to some homes leaves the others alone
    stats = reconcile(tree.config())
    assert stats.files_failed == 0
    assert not orphan.exists()
    assert (old / "kept.jsonl").read_bytes() == LINE  # the archive itself is kept
    assert tree.stored("alice2", "s.jsonl").read_bytes() == LINE
