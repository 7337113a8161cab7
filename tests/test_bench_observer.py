"""The benchmark's arrival observer (`bench/observer.py`): one copy is one arrival, whatever
inotify events the copier's way of writing produces."""

from __future__ import annotations

import os

from helpers import Tree

from bench.inotify import IN_CLOSE_WRITE, IN_MOVED_TO
from bench.measure import Observer
from bench.observer import Arrivals
from session_watcher import reconcile

LINE = b'{"seq":%d,"text":"hello"}\n'


def test_each_copy_is_one_arrival_whatever_events_it_makes(tree: Tree) -> None:
    """Issue 10, defect 6: session-watcher closes its temp file after the rename, so each
    of its copies showed as IN_MOVED_TO and then IN_CLOSE_WRITE of the final name, and the
    observer counted both: the bench's "copies" and "MB written" of session-watcher were
    about twice the truth. Real copies, real events, the observer as the bench runs it."""
    tree.add_user("alice")
    tree.write("alice", "sw.jsonl", LINE % 0)
    reconcile(tree.config())  # the store directory exists before the watch
    store = tree.target / "alice"
    observer = Observer([store])
    try:
        # Interleaved: the kernel merges an event identical to the one queued just before.
        for seq in (1, 2, 3):
            # session-watcher: temp file, rename, then the close
            tree.write("alice", "sw.jsonl", LINE % seq, append=True)
            assert reconcile(tree.config()).files_copied == 1
            # cp: written in place, one close
            with open(store / "cp.jsonl", "ab") as f:
                f.write(LINE % seq)
            # rsync: a dot temp file written and closed, then renamed into place
            (store / ".rs.jsonl.XyZ").write_bytes(LINE % seq)
            os.rename(store / ".rs.jsonl.XyZ", store / "rs.jsonl")
    finally:
        arrivals = observer.stop()
    counted = {name: 0 for name in ("sw.jsonl", "cp.jsonl", "rs.jsonl")}
    for a in arrivals:
        counted[a.key[1]] += 1
    assert counted == {"sw.jsonl": 3, "cp.jsonl": 3, "rs.jsonl": 3}


def test_arrivals_counting_rules() -> None:
    arrivals = Arrivals()
    events = [
        (1, IN_MOVED_TO, "a.jsonl"),  # a rename into place: an arrival
        (1, IN_CLOSE_WRITE, "a.jsonl"),  # its copier closing it: the same arrival
        (1, IN_CLOSE_WRITE, "a.jsonl"),  # a write in place afterwards: a new one
        (2, IN_MOVED_TO, "a.jsonl"),  # the same name in another directory
        (1, IN_CLOSE_WRITE, ".session-watcher.0123.tmp"),  # temp files never count
        (1, IN_MOVED_TO, "notes.txt"),  # nor other names
        (1, IN_MOVED_TO, "b.jsonl"),
        (1, IN_MOVED_TO, "b.jsonl"),  # rsync twice: two arrivals
        (2, IN_CLOSE_WRITE, "a.jsonl"),
    ]
    assert [arrivals.is_arrival(*e) for e in events] == [
        True,
        False,
        True,
        True,
        False,
        False,
        True,
        True,
        False,
    ]
