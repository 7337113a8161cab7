"""Gaps in live watching that only a full pass used to close: a sessions directory
replaced in place (rmdir + mkdir reusing its inode, or renamed away and made again), a
change of mtime alone, and a dead inotify reader thread that WATCHDOG=1 must notice.

Real `session-watcher run` subprocesses (the `start` fixture of test_service.py, with no
periodic pass), so before these fixes the files below were never copied at all."""

from __future__ import annotations

import os
import signal
import sys

from harness import COPY_LINE, StartFn, line, wait_stored
from helpers import Tree, run_as, wait_for

from session_watcher.service import Service as ServiceObject

UTIME = "import os, sys; os.utime(sys.argv[1], (1700000000, 1700000000))"


def replace_sessions_dir(tree: Tree, user: str, script: str) -> None:
    """Run `script` ($1 = the sessions directory) in one shell as the user."""
    u = tree.users[user]
    run_as(u.uid, u.gid, ["sh", "-c", script, "sh", str(u.sessions)])


def test_sessions_dir_recreated_with_its_old_inode_is_watched_again(
    tree: Tree, start: StartFn
) -> None:
    alice = tree.add_user("alice")
    svc = start()
    ino = alice.sessions.stat().st_ino
    # Stopped, the service cannot rescan between the two: ext4 then hands the new
    # directory the same inode, so its (st_dev, st_ino) looks unchanged while watchdog
    # has dropped the watch (IN_DELETE_SELF stops its emitter).
    svc.send(signal.SIGSTOP)
    try:
        replace_sessions_dir(tree, "alice", 'rmdir "$1" && mkdir -m 700 "$1"')
    finally:
        svc.send(signal.SIGCONT)
    reused = alice.sessions.stat().st_ino == ino  # always on ext4; the test holds either way
    svc.wait_log(f"watching '{alice.sessions}'", count=2, timeout=8.0)
    tree.write(alice, "after.jsonl", line(1))
    wait_stored(tree, alice, "after.jsonl", line(1), timeout=8.0)
    # Copied by the live watch (latency logged), not by a pass.
    assert COPY_LINE.search(svc.wait_log("copied 'alice/after.jsonl'")[0]), reused


def test_sessions_dir_renamed_away_and_made_again_is_watched_again(
    tree: Tree, start: StartFn
) -> None:
    alice = tree.add_user("alice")
    svc = start()
    # IN_MOVE_SELF only: nothing changes in the home root or below the home's `user`.
    replace_sessions_dir(tree, "alice", 'mv "$1" "$1.old" && mkdir -m 700 "$1"')
    svc.wait_log(f"watching '{alice.sessions}'", count=2, timeout=8.0)
    tree.write(alice, "after.jsonl", line(2))
    wait_stored(tree, alice, "after.jsonl", line(2), timeout=8.0)
    assert COPY_LINE.search(svc.wait_log("copied 'alice/after.jsonl'")[0])


def test_mtime_only_change_reaches_the_store(tree: Tree, start: StartFn) -> None:
    alice = tree.add_user("alice")
    path = tree.write(alice, "t.jsonl", line(3))
    start()
    wait_stored(tree, alice, "t.jsonl", line(3))
    stored = tree.stored(alice, "t.jsonl")
    # What `cp -p` or tar's utimensat after the close do: IN_ATTRIB alone (not `touch`,
    # which opens the file for writing and so closes it too).
    run_as(alice.uid, alice.gid, [sys.executable, "-c", UTIME, str(path)])
    want = os.lstat(path).st_mtime_ns
    assert want == 1_700_000_000 * 10**9
    wait_for(
        lambda: stored.stat().st_mtime_ns == want,
        timeout=8.0,
        what="the store to take the source's new mtime",
    )
    assert stored.read_bytes() == line(3)


def test_dead_inotify_reader_thread_is_unhealthy(tree: Tree) -> None:
    """An InotifyFD thread reads the kernel queue for its watches: if it ends, no event
    arrives for them any more, so WATCHDOG=1 must stop (Service._healthy uses alive())."""
    tree.add_user("alice")
    svc = ServiceObject(tree.config(), environ={})
    watcher = svc.watcher
    watcher.start()
    try:
        assert watcher.alive()
        reader = watcher._root_reader.fd
        assert reader is not None
        reader.should_keep_running = lambda: False  # type: ignore[method-assign]
        (tree.home_root / "bob").mkdir()  # an event wakes the reader, which then ends
        wait_for(lambda: not reader.is_alive(), timeout=5.0, what="the reader to end")
        assert watcher.threads() == 4  # the others read on: one dead reader is enough
        assert not watcher.alive()
    finally:
        watcher.stop()
