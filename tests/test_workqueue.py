"""The per-file coalescing queue: at most one run in flight and one pending per key, the
earliest trigger kept, spacing by what the handler asks (never by how long a run took),
fairness between users, bounded pending work per user, a failing handler that does not kill
a worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Iterator

import pytest
from helpers import wait_for

from session_watcher.workqueue import WorkQueue


class Recorder:
    """A handler that records its calls; `hold` makes calls for a key block until released."""

    def __init__(self) -> None:
        self.calls: list[tuple[Hashable, float | None, float, float]] = []
        self.lock = threading.Lock()
        self.held: dict[Hashable, threading.Event] = {}
        self.entered: dict[Hashable, threading.Event] = {}
        self.cost = 0.0
        self.again: float | None = None
        self.fail: set[Hashable] = set()

    def hold(self, key: Hashable) -> None:
        self.held[key] = threading.Event()
        self.entered[key] = threading.Event()

    def release(self, key: Hashable) -> None:
        self.held.pop(key).set()

    def __call__(self, key: Hashable, trigger: float | None) -> float | None:
        started = time.monotonic()
        if key in self.entered:
            self.entered[key].set()
        gate = self.held.get(key)
        if gate is not None:
            gate.wait(10)
        if self.cost:
            time.sleep(self.cost)  # the handler's own work, not a wait for a condition
        with self.lock:
            self.calls.append((key, trigger, started, time.monotonic()))
        if key in self.fail:
            raise RuntimeError(f"boom {key}")
        again, self.again = self.again, None
        return again

    def count(self, key: Hashable) -> int:
        with self.lock:
            return sum(1 for c in self.calls if c[0] == key)


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def queue(rec: Recorder) -> Iterator[WorkQueue]:
    q = WorkQueue(rec, workers=2, min_gap=0.0)
    q.start()
    yield q
    for gate in rec.held.values():
        gate.set()
    assert q.stop(5.0)


def test_one_run_per_submit_when_idle(queue: WorkQueue, rec: Recorder) -> None:
    queue.submit("a", trigger=1.0)
    wait_for(lambda: rec.count("a") == 1, what="a handled")
    assert rec.calls[0][:2] == ("a", 1.0)
    wait_for(queue.idle, what="queue idle")


def test_burst_while_running_coalesces_into_one_more_run(queue: WorkQueue, rec: Recorder) -> None:
    rec.hold("a")
    queue.submit("a", trigger=1.0)
    assert rec.entered["a"].wait(5)
    for i in range(1000):
        queue.submit("a", trigger=10.0 + i)
    rec.release("a")
    wait_for(queue.idle, what="queue idle")
    assert rec.count("a") == 2
    assert rec.calls[1][1] == 10.0  # the earliest trigger of the burst


def test_earliest_trigger_is_kept(queue: WorkQueue, rec: Recorder) -> None:
    rec.hold("a")
    queue.submit("a")
    assert rec.entered["a"].wait(5)
    for trigger in (5.0, 3.0, 7.0, None):
        queue.submit("a", trigger=trigger)
    rec.release("a")
    wait_for(lambda: rec.count("a") == 2, what="second run")
    assert rec.calls[1][1] == 3.0


def test_keys_run_in_parallel(queue: WorkQueue, rec: Recorder) -> None:
    rec.hold("a")
    rec.hold("b")
    queue.submit("a")
    queue.submit("b")
    assert rec.entered["a"].wait(5) and rec.entered["b"].wait(5)  # both in flight at once
    rec.release("a")
    rec.release("b")
    wait_for(queue.idle, what="queue idle")


def test_delay_is_honoured_and_an_earlier_submit_supersedes_it(
    queue: WorkQueue, rec: Recorder
) -> None:
    t0 = time.monotonic()
    queue.submit("late", delay=0.3)
    wait_for(lambda: rec.count("late") == 1, what="delayed run")
    assert rec.calls[0][2] - t0 >= 0.29
    queue.submit("x", delay=30.0)
    queue.submit("x", trigger=2.0)  # a close after a deferred create: runs now
    wait_for(lambda: rec.count("x") == 1, what="superseding run")
    wait_for(queue.idle, what="nothing left pending (the 30 s request was absorbed)")
    assert rec.count("x") == 1


def test_handler_asks_to_run_again(queue: WorkQueue, rec: Recorder) -> None:
    rec.again = 0.05  # a held-back tail: look again later
    queue.submit("a")
    wait_for(lambda: rec.count("a") == 2, what="rerun after the delay the handler asked for")
    first_end, second_start = rec.calls[0][3], rec.calls[1][2]
    assert second_start - first_end >= 0.04


def test_a_slow_run_does_not_space_out_the_next_one(rec: Recorder) -> None:
    # One slow fsync (here: a 0.3 s run) must not hold back the file's next small copy.
    q = WorkQueue(rec, workers=1, min_gap=0.0)
    q.start()
    try:
        rec.cost = 0.3
        q.submit("hot")
        wait_for(lambda: rec.count("hot") == 1, what="first run")
        rec.cost = 0.0
        q.submit("hot")
        wait_for(lambda: rec.count("hot") == 2, what="second run")
        first, second = [c for c in rec.calls if c[0] == "hot"]
        assert second[2] - first[3] < 0.2
    finally:
        assert q.stop(5.0)


def test_users_are_served_round_robin_one_job_each(rec: Recorder) -> None:
    # 300 files of one user queued first; another user's file still runs within a few jobs.
    q = WorkQueue(rec, workers=1, min_gap=0.0)
    for i in range(300):
        q.submit(("flood", f"f{i}"))
    q.submit(("victim", "v"))
    q.start()
    try:
        wait_for(lambda: rec.count(("victim", "v")) == 1, what="the victim's job")
        order = [c[0] for c in rec.calls]
        assert order.index(("victim", "v")) <= 2
        wait_for(q.idle, what="queue idle")
        assert len(rec.calls) == 301
    finally:
        assert q.stop(5.0)


def test_one_running_job_per_user(rec: Recorder) -> None:
    # A user whose file system blocks holds one worker, not all of them.
    q = WorkQueue(rec, workers=3, min_gap=0.0)
    q.start()
    try:
        rec.hold(("stuck", "a"))
        q.submit(("stuck", "a"))
        assert rec.entered[("stuck", "a")].wait(5)
        q.submit(("stuck", "b"))
        q.submit(("other", "c"))
        wait_for(lambda: rec.count(("other", "c")) == 1, what="the other user's job")
        assert rec.count(("stuck", "b")) == 0
        rec.release(("stuck", "a"))
        wait_for(lambda: rec.count(("stuck", "b")) == 1, what="the stuck user's next job")
    finally:
        assert q.stop(5.0)


def test_pending_work_is_bounded_per_user_and_a_pass_asked_for_once_it_drains(
    rec: Recorder,
) -> None:
    """Past the bound keys are shed (memory follows the bound, not the 1,000 events), and
    the pass that picks them up is asked for once the user's pending keys are taken: not
    at each shed key (a pass storm for as long as the burst lasts), not at the first (it
    may list the directory before the last key exists)."""
    shed: list[Hashable] = []
    q = WorkQueue(rec, workers=1, min_gap=0.0, max_pending_per_user=10, on_shed=shed.append)
    taken = [q.submit(("flood", f"f{i}")) for i in range(1000)]
    assert taken == [True] * 10 + [False] * 990
    assert q.submit(("victim", "v"))
    assert q.pending("flood") == 10 and q.pending("victim") == 1
    assert len(q) == 11
    assert shed == []  # not while the queue is full
    q.start()
    try:
        wait_for(lambda: shed == ["flood"], what="the pass asked for once the queue drained")
        assert sum(rec.count(("flood", f"f{i}")) for i in range(1000)) == 10
        wait_for(q.idle, what="idle")
        assert shed == ["flood"]  # once per episode
        assert q.submit(("flood", "later"))  # room again
    finally:
        assert q.stop(5.0)


def test_extra_workers_replace_stuck_ones_and_go_again(rec: Recorder) -> None:
    q = WorkQueue(rec, workers=1, min_gap=0.0)
    q.start()
    try:
        rec.hold(("stuck", "a"))
        q.submit(("stuck", "a"))
        assert rec.entered[("stuck", "a")].wait(5)
        q.set_extra(1)
        q.submit(("other", "b"))
        wait_for(lambda: rec.count(("other", "b")) == 1, what="served by the extra worker")
        q.set_extra(0)
        rec.release(("stuck", "a"))
        wait_for(lambda: sum(t.is_alive() for t in q._threads) == 1, what="the surplus ends")
    finally:
        assert q.stop(5.0)


def test_a_failing_handler_does_not_kill_the_worker(
    queue: WorkQueue, rec: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    rec.fail.add("bad")
    queue.submit("bad")
    wait_for(lambda: rec.count("bad") == 1, what="bad handled")
    for key in ("ok1", "ok2", "ok3"):
        queue.submit(key)
    wait_for(lambda: all(rec.count(k) == 1 for k in ("ok1", "ok2", "ok3")), what="later keys")
    assert queue.alive()
    assert any("unexpected error handling 'bad'" in r.getMessage() for r in caplog.records)


def test_stop_drops_pending_work_and_refuses_new(rec: Recorder) -> None:
    q = WorkQueue(rec, workers=1, min_gap=0.0)
    q.start()
    rec.hold("a")
    q.submit("a")
    assert rec.entered["a"].wait(5)
    q.submit("a")  # pending behind the running one
    q.submit("b", delay=60.0)
    stopper = threading.Thread(target=q.stop, args=(5.0,))
    stopper.start()
    rec.release("a")  # the running job finishes ...
    stopper.join(10)
    assert not stopper.is_alive() and not q.alive()
    assert rec.count("a") == 1 and rec.count("b") == 0  # ... the pending ones are dropped
    q.submit("c")
    assert rec.count("c") == 0 and q.stop(1.0)


def test_stop_reports_a_job_that_outlives_the_timeout(rec: Recorder) -> None:
    q = WorkQueue(rec, workers=1, min_gap=0.0)
    q.start()
    rec.hold("slow")
    q.submit("slow")
    assert rec.entered["slow"].wait(5)
    assert q.stop(0.05) is False
    rec.release("slow")
    assert q.stop(5.0) is True


def test_prune_forgets_idle_keys_only(rec: Recorder) -> None:
    now = [100.0]
    q = WorkQueue(rec, workers=1, min_gap=0.0, clock=lambda: now[0])
    q.start()
    try:
        q.submit("old")
        wait_for(lambda: rec.count("old") == 1, what="old handled")
        wait_for(q.idle, what="queue idle")
        rec.hold("busy")
        q.submit("busy")
        assert rec.entered["busy"].wait(5)
        now[0] += 120.0
        q.prune(older_than=60.0)
        assert len(q) == 1  # "busy" is running: kept
        rec.release("busy")
        wait_for(q.idle, what="queue idle")
    finally:
        assert q.stop(5.0)


def test_gap_is_the_larger_of_min_gap_and_the_handlers_pace(rec: Recorder) -> None:
    clock = [100.0]
    q = WorkQueue(rec, workers=1, min_gap=0.05, clock=lambda: clock[0])
    q.start()
    try:
        q.submit("k")
        wait_for(lambda: rec.count("k") == 1, what="first run")
        wait_for(q.idle, what="idle")
        q.pace("k", 0.5)
        q.submit("k")
        clock[0] += 0.4
        q.submit("other")  # wakes the worker: "k" is not due yet
        wait_for(lambda: rec.count("other") == 1, what="other")
        assert rec.count("k") == 1
        clock[0] += 0.2
        q.submit("other2")
        wait_for(lambda: rec.count("k") == 2, what="k after its pace")
    finally:
        assert q.stop(5.0)


def test_a_resting_user_is_not_served_until_the_rest_is_over(rec: Recorder) -> None:
    # A user whose copy budget is spent rests: their other due keys are not taken (each
    # would be opened only to be refused), and the other users' keys go on.
    clock = [100.0]
    q: WorkQueue

    def handler(key: Hashable, trigger: float | None) -> float | None:
        if key == ("a", "1"):
            q.rest("a", 0.5)
        return rec(key, trigger)

    q = WorkQueue(handler, workers=1, min_gap=0.0, clock=lambda: clock[0])
    q.start()
    try:
        q.submit(("a", "1"))
        wait_for(lambda: rec.count(("a", "1")) == 1, what="a/1")
        q.submit(("a", "2"))
        q.submit(("b", "1"))
        wait_for(lambda: rec.count(("b", "1")) == 1, what="b/1 while a rests")
        assert rec.count(("a", "2")) == 0
        assert q.pending("a") == 1
        clock[0] += 0.6
        q.submit(("b", "2"))  # wakes the worker: a's rest is over
        wait_for(lambda: rec.count(("a", "2")) == 1, what="a/2 after the rest")
        wait_for(q.idle, what="idle")
    finally:
        assert q.stop(5.0)


def test_owe_stops_a_caller_at_the_bound_and_the_pass_follows_the_drain(rec: Recorder) -> None:
    # A pass handing on held-back files: accepted up to the bound; `owe` then tells it to
    # stop and makes the queue owe the rest a pass, even though no key was shed.
    shed: list[Hashable] = []
    q = WorkQueue(rec, workers=1, min_gap=0.0, max_pending_per_user=3, on_shed=shed.append)
    assert not q.owe("flood")  # nothing queued: go on
    assert all(q.submit(("flood", f"f{i}")) for i in range(3))
    assert q.owe("flood")
    assert not q.submit(("flood", "new"))  # owed: shed until the pending ones are taken
    assert not q.owe("other")
    q.start()
    try:
        wait_for(lambda: shed == ["flood"], what="the owed pass")
        wait_for(q.idle, what="idle")
        assert rec.count(("flood", "new")) == 0
        assert q.submit(("flood", "new"))  # room again
        wait_for(lambda: rec.count(("flood", "new")) == 1, what="served after the drain")
    finally:
        assert q.stop(5.0)
