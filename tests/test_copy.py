"""The copy/skip decision for one file (`sync_file`) and its pure parts, on real trees."""

from __future__ import annotations

import errno
import fnmatch
import glob
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import IS_ROOT, TEST_GID, Tree, log_lines, root_only, wait_for

from session_watcher import copy as copy_mod
from session_watcher.config import Config
from session_watcher.copy import (
    Outcome,
    Refusal,
    Result,
    SourceDir,
    install_length,
    is_up_to_date,
    refusal,
    sync_file,
)
from session_watcher.homes import is_session_name
from session_watcher.ratelimit import LogLimiter
from session_watcher.store import (
    TEMP_PREFIX,
    Store,
    UserStore,
    is_stale_temp,
    is_temp_name,
    lookup_gid,
)

LINE = b'{"type":"user","message":"hello"}\n'


class Engine:
    """One user's sessions directory and store directory, opened as a pass would."""

    def __init__(self, tree: Tree, user: str, config: Config, *, dry_run: bool = False) -> None:
        u = tree.user(user)
        self.config = config
        self.dry_run = dry_run
        self.source = SourceDir(u.name, u.uid, os.open(u.sessions, os.O_RDONLY | os.O_DIRECTORY))
        self.store = Store(config, lookup_gid(config.group), dry_run=dry_run)
        self.root_fd = self.store.open_root(create=True)
        self.user_store = UserStore(self.store, self.root_fd, u.name)
        self.limiter = LogLimiter()

    def sync(
        self,
        name: str,
        *,
        now: float | None = None,
        lstat: os.stat_result | None = None,
        force: bool = False,
        copied_id: tuple[int, int, int] | None = None,
    ) -> Result:
        return sync_file(
            self.config,
            self.source,
            self.user_store,
            name,
            now=time.time() if now is None else now,
            dry_run=self.dry_run,
            lstat=lstat,
            limiter=self.limiter,
            force=force,
            copied_id=copied_id,
        )

    def close(self) -> None:
        self.user_store.close()
        if self.root_fd is not None:
            os.close(self.root_fd)
        os.close(self.source.fd)


@pytest.fixture
def engine(tree: Tree) -> Iterator[Callable[..., Engine]]:
    """`engine(user, **config_overrides)` → an Engine on `tree`, closed after the test."""
    made: list[Engine] = []

    def make(user: str = "alice", *, dry_run: bool = False, **overrides: object) -> Engine:
        if user not in tree.users:
            tree.add_user(user)
        e = Engine(tree, user, tree.config(**overrides), dry_run=dry_run)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


def store_names(tree: Tree, user: str = "alice") -> list[str]:
    d = tree.target / user
    return sorted(os.listdir(d)) if d.exists() else []


# --- pure decisions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "line_end", "mtime", "now", "settle", "expected"),
    [
        (100, 60, 1000.0, 1001.0, 5.0, 60),  # hot: whole lines only
        (100, 100, 1000.0, 1001.0, 5.0, 100),  # hot, ends with a newline: all of it
        (100, 0, 1000.0, 1001.0, 5.0, 0),  # hot, not one whole line yet
        (100, 60, 1000.0, 1005.0, 5.0, 100),  # quiet for exactly `settle`: whole
        (100, 60, 1000.0, 1004.999, 5.0, 60),  # just short of quiet
        (100, 60, 1000.0, 1000.0, 0.0, 100),  # settle 0: always whole
    ],
)
def test_install_length(
    size: int, line_end: int, mtime: float, now: float, settle: float, expected: int
) -> None:
    assert install_length(size, line_end, mtime, now, settle) == expected


def test_refusal_reasons(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"12345")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(f)
    st = os.stat(f)
    uid = st.st_uid
    assert refusal(st, uid, 5) is None
    assert refusal(st, uid, 4) == Refusal("size", "5 bytes, over the limit of 4")
    assert refusal(st, uid + 1, 5) == Refusal(
        "owner", f"owned by uid {uid}, not by the home's owner {uid + 1}"
    )
    assert refusal(os.lstat(tmp_path / "fifo"), uid, 5) == Refusal("fifo", "a FIFO")
    assert refusal(os.lstat(tmp_path / "link"), uid, 5) == Refusal("symlink", "a symlink")
    assert refusal(os.lstat(tmp_path), uid, 5) == Refusal("directory", "a directory")
    assert refusal(os.stat("/dev/null"), 0, 5) == Refusal("device", "a character device")


def test_is_up_to_date_needs_regular_same_size_same_mtime_ns(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"abc")
    b.write_bytes(b"xyz")
    os.utime(b, ns=(0, os.stat(a).st_mtime_ns))
    assert is_up_to_date(os.stat(a), os.stat(b))  # contents are not compared: quick check
    assert not is_up_to_date(os.stat(a), None)
    os.utime(b, ns=(0, os.stat(a).st_mtime_ns + 1))
    assert not is_up_to_date(os.stat(a), os.stat(b))
    b.write_bytes(b"xyzw")
    os.utime(b, ns=(0, os.stat(a).st_mtime_ns))
    assert not is_up_to_date(os.stat(a), os.stat(b))
    (tmp_path / "d").mkdir()
    assert not is_up_to_date(os.stat(tmp_path / "d"), os.stat(tmp_path / "d"))


def test_temp_names_never_match_a_session_glob() -> None:
    name = f"{TEMP_PREFIX}0123456789abcdef.tmp"
    assert is_temp_name(name)
    assert not is_session_name(name)
    assert not fnmatch.fnmatch(name, "*.jsonl")
    assert not is_temp_name("a.jsonl")
    assert not is_temp_name(".session-watcher.x.jsonl")


def test_is_stale_temp_after_an_hour_of_ctime(tmp_path: Path) -> None:
    name = f"{TEMP_PREFIX}abc.tmp"
    (tmp_path / name).write_bytes(b"partial")
    (tmp_path / "a.jsonl").write_bytes(b"x")
    st = os.stat(tmp_path / name)
    # mtime is set to the (old) source's by the copy: only ctime says how old the temp is.
    os.utime(tmp_path / name, (0, 0))
    st = os.stat(tmp_path / name)
    assert not is_stale_temp(name, st, now=st.st_ctime + 60)
    assert is_stale_temp(name, st, now=st.st_ctime + 3601)
    assert not is_stale_temp("a.jsonl", os.stat(tmp_path / "a.jsonl"), now=st.st_ctime + 1e6)
    assert not is_stale_temp(name, os.stat(tmp_path), now=st.st_ctime + 1e6)  # a directory


def test_remove_stale_temps_removes_only_old_temps_of_ours(tree: Tree) -> None:
    d = tree.base / "userstore"
    d.mkdir()
    ours = [f"{TEMP_PREFIX}{i:016x}.tmp" for i in range(3)]
    for n in ["a.jsonl", ".other.tmp", ".session-watcher.keep.jsonl"]:
        (d / n).write_bytes(b"x")
    for n in ours:  # empty: they may be copies between their create and their flock
        (d / n).write_bytes(b"")
    (d / f"{TEMP_PREFIX}dir.tmp").mkdir()
    store = Store(tree.config(), TEST_GID)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert store.remove_stale_temps(fd, "alice", now=time.time()) == 0  # all fresh
        assert store.remove_stale_temps(fd, "alice", now=time.time() + 7200) == 3
        assert Store(tree.config(), TEST_GID, dry_run=True).remove_stale_temps(fd, "alice") == 0
    finally:
        os.close(fd)
    assert sorted(os.listdir(d)) == sorted(
        ["a.jsonl", ".other.tmp", ".session-watcher.keep.jsonl", f"{TEMP_PREFIX}dir.tmp"]
    )


# --- copying --------------------------------------------------------------------------------


def test_new_file_copied_with_our_mode_group_and_the_source_mtime(
    tree: Tree, engine: Callable[..., Engine]
) -> None:
    e = engine()
    src = tree.write("alice", "s.jsonl", LINE * 3, mtime=1_700_000_000.123456789)
    assert stat.S_IMODE(os.stat(src).st_mode) == 0o600  # as the real client creates it
    r = e.sync("s.jsonl")
    assert r == Result(Outcome.COPIED, nbytes=len(LINE) * 3)
    dst = tree.stored("alice", "s.jsonl")
    assert dst.read_bytes() == LINE * 3
    st, sst = os.stat(dst), os.stat(src)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_gid == TEST_GID
    assert st.st_mtime_ns == sst.st_mtime_ns
    if IS_ROOT:
        assert st.st_uid == 0
    for d in (tree.target, tree.target / "alice"):
        dst_dir = os.stat(d)
        assert stat.S_IMODE(dst_dir.st_mode) == 0o2770
        assert dst_dir.st_gid == TEST_GID


def test_configured_modes_are_set_not_copied(tree: Tree, engine: Callable[..., Engine]) -> None:
    e = engine(file_mode=0o604, dir_mode=0o750)
    src = tree.write("alice", "s.jsonl", LINE)
    os.chmod(src, 0o666)  # noqa: S103 - a careless source mode must not reach the store
    assert e.sync("s.jsonl").outcome is Outcome.COPIED
    assert stat.S_IMODE(os.stat(tree.stored("alice", "s.jsonl")).st_mode) == 0o604
    assert stat.S_IMODE(os.stat(tree.target / "alice").st_mode) == 0o750


def test_up_to_date_file_is_skipped_without_reading_it(
    tree: Tree, engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    e = engine()
    tree.write("alice", "s.jsonl", LINE)
    assert e.sync("s.jsonl").outcome is Outcome.COPIED

    def no_reading(*args: object) -> int:
        raise AssertionError("an up-to-date file must not be read")

    monkeypatch.setattr(copy_mod, "_copy_bytes", no_reading)
    monkeypatch.setattr(copy_mod, "_line_end", no_reading)
    assert e.sync("s.jsonl") == Result(Outcome.SKIPPED)
    st = os.stat(tree.source("alice", "s.jsonl"))
    assert e.sync("s.jsonl", lstat=st) == Result(Outcome.SKIPPED)


def test_grown_file_is_copied_again(tree: Tree, engine: Callable[..., Engine]) -> None:
    """The legacy collector skipped any file that existed in the store and lost appends."""
    e = engine()
    tree.write("alice", "s.jsonl", LINE)
    assert e.sync("s.jsonl").outcome is Outcome.COPIED
    tree.write("alice", "s.jsonl", LINE * 2, append=True)
    r = e.sync("s.jsonl")
    assert r == Result(Outcome.COPIED, nbytes=len(LINE) * 3)
    assert tree.stored("alice", "s.jsonl").read_bytes() == LINE * 3
    assert e.sync("s.jsonl").outcome is Outcome.SKIPPED


def test_same_size_rewrite_with_new_mtime_is_copied(
    tree: Tree, engine: Callable[..., Engine]
) -> None:
    e = engine()
    tree.write("alice", "s.jsonl", b"aaaa\n", mtime=1_700_000_000)
    assert e.sync("s.jsonl").outcome is Outcome.COPIED
    tree.write("alice", "s.jsonl", b"bbbb\n", mtime=1_700_000_001)
    assert e.sync("s.jsonl").outcome is Outcome.COPIED
    assert tree.stored("alice", "s.jsonl").read_bytes() == b"bbbb\n"


def test_same_size_rewrite_with_the_mtime_set_back_is_copied_only_when_forced(
    tree: Tree, engine: Callable[..., Engine]
) -> None:
    """Issue 10, defect 5: size and mtime cannot tell this rewrite apart (rsync's quick
    check has the same blind spot), so only `force` (a live event) copies it."""
    e = engine()
    src = tree.write("alice", "s.jsonl", b"aaaa\n", mtime=1_700_000_000)
    assert e.sync("s.jsonl").outcome is Outcome.COPIED
    tree.write("alice", "s.jsonl", b"bbbb\n", mtime=1_700_000_000)
    assert e.sync("s.jsonl").outcome is Outcome.SKIPPED  # what a pass alone does
    assert e.sync("s.jsonl", lstat=os.lstat(src)).outcome is Outcome.SKIPPED
    assert e.sync("s.jsonl", lstat=os.lstat(src), force=True) == Result(Outcome.COPIED, nbytes=5)
    dst = tree.stored("alice", "s.jsonl")
    assert (dst.read_bytes(), dst.stat().st_mtime_ns) == (b"bbbb\n", src.stat().st_mtime_ns)


def test_a_forced_copy_is_skipped_when_the_ctime_has_not_moved_since_the_last_copy(
    tree: Tree, engine: Callable[..., Engine]
) -> None:
    # A close flood that writes nothing (270,000 closes a second) must cost no copies: the
    # live service passes the ctime it saw at its last copy, and only a moved ctime forces.
    e = engine()
    src = tree.write("alice", "s.jsonl", b"aaaa\n", mtime=1_700_000_000)
    first = e.sync("s.jsonl", force=True)
    st = src.stat()
    assert first.outcome is Outcome.COPIED
    assert first.source_id == (st.st_dev, st.st_ino, st.st_ctime_ns)
    again = e.sync("s.jsonl", force=True, copied_id=first.source_id)
    assert again.outcome is Outcome.SKIPPED
    os.chmod(src, 0o640)  # the ctime moves: maybe more than the mode changed
    chmodded = e.sync("s.jsonl", force=True, copied_id=first.source_id)
    assert chmodded.outcome is Outcome.COPIED
    tree.write("alice", "s.jsonl", b"bbbb\n", mtime=1_700_000_000)  # ctime moves
    assert e.sync("s.jsonl", force=True, copied_id=chmodded.source_id).outcome is Outcome.COPIED
    assert tree.stored("alice", "s.jsonl").read_bytes() == b"bbbb\n"


def test_forced_copy_keeps_the_torn_line_rule_and_the_refusals(
    tree: Tree, engine: Callable[..., Engine]
) -> None:
    e = engine()  # settle 5 s
    m = 1_700_000_000.0
    other = LINE.replace(b"hello", b"HELLO")
    tree.write("alice", "s.jsonl", LINE + b'{"half', mtime=m)
    assert e.sync("s.jsonl", now=m + 1).nbytes == len(LINE)
    tree.write("alice", "s.jsonl", other + b'{"half', mtime=m)  # same size, same mtime
    r = e.sync("s.jsonl", now=m + 2, force=True)
    assert r == Result(Outcome.COPIED, nbytes=len(LINE), recheck_at=m + 5)
    assert tree.stored("alice", "s.jsonl").read_bytes() == other  # whole lines only
    (tree.user("alice").sessions / "evil.jsonl").symlink_to("/etc/passwd")
    assert e.sync("evil.jsonl", force=True).outcome is Outcome.REFUSED


def test_half_written_last_line_waits_while_hot_and_goes_in_whole_once_quiet(
    tree: Tree, engine: Callable[..., Engine]
) -> None:
    e = engine()  # settle 5 s (the default)
    m = 1_700_000_000.0
    tree.write("alice", "s.jsonl", LINE + b'{"type":"assis', mtime=m)
    dst = tree.stored("alice", "s.jsonl")

    r = e.sync("s.jsonl", now=m + 1)
    assert r == Result(Outcome.COPIED, nbytes=len(LINE), recheck_at=m + 5)
    assert dst.read_bytes() == LINE
    # Still hot, nothing new: that prefix is in already, no second copy.
    assert e.sync("s.jsonl", now=m + 2) == Result(Outcome.SKIPPED, recheck_at=m + 5)
    assert dst.read_bytes() == LINE

    # Quiet for `settle` seconds: the unfinished line goes in, so it is not held back forever.
    r = e.sync("s.jsonl", now=m + 5)
    assert r == Result(Outcome.COPIED, nbytes=len(LINE) + 14)
    assert dst.read_bytes() == LINE + b'{"type":"assis'
    assert os.stat(dst).st_mtime_ns == os.stat(tree.source("alice", "s.jsonl")).st_mtime_ns
    assert e.sync("s.jsonl", now=m + 6).outcome is Outcome.SKIPPED


def test_writer_finishing_the_line_gets_it_copied_while_hot(
    tree: Tree, engine: Callable[..., Engine]
) -> None:
    e = engine()
    tree.write("alice", "s.jsonl", LINE + b'{"half":', mtime=1_700_000_000)
    assert e.sync("s.jsonl", now=1_700_000_000.5).nbytes == len(LINE)
    tree.write("alice", "s.jsonl", b"1}\n", append=True, mtime=1_700_000_001)
    r = e.sync("s.jsonl", now=1_700_000_001.1)
    assert r == Result(Outcome.COPIED, nbytes=len(LINE) + 11)
    assert tree.stored("alice", "s.jsonl").read_bytes() == LINE + b'{"half":1}\n'


def test_hot_file_without_a_whole_line_installs_nothing(
    tree: Tree, engine: Callable[..., Engine]
) -> None:
    e = engine()
    tree.write("alice", "s.jsonl", b'{"no newline yet', mtime=1_700_000_000)
    r = e.sync("s.jsonl", now=1_700_000_001)
    assert r == Result(Outcome.SKIPPED, recheck_at=1_700_000_005)
    assert store_names(tree) == []


def test_long_last_line_beyond_one_tail_chunk_is_cut_at_the_right_newline(
    tree: Tree, engine: Callable[..., Engine]
) -> None:
    e = engine()
    tail = b"x" * (3 * 64 * 1024 + 17)  # the backwards newline search crosses chunks
    tree.write_fast("alice", "s.jsonl", LINE * 2 + tail)
    os.utime(tree.source("alice", "s.jsonl"), (1_700_000_000, 1_700_000_000))
    assert e.sync("s.jsonl", now=1_700_000_001).nbytes == 2 * len(LINE)
    assert tree.stored("alice", "s.jsonl").read_bytes() == LINE * 2


def test_empty_file_is_copied(tree: Tree, engine: Callable[..., Engine]) -> None:
    e = engine()
    tree.write("alice", "empty.jsonl", b"")
    assert e.sync("empty.jsonl") == Result(Outcome.COPIED, nbytes=0)
    assert tree.stored("alice", "empty.jsonl").read_bytes() == b""
    assert e.sync("empty.jsonl").outcome is Outcome.SKIPPED


def test_shrunk_source_is_mirrored_with_a_warning(
    tree: Tree, engine: Callable[..., Engine], caplog: pytest.LogCaptureFixture
) -> None:
    e = engine()
    src = tree.write("alice", "s.jsonl", LINE * 4)
    assert e.sync("s.jsonl").outcome is Outcome.COPIED
    os.truncate(src, len(LINE))
    caplog.clear()
    assert e.sync("s.jsonl") == Result(Outcome.COPIED, nbytes=len(LINE))
    assert tree.stored("alice", "s.jsonl").read_bytes() == LINE
    warnings = log_lines(caplog.records, logging.WARNING)
    assert len(warnings) == 1
    assert "shrank" in warnings[0] and "'alice/s.jsonl'" in warnings[0]


def test_vanished_source_is_not_a_failure(tree: Tree, engine: Callable[..., Engine]) -> None:
    e = engine()
    assert e.sync("gone.jsonl") == Result(Outcome.VANISHED)
    src = tree.write("alice", "late.jsonl", LINE)
    st = os.lstat(src)
    src.unlink()  # listed, then gone before the open
    assert e.sync("late.jsonl", lstat=st) == Result(Outcome.VANISHED)
    assert store_names(tree) == []


def test_dry_run_decides_but_writes_nothing(tree: Tree, engine: Callable[..., Engine]) -> None:
    e = engine(dry_run=True)
    tree.write("alice", "s.jsonl", LINE * 2)
    assert e.sync("s.jsonl") == Result(Outcome.COPIED, nbytes=2 * len(LINE))
    assert not tree.target.exists()


def test_missing_group_leaves_the_default_group_and_still_copies(
    tree: Tree, engine: Callable[..., Engine]
) -> None:
    e = engine(group="no-such-group-sw")
    tree.write("alice", "s.jsonl", LINE)
    assert e.sync("s.jsonl").outcome is Outcome.COPIED
    st = os.stat(tree.stored("alice", "s.jsonl"))
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_gid == os.stat(tree.target / "alice").st_gid


# --- refusals at the descriptor (the name was swapped after the directory scan) ---------


@pytest.mark.parametrize("kind", ["fifo", "symlink", "socket", "directory"])
def test_entry_swapped_after_the_scan_is_refused_at_open(
    tree: Tree, engine: Callable[..., Engine], caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    import socket

    e = engine()
    real = tree.write("alice", "real.jsonl", LINE)
    scanned = os.lstat(real)  # what the scan saw: a regular file of the right owner
    path = tree.source("alice", "x.jsonl")
    if kind == "fifo":
        os.mkfifo(path)  # no writer: a blocking open would hang the pass
    elif kind == "symlink":
        path.symlink_to("/etc/shadow")
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))
    else:
        path.mkdir()
    r = e.sync("x.jsonl", lstat=scanned)
    assert r.outcome is Outcome.REFUSED
    assert store_names(tree) == []
    warnings = log_lines(caplog.records, logging.WARNING)
    assert len(warnings) == 1 and "'alice/x.jsonl'" in warnings[0]


# --- the store side -------------------------------------------------------------------------


def test_symlink_planted_as_target_file_is_replaced_not_followed(
    tree: Tree, engine: Callable[..., Engine], caplog: pytest.LogCaptureFixture
) -> None:
    victim = tree.base / "victim"
    victim.write_bytes(b"root's file\n")
    (tree.target / "alice").mkdir(parents=True)
    (tree.target / "alice" / "s.jsonl").symlink_to(victim)
    e = engine()
    tree.write("alice", "s.jsonl", LINE)
    assert e.sync("s.jsonl").outcome is Outcome.COPIED
    assert victim.read_bytes() == b"root's file\n"
    dst = tree.stored("alice", "s.jsonl")
    assert not dst.is_symlink() and dst.read_bytes() == LINE
    warnings = log_lines(caplog.records, logging.WARNING)
    assert len(warnings) == 1 and "symlink" in warnings[0]


def test_directory_in_the_store_at_the_target_name_fails_cleanly(
    tree: Tree, engine: Callable[..., Engine], caplog: pytest.LogCaptureFixture
) -> None:
    (tree.target / "alice" / "s.jsonl").mkdir(parents=True)
    e = engine()
    tree.write("alice", "s.jsonl", LINE)
    r = e.sync("s.jsonl")
    assert r.outcome is Outcome.FAILED and r.errno == errno.EISDIR
    errors = log_lines(caplog.records, logging.ERROR)
    assert len(errors) == 1 and "'alice/s.jsonl'" in errors[0] and "EISDIR" in errors[0]
    assert store_names(tree) == ["s.jsonl"]


# --- the source changing during the copy (the `_copy_bytes` seam) ---------------------------


def _seam(
    monkeypatch: pytest.MonkeyPatch, before: Callable[[int], None]
) -> Callable[[int, int, int], int]:
    """Replace `_copy_bytes` with one that runs `before(call_number)` and then copies."""
    real = copy_mod._copy_bytes
    calls = [0]

    def copy_bytes(src: int, dst: int, length: int) -> int:
        calls[0] += 1
        before(calls[0])
        return real(src, dst, length)

    monkeypatch.setattr(copy_mod, "_copy_bytes", copy_bytes)
    return real


def _replace(tree: Tree, name: str, data: bytes) -> None:
    """Replace the source with a new inode, as an editor's rename would."""
    tree.write("alice", ".new", data)
    os.rename(tree.source("alice", ".new"), tree.source("alice", name))


def test_source_replaced_during_the_copy_is_retried(
    tree: Tree, engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    e = engine()
    tree.write("alice", "s.jsonl", b"old\n" * 10)

    def before(call: int) -> None:
        if call == 1:
            _replace(tree, "s.jsonl", b"new\n" * 5)

    _seam(monkeypatch, before)
    assert e.sync("s.jsonl") == Result(Outcome.COPIED, nbytes=20)
    assert tree.stored("alice", "s.jsonl").read_bytes() == b"new\n" * 5
    assert store_names(tree) == ["s.jsonl"]  # the discarded temp file is gone


def test_source_shrunk_during_the_copy_is_retried(
    tree: Tree, engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    e = engine()
    src = tree.write("alice", "s.jsonl", LINE * 10)

    def before(call: int) -> None:
        if call == 1:
            os.truncate(src, len(LINE) * 2)

    _seam(monkeypatch, before)
    r = e.sync("s.jsonl")
    assert r.outcome is Outcome.COPIED
    assert tree.stored("alice", "s.jsonl").read_bytes() == LINE * 2
    assert store_names(tree) == ["s.jsonl"]


def test_source_always_changing_fails_after_three_tries(
    tree: Tree,
    engine: Callable[..., Engine],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    e = engine()
    tree.write("alice", "s.jsonl", LINE)
    calls: list[int] = []

    def before(call: int) -> None:
        calls.append(call)
        _replace(tree, "s.jsonl", LINE * (call + 1))

    _seam(monkeypatch, before)
    r = e.sync("s.jsonl")
    assert r.outcome is Outcome.FAILED
    assert calls == [1, 2, 3]
    assert store_names(tree) == []  # no temp file left behind
    errors = log_lines(caplog.records, logging.ERROR)
    assert len(errors) == 1 and "'alice/s.jsonl'" in errors[0]


def test_source_grown_during_the_copy_installs_the_consistent_prefix(
    tree: Tree, engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    e = engine()
    tree.write("alice", "s.jsonl", LINE * 2)

    def before(call: int) -> None:
        if call == 1:
            tree.write("alice", "s.jsonl", b'{"more":1}\n', append=True)

    _seam(monkeypatch, before)
    assert e.sync("s.jsonl") == Result(Outcome.COPIED, nbytes=2 * len(LINE))
    assert tree.stored("alice", "s.jsonl").read_bytes() == LINE * 2
    # Size and mtime differ from the source's now: the next call copies the rest.
    assert e.sync("s.jsonl").nbytes == 2 * len(LINE) + 11
    assert tree.stored("alice", "s.jsonl").read_bytes() == LINE * 2 + b'{"more":1}\n'


def test_reader_sees_old_or_new_complete_file_never_a_partial_one(
    tree: Tree, engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    e = engine()
    old = b"a" * 1023 + b"\n"
    new = b"b" * 1023 + b"\n"
    old_size, new_size = 1024 * len(old), 64 * 1024 * len(new)  # 1 MiB, then 64 MiB
    tree.write_fast("alice", "big.jsonl", old * 1024)
    assert e.sync("big.jsonl").outcome is Outcome.COPIED
    tree.write_fast("alice", "big.jsonl", new * (64 * 1024))
    dst = tree.stored("alice", "big.jsonl")

    seen: list[tuple[int, bytes, bytes]] = []
    reads = [0]
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                try:
                    with open(dst, "rb") as f:
                        size = os.fstat(f.fileno()).st_size
                        head = f.read(1024)
                        f.seek(max(0, size - 1024))
                        tail = f.read(1024)
                except FileNotFoundError:
                    size, head, tail = -1, b"", b""
                seen.append((size, head[:1], tail[-2:]))
                reads[0] += 1
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)

    mid_copy: dict[str, list[str]] = {}

    def copy_bytes(src: int, dst_fd: int, length: int) -> int:
        # Copy half, let the reader look a few times and list the directory, then finish.
        real(src, dst_fd, length // 2)
        mid_copy["jsonl"] = sorted(glob.glob(str(tree.target / "alice" / "*.jsonl")))
        mid_copy["all"] = sorted(os.listdir(tree.target / "alice"))
        start = reads[0]
        wait_for(lambda: reads[0] >= start + 3, what="the reader to look mid-copy")
        return real(src, dst_fd, length)

    real = copy_mod._copy_bytes
    monkeypatch.setattr(copy_mod, "_copy_bytes", copy_bytes)
    t = threading.Thread(target=reader)
    t.start()
    try:
        r = e.sync("big.jsonl")
        start = reads[0]
        wait_for(lambda: reads[0] >= start + 2, what="the reader to see the new file")
    finally:
        stop.set()
        t.join()
    assert not errors
    assert r == Result(Outcome.COPIED, nbytes=new_size)
    assert dst.stat().st_size == new_size
    assert set(seen) <= {(old_size, b"a", b"a\n"), (new_size, b"b", b"b\n")}
    assert (old_size, b"a", b"a\n") in seen and (new_size, b"b", b"b\n") in seen
    # Mid-copy the temp file existed next to the target, and no *.jsonl glob matched it.
    assert mid_copy["jsonl"] == [str(dst)]
    (temp,) = [n for n in mid_copy["all"] if n != "big.jsonl"]
    assert temp.startswith(TEMP_PREFIX) and is_temp_name(temp)
    assert store_names(tree) == ["big.jsonl"]


def test_calls_for_the_same_file_never_interleave(
    tree: Tree, engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    e = engine()
    tree.write("alice", "s.jsonl", LINE * 100)
    active = [0]
    most = [0]
    lock = threading.Lock()
    second = threading.Event()

    def before(call: int) -> None:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
            if active[0] > 1:
                second.set()
        second.wait(0.2)  # a window for an interleaving call to show up
        with lock:
            active[0] -= 1

    _seam(monkeypatch, before)
    results: list[Result] = []

    def worker() -> None:
        results.append(e.sync("s.jsonl"))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
    assert sorted(r.outcome.value for r in results) == ["copied"] + ["skipped"] * 5
    assert tree.stored("alice", "s.jsonl").read_bytes() == LINE * 100


# --- errors ---------------------------------------------------------------------------------


@root_only
def test_enospc_fails_the_file_removes_the_temp_and_logs_one_line(
    tree: Tree,
    tmpfs: Callable[[Path, str], Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    tmpfs(tree.target, "1m")
    tree.add_user("alice")
    e = Engine(tree, "alice", tree.config())
    try:
        tree.write_fast("alice", "big.jsonl", LINE * (2 * 1024 * 1024 // len(LINE)))
        tree.write("alice", "small.jsonl", LINE)
        big = e.sync("big.jsonl")
        small = e.sync("small.jsonl")
    finally:
        e.close()
    assert big.outcome is Outcome.FAILED and big.errno == errno.ENOSPC
    assert small.outcome is Outcome.COPIED
    assert store_names(tree) == ["small.jsonl"]
    errors = log_lines(caplog.records, logging.ERROR)
    assert len(errors) == 1
    assert "'alice/big.jsonl'" in errors[0] and "ENOSPC" in errors[0]


# --- large copies are written back in chunks -------------------------------------------------


def test_a_large_copy_goes_to_disk_chunk_by_chunk_and_stays_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each fdatasync comes when at most one chunk is unsynced, so a big copy never leaves
    more than a chunk of dirty data for other users' fsyncs to wait behind; the bytes are
    exact whichever kernel path copies them."""
    chunk = 64 << 10
    data = os.urandom(chunk * 7 + 1234)
    src_path = tmp_path / "src"
    src_path.write_bytes(data)
    synced_at: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced_at.append(os.fstat(fd).st_size)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    for use_sendfile in (False, True):
        if use_sendfile:  # the fallback when copy_file_range cannot (EXDEV, ENOSYS, ...)

            def no_cfr(*args: object) -> int:
                raise OSError(errno.EXDEV, "cross-device")

            monkeypatch.setattr(os, "copy_file_range", no_cfr)
        synced_at.clear()
        dst_path = tmp_path / f"dst-{use_sendfile}"
        src = os.open(src_path, os.O_RDONLY)
        dst = os.open(dst_path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            assert copy_mod._copy_bytes(src, dst, len(data), chunk) == len(data)
        finally:
            os.close(src)
            os.close(dst)
        assert dst_path.read_bytes() == data
        # Synced after every full chunk but the last part (the caller's fsync takes it).
        assert synced_at == [chunk * k for k in range(1, 8)]


def test_a_small_copy_is_one_write_with_no_extra_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(os, "fdatasync", calls.append)
    (tmp_path / "src").write_bytes(b'{"a":1}\n' * 1000)
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert copy_mod._copy_bytes(src, dst, 8000) == 8000
    finally:
        os.close(src)
        os.close(dst)
    assert calls == []
