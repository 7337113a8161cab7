"""Gaps in live watching that only a full pass used to close: a sessions directory
replaced in place (rmdir + mkdir reusing its inode, or renamed away and made again), a
change of mtime alone, and a dead inotify reader thread that WATCHDOG=1 must notice.

Real `session-watcher run` subprocesses (the `start` fixture of test_service.py, with no
periodic pass), so before these fixes the files below were never copied at all."""

from __future__ import annotations

from helpers import Tree, wait_for
from test_service import start

from session_watcher.service import Service as ServiceObject

__all__ = ["start"]  # the fixture, shared with test_service.py


def test_dead_inotify_reader_thread_is_unhealthy(tree: Tree) -> None:
    """watchdog's InotifyFD thread reads the kernel queue for every watch: if it ends,
    no event arrives any more, so WATCHDOG=1 must stop (Service._healthy uses alive())."""
    tree.add_user("alice")
    svc = ServiceObject(tree.config(), environ={})
    watcher = svc.watcher
    watcher.start()
    try:
        assert watcher.alive()
        reader = watcher._observer._inotify_fd
        reader.should_keep_running = lambda: False  # type: ignore[method-assign]
        (tree.home_root / "bob").mkdir()  # an event wakes the reader, which then ends
        wait_for(lambda: not reader.is_alive(), timeout=5.0, what="the reader to end")
        assert watcher._observer.is_alive()  # the dispatcher alone would look healthy
        assert not watcher.alive()
    finally:
        watcher.stop()
