"""Regression tests for the review findings on the service's robustness: a user-set
far-future delay cannot kill the workers, failed copies are retried by how long they have
been failing (not how many events hit them), a pass stops between files, and an expected
error in the control loop or a pass is one line, never a traceback or an exit."""

from __future__ import annotations

import threading
from collections.abc import Hashable

import pytest
from harness import line
from helpers import Tree, run_cli, wait_for

from session_watcher.copy import Result, SourceDir
from session_watcher.live import RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS, retry_delay
from session_watcher.reconcile import reconcile
from session_watcher.workqueue import WorkQueue


def test_far_future_delay_does_not_kill_the_workers() -> None:
    done: list[Hashable] = []
    ran = threading.Event()

    def handler(key: Hashable, trigger: float | None) -> float | None:
        done.append(key)
        ran.set()
        return 1e12 if key == "future" else None  # "look again in 30,000 years"

    q = WorkQueue(handler, workers=2)
    q.start()
    try:
        q.submit("future")
        q.submit("later", delay=1e15)  # Condition.wait would raise OverflowError on this
        assert ran.wait(5)
        q.submit("normal")
        wait_for(lambda: "normal" in done, timeout=5, what="a later key to run")
        assert q.alive()
        assert "later" not in done
    finally:
        assert q.stop(5)


@pytest.mark.parametrize(
    ("failing_for", "expected"),
    [(0.0, RETRY_FIRST_SECONDS), (1.2, RETRY_FIRST_SECONDS), (5.0, 5.0), (1e6, RETRY_MAX_SECONDS)],
)
def test_retry_delay_grows_with_time_failing_not_with_events(
    failing_for: float, expected: float
) -> None:
    # Twelve failed copies from closes within 1.2 s of a full store still retry after 2 s.
    assert retry_delay(failing_for) == expected


@pytest.mark.parametrize("workers", [1, 4])
def test_a_pass_stops_between_files(tree: Tree, workers: int) -> None:
    alice = tree.add_user("alice")
    for i in range(40):
        tree.write_fast(alice, f"s{i}.jsonl", line(i))
    stop = threading.Event()
    seen: list[str] = []

    def on_result(source: SourceDir, name: str, result: Result) -> None:
        seen.append(name)
        stop.set()  # as SIGTERM would, in the middle of a big home

    stats = reconcile(tree.config(workers=workers), on_result=on_result, stop=stop)
    # At most the copies already running when the stop came (one per copy thread).
    assert 1 <= len(seen) <= workers
    assert stats.files_copied == len(seen)


@pytest.mark.parametrize("value", ["1e10", "-1", "inf"])
@pytest.mark.parametrize("flag", ["--settle", "--reconcile-interval"])
def test_absurd_intervals_are_usage_errors(tree: Tree, flag: str, value: str) -> None:
    r = run_cli("run", *tree.cli_args(f"{flag}={value}"))
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1, r.stderr
