"""`session-watcher run` as a real process on a real tree: events, coalescing, overflow,
signals, sd_notify, hostile files. Every wait has a deadline; nothing sleeps then asserts.

Writers run as the users' uids (setpriv) when the tests run as root. Latencies are never
asserted (these machines have two shared cores): waits only have deadlines. The one
budget asserted is a ratio, CPU seconds per wall second of a hot file's copies, with a
2x margin over what spacing gives.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from harness import (
    COPY_LINE,
    START_TIMEOUT,
    NotifySocket,
    StartFn,
    append_as,
    line,
    stored_bytes,
    temp_files,
    wait_stored,
)
from helpers import TEST_GID, Tree, run_as, run_cli, wait_for, write_as

from session_watcher.service import Service as ServiceObject

# --- copies triggered by events ---------------------------------------------------------------


def test_close_copies_file_with_latency_logged(tree: Tree, start: StartFn) -> None:
    alice = tree.add_user("alice")
    svc = start()
    data = line(1) + line(2)
    tree.write(alice, "a.jsonl", data)
    wait_stored(tree, alice, "a.jsonl", data)
    got = svc.wait_log("copied 'alice/a.jsonl'")
    m = COPY_LINE.search(got[0])
    assert m is not None, got
    assert m.group(1) == "alice/a.jsonl" and int(m.group(2)) == len(data)
    # The modes the service really produces (group-readable file, setgid directory).
    st = tree.stored(alice, "a.jsonl").stat()
    assert (st.st_mode & 0o7777, st.st_gid) == (0o640, TEST_GID)
    dst = tree.stored(alice, "a.jsonl").parent.stat()
    assert (dst.st_mode & 0o7777, dst.st_gid) == (0o2770, TEST_GID)


def test_rename_into_place(tree: Tree, start: StartFn) -> None:
    alice = tree.add_user("alice")
    svc = start()
    data = line(7) * 3
    tmp = tree.write(alice, ".s.jsonl.XyZ12", data)  # rsync's temp name: not *.jsonl
    run_as(alice.uid, alice.gid, ["mv", str(tmp), str(alice.sessions / "s.jsonl")])
    wait_stored(tree, alice, "s.jsonl", data)
    svc.wait_log("copied 'alice/s.jsonl'")  # logged just after the rename into the store
    assert sorted(p.name for p in tree.stored(alice, "s.jsonl").parent.iterdir()) == ["s.jsonl"]


def test_file_moved_in_from_another_directory(tree: Tree, start: StartFn) -> None:
    alice = tree.add_user("alice")
    drafts = alice.home / "user" / "drafts"
    run_as(alice.uid, alice.gid, ["mkdir", str(drafts)])
    data = line(3)
    write_as(alice.uid, alice.gid, drafts / "m.jsonl", data)
    write_as(alice.uid, alice.gid, drafts / "empty.jsonl", b"")
    svc = start()
    # Only IN_MOVED_TO reaches the sessions watch (watchdog: FileCreatedEvent, no close).
    run_as(alice.uid, alice.gid, ["mv", str(drafts / "m.jsonl"), str(alice.sessions)])
    run_as(alice.uid, alice.gid, ["mv", str(drafts / "empty.jsonl"), str(alice.sessions)])
    wait_stored(tree, alice, "m.jsonl", data)
    assert COPY_LINE.search(svc.wait_log("copied 'alice/m.jsonl'")[0])
    wait_stored(tree, alice, "empty.jsonl", b"")  # no close follows: lands all the same


def test_burst_of_closes_coalesces_and_final_content_lands(tree: Tree, start: StartFn) -> None:
    alice = tree.add_user("alice")
    svc = start()
    path = alice.sessions / "burst.jsonl"
    gained = append_as(alice, [path], 1000)
    wait_stored(tree, alice, "burst.jsonl", gained[path])
    svc.wait_log("copied 'alice/burst.jsonl'")
    copies = svc.copies("alice", "burst.jsonl")
    assert 1 <= len(copies) <= 100, f"{len(copies)} copies for 1,000 closes"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads included."""
    fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


def test_hot_large_transcript_copies_are_spaced(tree: Tree, start: StartFn) -> None:
    alice = tree.add_user("alice")
    path = tree.write_fast(alice, "hot.jsonl", line(0, pad=20_000) * 1000)  # ~20 MB
    base = path.read_bytes()
    assert len(base) > 20_000_000
    svc = start()
    wait_stored(tree, alice, "hot.jsonl", base)
    flushes = 30
    cpu0, wall0 = cpu_seconds(svc.proc.pid), time.monotonic()
    gained = append_as(alice, [path], flushes, pad=2000, every=0.1)  # ~3 s, like Claude Code
    wait_stored(tree, alice, "hot.jsonl", base + gained[path])
    cpu, wall = cpu_seconds(svc.proc.pid) - cpu0, time.monotonic() - wall0
    svc.wait_log("ms after the event)")
    live = [m for m in map(COPY_LINE.search, svc.copies("alice", "hot.jsonl")) if m]
    # Never more than one copy per close (the initial pass's copy has no "ms after").
    assert 1 <= len(live) <= flushes, f"{len(live)} event copies for {flushes} closes"
    # Spacing keeps one hot file's copies to about a quarter of a core (2x margin here).
    assert cpu <= 0.5 * wall, f"{cpu:.2f} s CPU in {wall:.2f} s for {len(live)} copies"


def test_new_home_after_start_is_watched_and_copied(tree: Tree, start: StartFn) -> None:
    tree.add_user("alice")
    svc = start()
    # As `useradd -m` then an admin would: created by root, handed over afterwards.
    bob = tree.add_user("bob")
    data = line(5)
    tree.write(bob, "early.jsonl", data)
    wait_stored(tree, bob, "early.jsonl", data, timeout=10.0)
    svc.wait_log(f"watching '{bob.sessions}'")
    later = line(6)
    tree.write(bob, "later.jsonl", later)  # now by the live watch
    wait_stored(tree, bob, "later.jsonl", later)
    assert COPY_LINE.search(svc.wait_log("copied 'bob/later.jsonl'")[0])


def test_late_sessions_directory_is_watched_and_copied(tree: Tree, start: StartFn) -> None:
    carol = tree.add_user("carol", sessions_dir=False)
    svc = start()
    # Nested below the home: no home-root event, so the periodic rescan (5 s) finds it.
    run_as(carol.uid, carol.gid, ["mkdir", "-p", "-m", "700", str(carol.sessions)])
    tree.write(carol, "first.jsonl", line(1))
    wait_stored(tree, carol, "first.jsonl", line(1), timeout=10.0)
    svc.wait_log(f"watching '{carol.sessions}'")


def test_sessions_dir_deleted_and_recreated(tree: Tree, start: StartFn) -> None:
    alice = tree.add_user("alice")
    svc = start()
    tree.write(alice, "one.jsonl", line(1))
    wait_stored(tree, alice, "one.jsonl", line(1))
    shutil.rmtree(alice.sessions)
    svc.wait_log("sessions directory of 'alice' went or changed")
    run_as(alice.uid, alice.gid, ["mkdir", "-m", "700", str(alice.sessions)])
    tree.write(alice, "two.jsonl", line(2))
    wait_stored(tree, alice, "two.jsonl", line(2), timeout=10.0)
    svc.wait_log(f"watching '{alice.sessions}'", count=2)
    tree.write(alice, "three.jsonl", line(3))
    wait_stored(tree, alice, "three.jsonl", line(3))
    assert stored_bytes(tree.stored(alice, "one.jsonl")) == line(1)  # the store is an archive


@pytest.mark.parametrize("level", ["INFO", "ERROR"])
def test_kernel_queue_overflow_is_detected_and_repaired(
    tree: Tree, start: StartFn, level: str
) -> None:
    """The overflow is detected whatever the log level. Files written once the queue is
    full have no event at all: only the full pass the overflow starts can copy them."""
    alice = tree.add_user("alice")
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    events = max(30_000, limit + limit // 2)
    files = [alice.sessions / f"f{i:02d}.jsonl" for i in range(50)]
    svc = start("--log-level", level, ready=False)
    if level == "INFO":
        svc.wait_log("ready: watching", timeout=START_TIMEOUT)
    else:  # no INFO lines: the initial pass copies this file before the watches are ready
        tree.write(alice, "probe.jsonl", line(0))
        wait_stored(tree, alice, "probe.jsonl", line(0), timeout=START_TIMEOUT)
    svc.send(signal.SIGSTOP)
    try:
        # Round-robin: the kernel merges an event identical to the one queued just before.
        gained = append_as(alice, files, events, pad=10)
        late = [alice.sessions / f"late{i}.jsonl" for i in range(10)]
        gained.update(append_as(alice, late, len(late)))  # queue full: events dropped
    finally:
        svc.send(signal.SIGCONT)
    for path in [*late, *files]:
        wait_stored(tree, alice, path.name, gained[path], timeout=10.0)
    if level == "INFO":
        svc.wait_log("inotify queue overflowed")
    else:  # detected, but the operator asked for errors only
        assert "overflowed" not in svc.log()


# --- signals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_exits_0_without_temp_files(
    tree: Tree, start: StartFn, sig: signal.Signals
) -> None:
    alice = tree.add_user("alice")
    svc = start()
    for i in range(3):  # big enough that a copy is likely in flight at the signal
        tree.write(alice, f"big{i}.jsonl", line(i, pad=4000) * 1000)  # as alice: hers
    svc.wait_log("copied 'alice/big0.jsonl'")
    assert svc.stop(sig) == 0
    assert svc.lines("session_watcher.service: stopped")
    assert temp_files(tree.target) == []


def test_sighup_runs_a_full_pass(tree: Tree, start: StartFn) -> None:
    alice = tree.add_user("alice")
    tree.write(alice, "held.jsonl", line(1))
    svc = start()
    wait_stored(tree, alice, "held.jsonl", line(1))
    # A writer that has not closed yet: no IN_CLOSE_WRITE, so only a pass can see it.
    fd = os.open(tree.source(alice, "held.jsonl"), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, line(2))
        passes = len(svc.lines("pass done"))
        assert stored_bytes(tree.stored(alice, "held.jsonl")) == line(1)
        svc.send(signal.SIGHUP)
        svc.wait_log("SIGHUP: starting a full pass")
        svc.wait_log("pass done", count=passes + 1)
        wait_stored(tree, alice, "held.jsonl", line(1) + line(2))
    finally:
        os.close(fd)
    assert svc.proc.poll() is None  # SIGHUP does not stop it


def test_signal_handler_takes_no_lock(tree: Tree) -> None:
    """A handler runs between two bytecodes of the main thread, which may hold the
    service's lock (or be inside the handler already): it must only record the signal."""
    svc = ServiceObject(tree.config(), environ={})
    svc.watcher.start()  # watchdog's inotify thread exists from construction on
    try:

        def signals_while_locked() -> None:
            with svc.walker._cond, svc.reporter._lock:
                svc._signal(signal.SIGHUP, None)
                svc._signal(signal.SIGTERM, None)

        t = threading.Thread(target=signals_while_locked, daemon=True)
        t.start()
        t.join(5.0)
        assert not t.is_alive(), "the signal handler blocked on the service's lock"
        assert svc._stop.is_set()  # seen at once, e.g. by the initial pass
        svc._take_signals()  # what the control loop does next
        assert svc.walker._pass_asked and svc.walker._pass_users is None
    finally:
        svc.watcher.stop()


# --- sd_notify ----------------------------------------------------------------------------------


def test_notify_ready_watchdog_stopping(
    tree: Tree, start: StartFn, notify_path: NotifySocket
) -> None:
    alice = tree.add_user("alice")
    tree.write(alice, "before.jsonl", line(1))
    env = {"NOTIFY_SOCKET": notify_path.address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": ""}
    svc = start(env=env, ready=False)
    notify_path.wait("READY=1", timeout=START_TIMEOUT)
    # READY=1 comes after the initial pass: what was there at start is in the store.
    assert stored_bytes(tree.stored(alice, "before.jsonl")) == line(1)
    notify_path.wait("WATCHDOG=1", count=3)  # every 100 ms
    notify_path.wait("STATUS=watching 1 users")
    assert svc.stop() == 0
    msgs = notify_path.wait("STOPPING=1")
    assert msgs.index("READY=1") < msgs.index("STOPPING=1")


def test_no_ready_when_sigterm_came_during_the_first_pass(
    tree: Tree, start: StartFn, notify_path: NotifySocket
) -> None:
    # Review defect 7: READY=1 then STOPPING=1 told systemd a service was up that was
    # already on its way down.
    alice = tree.add_user("alice")
    for i in range(3000):
        tree.write_fast(alice, f"s{i}.jsonl", line(i))
    env = {"NOTIFY_SOCKET": notify_path.address, "WATCHDOG_USEC": ""}
    svc = start("--workers", "1", env=env, ready=False)
    svc.wait_log("copied '", timeout=START_TIMEOUT)  # the first pass is under way
    assert svc.stop() == 0
    msgs = notify_path.wait("STOPPING=1")
    assert "READY=1" not in msgs
    assert "ready: watching" not in svc.log()


def test_notify_abstract_socket_address(tree: Tree, start: StartFn) -> None:
    tree.add_user("alice")
    ns = NotifySocket(f"@sw-test-{uuid.uuid4().hex}")
    try:
        svc = start(env={"NOTIFY_SOCKET": ns.address, "WATCHDOG_USEC": ""}, ready=False)
        ns.wait("READY=1", timeout=START_TIMEOUT)
        assert svc.stop() == 0
        ns.wait("STOPPING=1")
        # No WATCHDOG_USEC: no pings.
        assert "WATCHDOG=1" not in ns.lines()
    finally:
        ns.close()


# --- hostile input and failures -------------------------------------------------------------------


def test_hostile_files_created_live_are_refused(tree: Tree, start: StartFn) -> None:
    alice = tree.add_user("alice")
    secret = tree.base / "secret"
    secret.write_bytes(b"TOP SECRET\n")
    secret.chmod(0o600)
    svc = start()
    run_as(alice.uid, alice.gid, ["ln", "-s", str(secret), str(alice.sessions / "evil.jsonl")])
    run_as(alice.uid, alice.gid, ["mkfifo", str(alice.sessions / "f.jsonl")])
    svc.wait_log("refused 'alice/evil.jsonl': a symlink")
    svc.wait_log("refused 'alice/f.jsonl': a FIFO")
    assert all(line_.split()[2] == "WARNING" for line_ in svc.lines("refused 'alice/"))
    tree.write(alice, "good.jsonl", line(9))  # still serving
    wait_stored(tree, alice, "good.jsonl", line(9))
    store_dir = tree.stored(alice, "good.jsonl").parent
    assert sorted(p.name for p in store_dir.iterdir()) == ["good.jsonl"]
    for p in tree.target.rglob("*"):
        assert p.is_dir() or b"TOP SECRET" not in p.read_bytes()


def test_copy_error_does_not_stop_later_copies(tree: Tree, start: StartFn) -> None:
    alice = tree.add_user("alice")
    svc = start()
    tree.write(alice, "a.jsonl", line(1))
    wait_stored(tree, alice, "a.jsonl", line(1))
    # Plant a symlink in place of the store's user directory: every copy now fails.
    user_dir = tree.stored(alice, "a.jsonl").parent
    decoy = tree.base / "decoy"
    decoy.mkdir()
    shutil.rmtree(user_dir)
    user_dir.symlink_to(decoy)
    tree.write(alice, "b.jsonl", line(2))
    failed = svc.wait_log("failed 'alice/b.jsonl'")
    assert " ERROR " in failed[0]
    assert list(decoy.iterdir()) == []  # never followed
    user_dir.unlink()
    tree.write(alice, "c.jsonl", line(3))
    wait_stored(tree, alice, "c.jsonl", line(3))
    tree.write(alice, "b.jsonl", line(4), append=True)
    wait_stored(tree, alice, "b.jsonl", line(2) + line(4))
    assert list(decoy.iterdir()) == []


def test_missing_home_root_exits_2_with_one_line(tree: Tree) -> None:
    missing = tree.base / "nope"
    r = run_cli("run", "--home-root", str(missing), "--target", str(tree.target))
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and str(missing) in r.stderr, r.stderr
    assert not tree.target.exists()


def test_home_root_gone_during_the_service_is_one_line_and_it_recovers(
    tree: Tree, start: StartFn
) -> None:
    alice = tree.add_user("alice")
    svc = start("--reconcile-interval", "0")
    aside = Path(str(tree.home_root) + ".aside")
    tree.home_root.rename(aside)
    try:
        svc.send(signal.SIGHUP)  # a full pass with the home root gone
        failed = svc.wait_log("pass failed: ")
        assert " ERROR " in failed[0]
        svc.wait_log("rescan failed")  # the walker's 5 s poll, still alive
    finally:
        aside.rename(tree.home_root)
    assert "Traceback" not in svc.log()
    # Still serving: a new transcript lands (the rescan re-watches the home).
    svc.send(signal.SIGHUP)
    tree.write(alice, "after.jsonl", line(1))
    wait_stored(tree, alice, "after.jsonl", line(1), timeout=15)
    assert svc.stop() == 0


# --- issue 10 -------------------------------------------------------------------------------


def test_temp_file_of_a_copy_killed_mid_way_is_gone_within_seconds_of_the_restart(
    tree: Tree, start: StartFn
) -> None:
    """Issue 10, defect 2: `kill -9` during a big copy and a restart left the dead copy's
    temp file (505 MB in the review) in the store until the next periodic pass: the
    restart's own pass kept any unlocked temp file under 10 s old, longer than the unit's
    RestartSec=5s. A temp file with data that nobody holds a lock on is now a dead
    process's, whatever its age."""
    alice = tree.add_user("alice")
    data = line(0, pad=1 << 20) * 128  # 128 MB: its copy and fsync take a while
    staged = alice.home / "big.staged"  # outside the sessions directory: no event yet
    staged.write_bytes(data)
    os.chown(staged, alice.uid, alice.gid)
    svc = start()
    os.rename(staged, alice.sessions / "big.jsonl")  # IN_MOVED_TO: the copy starts

    def mid_copy() -> list[Path]:
        return [p for p in temp_files(tree.target) if p.stat().st_size > 0]

    dead = wait_for(mid_copy, timeout=15, interval=0.001, what="a temp file with data")
    svc.proc.kill()  # SIGKILL: no clean-up runs
    svc.proc.wait(10)
    assert all(p.exists() for p in dead), "the copy finished before the kill"

    start()  # at once, as a hand restart would (systemd waits RestartSec=5s)
    wait_for(
        lambda: not any(p.exists() for p in dead),
        timeout=5,
        what="the killed copy's temp file to be removed",
    )
    stored = tree.stored(alice, "big.jsonl")
    wait_for(
        lambda: stored.exists() and stored.stat().st_size == len(data),
        timeout=30,
        what="the restarted service to copy the file",
    )
    assert stored.read_bytes() == data
    wait_for(lambda: temp_files(tree.target) == [], timeout=5, what="no temp file at all")


# The writer of defect 5: the same length rewritten in place, the old mtime put back before
# the close (so no event comes while size or mtime differ), as the file's owner.
REWRITE_IN_PLACE = r"""
import os, sys
path, data, mtime_ns = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3])
fd = os.open(path, os.O_WRONLY)
os.pwrite(fd, data, 0)
os.utime(fd, ns=(mtime_ns, mtime_ns))
os.close(fd)
"""


def test_same_size_restored_mtime_rewrite_is_copied_live(tree: Tree, start: StartFn) -> None:
    """Issue 10, defect 5: a rewrite in place with the same length and the mtime set back
    left the old bytes in the store for good (rsync's quick check has the same blind
    spot). The live service sees the close (and the utime's IN_ATTRIB): a real event now
    copies even when size and mtime match."""
    alice = tree.add_user("alice")
    old, new = line(1), line(2)
    assert len(old) == len(new) and old != new
    path = tree.write(alice, "s.jsonl", old, mtime=time.time() - 3600)
    svc = start()
    wait_stored(tree, alice, "s.jsonl", old)
    mtime_ns = path.stat().st_mtime_ns
    run_as(
        alice.uid,
        alice.gid,
        [sys.executable, "-c", REWRITE_IN_PLACE, str(path), new.decode(), str(mtime_ns)],
    )
    assert (path.read_bytes(), path.stat().st_mtime_ns) == (new, mtime_ns)
    wait_stored(tree, alice, "s.jsonl", new)
    assert tree.stored(alice, "s.jsonl").stat().st_mtime_ns == mtime_ns
    assert svc.proc.poll() is None


CLOSE_FLOOD = r"""
import os, sys
for _ in range(int(sys.argv[2])):
    os.close(os.open(sys.argv[1], os.O_WRONLY))
"""


def test_a_close_flood_that_writes_nothing_costs_no_copies(tree: Tree, start: StartFn) -> None:
    # Every close is a real event and forces a copy, unless the file's ctime has not moved
    # since the last copy: opening and closing for writing changes nothing.
    alice = tree.add_user("alice")
    path = tree.write(alice, "s.jsonl", line(1), mtime=time.time() - 3600)
    svc = start()
    wait_stored(tree, alice, "s.jsonl", line(1))
    before = len(svc.copies("alice", "s.jsonl"))
    run_as(alice.uid, alice.gid, [sys.executable, "-c", CLOSE_FLOOD, str(path), "2000"])
    tree.write(alice, "barrier.jsonl", line(2))  # handled after the flood's events
    wait_stored(tree, alice, "barrier.jsonl", line(2))
    assert len(svc.copies("alice", "s.jsonl")) == before
