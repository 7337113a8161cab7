"""The watcher on a few inotify readers: threads that do not grow with the watches, no
path-based call on a reader thread, overflows confined to the users sharing a queue, the
home root replaced, and one WARNING per episode of directories that cannot be watched.

Real inotify on real trees; the service as a real `session-watcher run` where the
behaviour is the service's (the `start` fixture of test_service.py), in-process where a
failure has to be provoked (a watch that cannot be added, a reader held up)."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import COPY_LINE, StartFn, line, wait_stored
from helpers import Tree, User, wait_for
from watchdog.observers import inotify_c
from watchdog.observers.inotify_c import InotifyConstants as C
from watchdog.observers.inotify_c import InotifyFD

from session_watcher.episode import Episode
from session_watcher.events import CREATED_DELAY, Action, root_action, sessions_action
from session_watcher.service import Service as ServiceObject
from session_watcher.watch import Watcher, reader_index

# --- pure decisions -----------------------------------------------------------------------


def test_sessions_events_map_to_actions() -> None:
    assert sessions_action(C.IN_CLOSE_WRITE, "a.jsonl") is Action.COPY_NOW
    assert sessions_action(C.IN_MOVED_TO, "a.jsonl") is Action.COPY_NOW
    assert sessions_action(C.IN_ATTRIB, "a.jsonl") is Action.COPY_NOW
    assert sessions_action(C.IN_CREATE, "a.jsonl") is Action.COPY_LATER
    for mask in (C.IN_DELETE_SELF, C.IN_MOVE_SELF, C.IN_UNMOUNT, C.IN_IGNORED):
        assert sessions_action(mask, "") is Action.GONE
    assert sessions_action(C.IN_CLOSE_WRITE, ".a.jsonl.tmp") is Action.NONE
    assert sessions_action(C.IN_CLOSE_WRITE, "a.txt") is Action.NONE
    assert sessions_action(C.IN_CREATE | C.IN_ISDIR, "d.jsonl") is Action.NONE
    assert sessions_action(C.IN_ATTRIB, "") is Action.NONE  # the directory's own mode


def test_root_events_map_to_actions() -> None:
    for mask in (C.IN_CREATE, C.IN_DELETE, C.IN_MOVED_FROM, C.IN_MOVED_TO):
        assert root_action(mask | C.IN_ISDIR) is Action.CHANGED
        assert root_action(mask) is Action.NONE  # a file or symlink is no home
    for mask in (C.IN_DELETE_SELF, C.IN_MOVE_SELF, C.IN_IGNORED):
        assert root_action(mask) is Action.GONE


def test_episode_opens_once_and_closes_once() -> None:
    e = Episode()
    assert e.fail("a") and not e.fail("b") and not e.fail("a")
    assert not e.ok("a") and not e.ok("zzz")
    assert e.ok("b")  # the last one back
    assert not e.ok("b")
    assert e.fail("c") and not e.keep({"c", "d"}) and e.keep(set())
    assert e.total == 1 and len(e) == 0


# --- in-process watchers ------------------------------------------------------------------


class Calls:
    """What a Watcher called back, with waits."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files: list[tuple[str, str, float | None, float]] = []
        self.changes = 0
        self.overflows: list[set[str] | None] = []

    def on_file(self, user: str, name: str, when: float | None, delay: float) -> None:
        with self.lock:
            self.files.append((user, name, when, delay))

    def on_change(self) -> None:
        with self.lock:
            self.changes += 1

    def on_overflow(self, users: set[str] | None) -> None:
        with self.lock:
            self.overflows.append(users)

    def file(self, user: str, name: str) -> tuple[str, str, float | None, float] | None:
        with self.lock:
            return next((f for f in self.files if f[:2] == (user, name)), None)


def ident(path: Path) -> tuple[int, int]:
    st = os.stat(path, follow_symlinks=False)
    return (st.st_dev, st.st_ino)


PATH_CALLS = ("lstat", "stat", "open", "scandir", "listdir", "access", "readlink")


def test_created_file_is_handed_on_without_a_path_call_on_the_reader(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14: one user's hung file system must not stop everyone's events, so no
    path-based call on a thread that reads events (before: an lstat per created file).
    An empty created file is asked for CREATED_DELAY later; its close supersedes that."""
    alice = tree.add_user("alice")
    svc = ServiceObject(tree.config(), environ={})
    calls = Calls()
    svc.watcher._on_file = calls.on_file
    main = threading.main_thread()
    off_main: list[str] = []

    def spy(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not main:
                off_main.append(f"{name}{args!r} on {threading.current_thread().name}")
            return real(*args, **kwargs)

        return call

    svc.watcher.start()
    try:
        svc.watchset.rescan(full=True)
        assert svc.watcher.users() == {"alice": ident(alice.sessions)}
        for name in PATH_CALLS:
            monkeypatch.setattr(os, name, spy(name, getattr(os, name)))
        # Created and kept open: IN_CREATE alone, the file still empty.
        fd = os.open(alice.sessions / "new.jsonl", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            got = wait_for(lambda: calls.file("alice", "new.jsonl"), timeout=5.0)
        finally:
            os.close(fd)
        assert got == ("alice", "new.jsonl", None, CREATED_DELAY)
        closed = wait_for(
            lambda: [f for f in calls.files if f[1] == "new.jsonl" and f[3] == 0.0], timeout=5.0
        )
        assert closed[0][2] is not None  # the close: at once, with its event time
    finally:
        monkeypatch.undo()
        svc.watcher.stop()
    assert off_main == []


def two_users_on_two_readers(tree: Tree) -> tuple[User, User]:
    names = [f"u{i}" for i in range(40)]
    a = names[0]
    b = next(n for n in names if reader_index(n) != reader_index(a))
    return tree.add_user(a), tree.add_user(b)


def test_overflow_names_only_the_users_sharing_the_queue(tree: Tree) -> None:
    """Issue 14: each reader is its own inotify instance (its own kernel queue), so one
    user's flood overflows their queue only; the others' events still arrive, and the
    repair asked for covers the users of that queue, not everyone. The overflow also shows
    that the kernel queue is the only buffer: watchdog 7.1.1's own `run` reads on into an
    unbounded queue while the dispatch is held, so nothing overflows and memory grows."""
    noisy, quiet = two_users_on_two_readers(tree)
    release = threading.Event()
    calls = Calls()

    def on_file(user: str, name: str, when: float | None, delay: float) -> None:
        calls.on_file(user, name, when, delay)
        if user == noisy.name:
            release.wait(30.0)  # holds the noisy user's reader: its queue fills up

    w = Watcher(tree.config(), on_file, calls.on_change, calls.on_overflow)
    w.start()
    try:
        for u in (noisy, quiet):
            assert w.add(u.name, ident(u.sessions))
        limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
        paths = [noisy.sessions / f"f{i:02d}.jsonl" for i in range(50)]
        # Round-robin: the kernel merges an event identical to the one queued just before.
        for i in range(limit + limit // 2):
            os.close(os.open(paths[i % len(paths)], os.O_WRONLY | os.O_CREAT, 0o600))
        (quiet.sessions / "q.jsonl").write_bytes(line(1))
        wait_for(lambda: calls.file(quiet.name, "q.jsonl"), timeout=5.0)  # not held up
        release.set()
        wait_for(lambda: calls.overflows, timeout=10.0, what="the overflow callback")
        assert calls.overflows == [{noisy.name}]
        assert w.threads() == 5  # the root's reader and four for the users
    finally:
        release.set()
        w.stop()


def test_a_watch_that_cannot_be_added_warns_once_per_episode(
    tree: Tree, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 10 defect 4: the watch limit reached (ENOSPC) degrades every directory to the
    30 s scan with one WARNING, not one per directory per retry; recovery is one INFO."""
    users = [tree.add_user(f"u{i}") for i in range(3)]
    real_add = InotifyFD.add_callback
    full = True

    def add_callback(self: InotifyFD, path: bytes, *args: Any) -> Any:
        if full and path.endswith(b"/sessions"):
            raise OSError(errno.ENOSPC, "inotify watch limit reached")
        return real_add(self, path, *args)

    monkeypatch.setattr(InotifyFD, "add_callback", add_callback)
    caplog.set_level(logging.DEBUG, logger="session_watcher")
    svc = ServiceObject(tree.config(), environ={})
    svc.watcher.start()
    try:

        def records(level: int) -> list[logging.LogRecord]:
            return [
                r
                for r in caplog.records
                if r.levelno == level and r.name.startswith("session_watcher")
            ]

        svc.watchset.rescan(full=True)
        for _ in range(3):
            svc.watchset.retry_degraded()  # what the control loop does every 30 s
        svc.watchset.rescan(full=True)
        assert svc.watchset._degraded == {u.name for u in users}
        warnings = records(logging.WARNING)
        assert [(getattr(r, "reason", None), getattr(r, "errno", None)) for r in warnings] == [
            ("watch-degraded", "ENOSPC")
        ], [r.getMessage() for r in warnings]
        assert not records(logging.ERROR)

        full = False  # watches can be added again
        svc.watchset.retry_degraded()
        assert svc.watchset._degraded == set() and svc.watcher.count() == 3
        infos = [r for r in records(logging.INFO) if getattr(r, "reason", None)]
        assert [getattr(r, "reason", None) for r in infos] == ["watch-recovered"]

        full = True  # a new episode warns again, once
        tree.add_user("late")
        svc.watchset.rescan(full=True)
        svc.watchset.retry_degraded()
        assert [getattr(r, "reason", None) for r in records(logging.WARNING)] == [
            "watch-degraded",
            "watch-degraded",
        ]
    finally:
        svc.watcher.stop()


def test_a_reader_that_cannot_start_degrades_instead_of_ending(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`can't start new thread` (TasksMax, pid_max) once ended the service from
    Observer.schedule; now the users of that reader are served by scan."""
    alice = tree.add_user("alice")

    def no_thread(self: InotifyFD) -> None:
        raise RuntimeError("can't start new thread")

    calls = Calls()
    monkeypatch.setattr(InotifyFD, "start", no_thread)
    w = Watcher(tree.config(), calls.on_file, calls.on_change, calls.on_overflow)
    w.start()  # logs, does not raise
    try:
        assert w.threads() == 0 and w.alive()
        assert not w.add("alice", ident(alice.sessions))
        monkeypatch.undo()
        assert w.add("alice", ident(alice.sessions))  # started by the next add
        assert w.threads() == 1
    finally:
        w.stop()


# --- the service --------------------------------------------------------------------------


def test_threads_do_not_grow_with_watched_directories(tree: Tree, start: StartFn) -> None:
    """Issue 13: one watchdog emitter thread per directory (5,000 users: 5,009 threads;
    about 22,000: the service died at start). Now a small fixed number."""
    users = 2000
    for i in range(users):
        tree.add_user(f"u{i:04d}")
    svc = start(ready=False)
    svc.wait_log(f"ready: watching {users} users", timeout=120.0)
    threads = len(os.listdir(f"/proc/{svc.proc.pid}/task"))
    # main, pass, 4 copy workers, 5 inotify readers (and nothing per directory)
    assert threads <= 16, threads
    tree.write("u1999", "live.jsonl", line(1))
    wait_stored(tree, "u1999", "live.jsonl", line(1))


def test_home_root_replaced_is_noticed_within_seconds(tree: Tree, start: StartFn) -> None:
    """Issue 10 defect 3: `mv /home /home.old` and the homes made again under a new /home
    (a restore, a migration). Before, the root's own IN_MOVE_SELF was dropped and the 5 s
    poll trusted watched homes by name: a new transcript had not landed after 60 s."""
    alice = tree.add_user("alice")
    svc = start()
    tree.write(alice, "before.jsonl", line(1))
    wait_stored(tree, alice, "before.jsonl", line(1))
    old_root = Path(str(tree.home_root) + ".old")
    tree.home_root.rename(old_root)
    tree.home_root.mkdir(mode=0o755)
    del tree.users["alice"]
    alice = tree.add_user("alice", alice.uid)
    svc.wait_log(f"watching '{alice.sessions}'", count=2, timeout=10.0)
    tree.write(alice, "after.jsonl", line(2))
    wait_stored(tree, alice, "after.jsonl", line(2), timeout=10.0)
    assert COPY_LINE.search(svc.wait_log("copied 'alice/after.jsonl'")[0])  # by its close
    assert "Traceback" not in svc.log()


def test_an_add_watchdog_lets_pass_with_eacces_is_a_failure(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    """watchdog 7.1 ignores EACCES from inotify_add_watch (root squashed on NFS) and files
    the callback under descriptor -1, where no event comes: that must count as failed."""
    alice = tree.add_user("alice")

    def denied(fd: int, path: bytes, mask: int) -> int:
        ctypes.set_errno(errno.EACCES)
        return -1

    calls = Calls()
    w = Watcher(tree.config(), calls.on_file, calls.on_change, calls.on_overflow)
    w.start()
    try:
        monkeypatch.setattr(inotify_c, "inotify_add_watch", denied)
        assert not w.add("alice", ident(alice.sessions))
        assert w.count() == 0
        monkeypatch.undo()
        assert w.add("alice", ident(alice.sessions))
    finally:
        w.stop()


def test_poll_notices_a_replaced_home_root_without_its_event(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The root's IN_MOVE_SELF can be lost (an overflow of its queue): the 5 s poll then
    sees a root of another (st_dev, st_ino) than the watched one, watches it and walks
    every home again instead of trusting the watched homes by name."""
    alice = tree.add_user("alice")
    svc = ServiceObject(tree.config(), environ={})
    svc.watcher.start()
    try:
        svc.watchset.rescan(full=True)
        assert svc.watcher.root_ident() == ident(tree.home_root)
        monkeypatch.setattr(svc.watcher._root_reader, "on_event", lambda event: None)
        tree.home_root.rename(str(tree.home_root) + ".old")
        tree.home_root.mkdir(mode=0o755)
        del tree.users["alice"]
        alice = tree.add_user("alice", alice.uid)
        svc.watchset.rescan(full=False)  # the poll
        assert svc.watcher.root_ident() == ident(tree.home_root)
        assert svc.watcher.users() == {"alice": ident(alice.sessions)}
    finally:
        svc.watcher.stop()


def test_a_home_root_that_cannot_be_watched_warns_once(
    tree: Tree, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Then every 5 s poll tries again (new homes are found by polling meanwhile), quietly,
    and without walking every home each time."""
    tree.add_user("alice")
    real_add = InotifyFD.add_callback
    root = os.fsencode(tree.home_root)

    def add_callback(self: InotifyFD, path: bytes, *args: Any) -> Any:
        if path == root:
            raise OSError(errno.ENOSPC, "inotify watch limit reached")
        return real_add(self, path, *args)

    monkeypatch.setattr(InotifyFD, "add_callback", add_callback)
    caplog.set_level(logging.INFO, logger="session_watcher")
    svc = ServiceObject(tree.config(), environ={})
    svc.watcher.start()
    try:
        svc.watchset.rescan(full=True)
        for _ in range(3):
            svc.watchset.rescan(full=False)
        assert svc.watcher.root_ident() is None and svc.watcher.count() == 1
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        monkeypatch.undo()
        svc.watchset.rescan(full=False)
        assert svc.watcher.root_ident() == ident(tree.home_root)
    finally:
        svc.watcher.stop()


def test_an_error_in_a_callback_is_logged_once_and_the_reader_reads_on(
    tree: Tree, caplog: pytest.LogCaptureFixture
) -> None:
    alice = tree.add_user("alice")
    calls = Calls()

    def broken(user: str, name: str, when: float | None, delay: float) -> None:
        calls.on_file(user, name, when, delay)
        raise ValueError("a bug")

    w = Watcher(tree.config(), broken, calls.on_change, calls.on_overflow)
    w.start()
    try:
        assert w.add("alice", ident(alice.sessions))
        for name in ("a.jsonl", "b.jsonl"):
            (alice.sessions / name).write_bytes(line(1))
        wait_for(lambda: calls.file("alice", "b.jsonl"), timeout=5.0)
        assert w.alive()
    finally:
        w.stop()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
