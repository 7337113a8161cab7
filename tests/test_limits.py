"""Per-user limits, in process and on synthetic time: log lines, the byte budget, the stuck
guard, the walker's coalescing, store quotas, hard links and other file systems."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import Tree, root_only, run_cli, wait_for

from session_watcher import Config
from session_watcher.copy import Outcome, Refusal, SourceDir, refusal, sync_file
from session_watcher.homes import Home, HomeRefused, open_sessions_dir
from session_watcher.live import LiveCopier, Wiring
from session_watcher.passes import OVERFLOW_SPACING, Walker, WalkerJobs
from session_watcher.ratelimit import ByteBudget, LogLimiter
from session_watcher.reconcile import reconcile
from session_watcher.store import Store, Usage, UserStore, lookup_gid, over_quota
from session_watcher.stuck import Retired, StuckGuard, UserStuck

LINE = b'{"type":"user","text":"hello"}\n'


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- log lines -------------------------------------------------------------------------------


def test_one_line_per_user_and_kind_then_a_summary_with_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    lim = LogLimiter(60.0, clock=clock)
    log = logging.getLogger("session_watcher.test")
    for _ in range(1000):
        lim.log(log, logging.WARNING, "mallory", "refused:symlink", "refused %s", "x")
    lim.log(log, logging.WARNING, "alice", "refused:symlink", "refused %s", "y")
    lim.log(log, logging.WARNING, "mallory", "refused:fifo", "refused %s", "z")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3  # one each: (mallory, symlink), (alice, symlink), (mallory, fifo)
    clock.t += 61
    lim.log(log, logging.WARNING, "mallory", "refused:symlink", "refused %s", "x")
    last = [r for r in caplog.records if r.levelno == logging.WARNING][-1]
    assert last.args is not None and 999 in tuple(last.args)  # the summary says how many
    assert lim.suppressed_total == 999


# --- the byte budget -------------------------------------------------------------------------


def test_byte_budget_never_holds_back_small_copies_and_paces_big_ones() -> None:
    clock = Clock()
    b = ByteBudget(rate=10e6, burst=20e6, small=1 << 20, clock=clock)
    assert all(b.admit("alice", 100_000) == 0.0 for _ in range(1000))  # 100 MB of small ones
    assert b.admit("mallory", 1_000_000_000) == 0.0  # the burst is there: goes, into debt
    wait = b.admit("mallory", 1_000_000_000)
    assert wait == pytest.approx(100.0)  # (20 MB owed past zero + 980 MB of debt) / 10 MB/s
    assert b.admit("mallory", 1000) == 0.0  # a small copy of the same user still goes
    assert b.admit("bob", 1_000_000_000) == 0.0  # nobody pays for another
    clock.t += wait + 0.1
    assert b.admit("mallory", 1_000_000_000) == 0.0


def test_copies_a_second_are_bounded_per_user_but_a_real_session_never_waits() -> None:
    clock = Clock()
    b = ByteBudget(rate=32e6, burst=512e6, copies=100, copies_burst=1000, clock=clock)
    for _ in range(600):  # a minute of a session flushing every 100 ms
        assert b.admit("alice", 300) == 0.0
        clock.t += 0.1
    assert all(b.admit("mallory", 10) == 0.0 for _ in range(1000))  # the burst
    assert b.admit("mallory", 10) == pytest.approx(0.01)  # then 100 a second
    assert b.admit("alice", 300) == 0.0  # nobody else waits
    # `spent`: every copy of mallory's would wait now (the queue rests them), not alice's.
    assert b.spent("mallory") and not b.spent("alice") and not b.spent("nobody")
    clock.t += 0.02
    assert not b.spent("mallory")


def test_live_admit_rests_the_user_on_spent_copies_never_for_one_big_copy(tree: Tree) -> None:
    """LiveCopier._admit: refused for the user's copies per second, the queue rests the user
    (their other keys are not opened only to be refused); a big copy refused on bytes alone
    waits by itself, and the user's small transcripts go on at once."""
    clock = Clock()
    cfg = tree.config(user_write_mb_s=1.0, user_copies_s=1.0)  # 16 MB and 10 copies of burst
    live = LiveCopier(
        cfg,
        Wiring(store=lambda: pytest.fail("no copy runs here"), count=lambda _result: None),
        StuckGuard(5.0, clock=clock),
        LogLimiter(clock=clock),
        clock=clock,
    )
    live.submit("mallory", "a.jsonl", None, 0.0)  # the user has a key waiting
    user = live.queue._users["mallory"]

    def resting() -> bool:
        return user.rest_until > clock()

    assert live._admit("mallory", 16_000_000) == 0.0  # the byte burst, charged
    assert live._admit("mallory", 8 << 20) > 0  # a big copy: bytes spent, copies not
    assert not resting()
    assert live._admit("mallory", 4096) == 0.0  # a small transcript still goes
    while live._admit("mallory", 4096) == 0.0:  # until the copies per second are spent
        pass
    assert resting()
    wait = user.rest_until - clock()
    assert 0 < wait <= 1.0  # one copy's worth at 1 a second
    clock.t += wait
    assert not resting() and live._admit("mallory", 4096) == 0.0


def test_byte_budget_zero_is_unlimited() -> None:
    b = ByteBudget(rate=0, burst=0)
    assert b.admit("x", 10**12) == 0.0


# --- the stuck guard ---------------------------------------------------------------------------


def test_stuck_guard_reports_once_skips_the_user_and_lets_them_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    back: list[str] = []
    g = StuckGuard(5.0, clock=clock, on_unstuck=back.append)
    entered, release = threading.Event(), threading.Event()

    def blocked_call() -> None:
        with g.io("mallory"):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=blocked_call)
    t.start()
    try:
        assert entered.wait(5)
        assert g.sweep() == []  # not yet past the bound
        clock.t += 5.0
        (found,) = g.sweep()
        assert found == ("mallory", t)
        assert g.sweep() == []  # reported once
        assert g.is_stuck("mallory") and g.stuck() == ["mallory"]
        assert g.blocked_threads() == [t]
        with pytest.raises(UserStuck), g.io("mallory"):
            pass
        with g.io("alice"):  # everyone else goes on
            pass
    finally:
        release.set()
        t.join(5)
    assert not g.is_stuck("mallory") and back == ["mallory"]
    stuck = [r for r in caplog.records if getattr(r, "reason", None) == "stuck"]
    assert len(stuck) == 1 and stuck[0].levelno == logging.WARNING


def test_a_replaced_thread_ends_when_its_stuck_call_returns() -> None:
    clock = Clock()
    g = StuckGuard(1.0, clock=clock)
    entered, release = threading.Event(), threading.Event()
    outcome: list[str] = []

    def walker_job() -> None:
        try:
            with g.io("mallory"):
                entered.set()
                release.wait(10)
            outcome.append("went on")  # must not: another thread has its work
        except Retired:
            outcome.append("retired")

    t = threading.Thread(target=walker_job)
    t.start()
    assert entered.wait(5)
    clock.t += 1.0
    ((_, thread),) = g.sweep()
    g.retire(thread)
    release.set()
    t.join(5)
    assert outcome == ["retired"]


# --- the walker: coalescing, overflow spacing -----------------------------------------------------


@pytest.fixture
def walker() -> Iterator[tuple[Walker, list[object], Clock]]:
    clock = Clock()
    calls: list[object] = []
    done = threading.Condition()

    def record(what: object) -> None:
        with done:
            calls.append(what)

    stop = threading.Event()
    w = Walker(
        WalkerJobs(
            run_pass=lambda users: record(("pass", users)),
            rescan=lambda full, users: record(("rescan", full)),
            retry_degraded=lambda: record("degraded"),
        ),
        stop,
        interval=0,
        clock=clock,
    )
    w.start()
    yield w, calls, clock
    stop.set()
    w.wake()
    assert w.join(5)


def test_walker_merges_pass_requests_and_a_full_pass_absorbs_users(
    walker: tuple[Walker, list[object], Clock],
) -> None:
    w, calls, _ = walker
    with w._cond:  # asked while the walker cannot take them: they coalesce
        w.request_pass({"a"})
        w.request_pass({"b"})
        w.request_rescan(full=False)
        w.request_rescan(full=True)
    wait_for(lambda: len(calls) >= 2, what="rescan and pass")
    assert calls[:2] == [("rescan", True), ("pass", {"a", "b"})]
    with w._cond:
        w.request_pass({"c"})
        w.request_pass(None)
    wait_for(lambda: len(calls) >= 3, what="full pass")
    assert calls[2] == ("pass", None)


def test_overflow_full_passes_are_spaced_but_never_lost(
    walker: tuple[Walker, list[object], Clock],
) -> None:
    w, calls, clock = walker
    w.request_pass(None, overflow=True)
    wait_for(lambda: calls == [("pass", None)], what="the first overflow pass at once")
    for _ in range(50):  # an event flood: 50 overflows in a row
        w.request_pass(None, overflow=True)
    with w._cond:  # the walker's own decision, under its lock: nothing to run yet
        assert w._take() is None
    assert calls == [("pass", None)]
    w.request_pass({"victim"})  # a pass over a few users is not held back by the spacing
    wait_for(lambda: len(calls) == 2, what="the users pass")
    assert calls[1] == ("pass", None)  # ... and the waiting full pass went with it
    w.request_pass(None, overflow=True)
    clock.t += OVERFLOW_SPACING
    w.wake()
    wait_for(lambda: len(calls) == 3, what="the spaced overflow pass")


# --- store quotas -------------------------------------------------------------------------------


def test_over_quota_is_a_pure_decision() -> None:
    cfg = Config(max_user_bytes=100, max_user_files=2)
    assert over_quota(Usage(50, 1), 40, True, cfg) is None
    assert over_quota(Usage(50, 2), 1, True, cfg) is not None  # a third file
    assert over_quota(Usage(90, 1), 20, False, cfg) is not None  # growing past the bytes
    assert over_quota(Usage(200, 5), -10, False, cfg) is None  # shrinking always goes
    assert over_quota(Usage(200, 5), 0, False, cfg) is None  # a rewrite of the same size


def sync_one(tree: Tree, config: Config, name: str) -> tuple[Outcome, str | None]:
    u = tree.user("alice")
    store = Store(config, lookup_gid(config.group))
    root = store.open_root(create=True)
    us = UserStore(store, root, "alice")
    src = os.open(u.sessions, os.O_RDONLY | os.O_DIRECTORY)
    try:
        r = sync_file(config, SourceDir("alice", u.uid, src), us, name, now=time.time())
        return r.outcome, r.kind
    finally:
        us.close()
        os.close(src)
        if root is not None:
            os.close(root)


def test_quota_refuses_new_files_and_growth_but_not_other_users(tree: Tree) -> None:
    tree.add_user("alice")
    tree.add_user("bob")
    for i in range(3):
        tree.write("alice", f"s{i}.jsonl", LINE)
    tree.write("bob", "b.jsonl", LINE * 2)
    config = tree.config(max_user_files=2, max_user_bytes=len(LINE) * 3, settle=0)
    stats = reconcile(config)
    assert (stats.files_copied, stats.files_refused) == (3, 1)  # alice's third file
    assert len(os.listdir(tree.target / "alice")) == 2
    assert (tree.target / "bob" / "b.jsonl").read_bytes() == LINE * 2  # bob: own limit
    # Growth past the byte limit is refused; a file already in the store stays as it was.
    first = sorted(os.listdir(tree.target / "alice"))[0]
    tree.write("alice", first, LINE * 3)
    assert sync_one(tree, config, first) == (Outcome.REFUSED, "quota")
    assert (tree.target / "alice" / first).read_bytes() == LINE


# --- hard links and other file systems ------------------------------------------------------


def test_hard_links_are_refused(tree: Tree) -> None:
    u = tree.add_user("alice")
    src = tree.write("alice", "a.jsonl", LINE)
    for i in range(30):
        os.link(src, u.sessions / f"link{i}.jsonl")
    stats = reconcile(tree.config())
    assert (stats.files_copied, stats.files_refused) == (0, 31)
    assert refusal(os.stat(src), u.uid, 1 << 30) == Refusal("hardlink", "a file with 31 hard links")


def test_a_file_on_another_device_than_the_home_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "x.jsonl"
    f.write_bytes(LINE)
    st = os.stat(f)
    assert refusal(st, st.st_uid, 1 << 30, st.st_dev) is None
    why = refusal(st, st.st_uid, 1 << 30, st.st_dev + 1)
    assert why is not None and why.kind == "mount"


@root_only
def test_a_sessions_directory_mounted_below_the_home_is_refused_unless_allowed(
    tree: Tree, tmpfs: Callable[[Path, str], Path]
) -> None:
    u = tree.add_user("alice")
    mnt = tmpfs(u.sessions, "1m")
    os.chown(mnt, u.uid, u.gid)
    tree.write("alice", "a.jsonl", LINE)
    root = os.open(tree.home_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(HomeRefused) as e:
            open_sessions_dir(root, Home("alice", u.uid), tree.config())
        assert e.value.kind == "mount"
        source = open_sessions_dir(root, Home("alice", u.uid), tree.config(cross_mounts=True))
        assert source is not None and source.dev is None
        os.close(source.fd)
    finally:
        os.close(root)
    assert reconcile(tree.config()).files_copied == 0
    assert reconcile(tree.config(cross_mounts=True)).files_copied == 1


def test_cross_mounts_flag_and_environment(tree: Tree) -> None:
    tree.add_user("alice")
    r = run_cli("reconcile", *tree.cli_args("--cross-mounts", "--json"))
    assert r.returncode == 0, r.stderr
    r = run_cli(
        "reconcile", *tree.cli_args("--json"), env={"SESSION_WATCHER_CROSS_MOUNTS": "maybe"}
    )
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1


def test_copy_lines_are_one_a_minute_per_user_at_info(
    tree: Tree, caplog: pytest.LogCaptureFixture
) -> None:
    # 200,000 files renamed into a home must not be 200,000 journal lines: per user, the
    # first copy in a minute is at INFO, the rest at DEBUG (counted in the next INFO one).
    caplog.set_level(logging.DEBUG, logger="session_watcher")
    for user in ("alice", "bob"):
        tree.add_user(user)
        for i in range(30):
            tree.write(user, f"s{i}.jsonl", LINE)
    assert reconcile(tree.config()).files_copied == 60
    copied = [r for r in caplog.records if r.getMessage().startswith("copied ")]
    assert len(copied) == 60
    infos = sorted(getattr(r, "user", "") for r in copied if r.levelno == logging.INFO)
    assert infos == ["alice", "bob"]


def test_concurrent_first_copies_measure_the_users_store_once_and_whole(tmp_path: Path) -> None:
    # A pass's copy threads share one descriptor of the user's store directory; listing it
    # from two threads at once (os.scandir reads through a dup, which shares the offset)
    # gave each part of it, and the user slipped past their file limit.
    user_dir = tmp_path / "store" / "alice"
    user_dir.mkdir(parents=True)
    for i in range(2000):
        (user_dir / f"s{i}.jsonl").write_bytes(LINE)
    config = Config(target=tmp_path / "store", max_user_files=10**6)
    for _ in range(5):
        store = Store(config, None)
        fd = os.open(user_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            start = threading.Barrier(8)

            def first_copy(
                store: Store = store, fd: int = fd, start: threading.Barrier = start
            ) -> None:
                start.wait()
                assert store.reserve("alice", fd, len(LINE), True) is None

            threads = [threading.Thread(target=first_copy) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            usage = store.usage("alice")
            assert usage is not None and usage.files == 2000 + 8
        finally:
            os.close(fd)
