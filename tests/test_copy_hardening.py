"""What the copy engine does against a hostile or odd source: sparse-huge files, a hot file
with no newline in sight, an mtime in the future, and one WARNING per refused entry however
often it is looked at. Real files in real trees, as in test_copy.py."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import IS_ROOT, Tree, log_lines

from session_watcher import copy as copy_mod
from session_watcher.config import Config
from session_watcher.copy import (
    REFUSAL_KINDS,
    SPARSE_MIN_BYTES,
    Outcome,
    Refusal,
    Result,
    SourceDir,
    is_hot,
    recheck_time,
    refusal,
    sync_file,
)
from session_watcher.metrics import Metrics
from session_watcher.ratelimit import LogLimiter
from session_watcher.store import Store, UserStore, lookup_gid

LINE = b'{"type":"user","message":"hello"}\n'
MiB = 1024 * 1024

Sync = Callable[..., Result]


@pytest.fixture
def sync(tree: Tree) -> Iterator[Sync]:
    """`sync(name, now=..., **config)` runs `sync_file` for alice, as a pass would."""
    u = tree.add_user("alice")
    src_fd = os.open(u.sessions, os.O_RDONLY | os.O_DIRECTORY)
    opened: list[tuple[UserStore, int | None]] = []
    limiter = LogLimiter()  # one per test, as the service has one for its lifetime

    def run(name: str, *, now: float | None = None, **overrides: object) -> Result:
        config: Config = tree.config(**overrides)
        store = Store(config, lookup_gid(config.group))
        root_fd = store.open_root(create=True)
        user_store = UserStore(store, root_fd, "alice")
        opened.append((user_store, root_fd))
        return sync_file(
            config,
            SourceDir("alice", u.uid, src_fd),
            user_store,
            name,
            now=time.time() if now is None else now,
            limiter=limiter,
        )

    yield run
    for user_store, root_fd in opened:
        user_store.close()
        if root_fd is not None:
            os.close(root_fd)
    os.close(src_fd)


def own(tree: Tree, path: Path) -> Path:
    if IS_ROOT:
        u = tree.user("alice")
        os.chown(path, u.uid, u.gid, follow_symlinks=False)
    return path


def sparse_file(tree: Tree, name: str, size: int) -> Path:
    """`truncate -s SIZE name` as its owner would: a few KB of blocks at most."""
    path = tree.source("alice", name)
    with open(path, "wb") as f:
        f.write(LINE)
        f.truncate(size)
    return own(tree, path)


# --- sparse-huge ------------------------------------------------------------------------


def test_sparse_huge_file_is_refused_under_the_default_size_limit(
    tree: Tree, sync: Sync, caplog: pytest.LogCaptureFixture
) -> None:
    path = sparse_file(tree, "holes.jsonl", 64 * MiB)
    st = os.stat(path)
    assert st.st_blocks * 512 < MiB  # the user paid next to nothing for it
    r = sync("holes.jsonl")  # max-file-bytes: the 1 GiB default
    assert r.outcome is Outcome.REFUSED and r.kind == "sparse"
    assert r.detail == f"sparse: {st.st_blocks * 512} bytes allocated of {64 * MiB}"
    assert not tree.stored("alice", "holes.jsonl").exists()
    (w,) = log_lines(caplog.records, logging.WARNING)
    assert w.startswith("refused 'alice/holes.jsonl': sparse:")
    assert refusal(st, st.st_uid, 1 << 30) == Refusal("sparse", r.detail)


def test_dense_file_over_the_sparse_floor_and_a_small_sparse_file_are_copied(
    tree: Tree, sync: Sync
) -> None:
    data = (LINE * (2 * MiB // len(LINE) + 1))[: 2 * MiB - 1] + b"\n"
    tree.write_fast("alice", "dense.jsonl", data)
    os.utime(tree.source("alice", "dense.jsonl"), (1_700_000_000, 1_700_000_000))
    assert sync("dense.jsonl") == Result(Outcome.COPIED, nbytes=2 * MiB)
    assert tree.stored("alice", "dense.jsonl").read_bytes() == data
    # Small files are exempt: inline data and tails have no blocks of their own.
    sparse_file(tree, "small.jsonl", SPARSE_MIN_BYTES)
    os.utime(tree.source("alice", "small.jsonl"), (1_700_000_000, 1_700_000_000))
    assert sync("small.jsonl") == Result(Outcome.COPIED, nbytes=SPARSE_MIN_BYTES)


def test_file_with_a_hole_but_mostly_data_is_copied(tree: Tree, sync: Sync) -> None:
    path = tree.source("alice", "gappy.jsonl")
    with open(path, "wb") as f:
        f.write(LINE * (3 * MiB // len(LINE)))
        f.seek(MiB, os.SEEK_CUR)  # a 1 MiB hole, then more data
        f.write(LINE)
    own(tree, path)
    os.utime(path, (1_700_000_000, 1_700_000_000))
    r = sync("gappy.jsonl")
    assert r.outcome is Outcome.COPIED and r.nbytes == os.path.getsize(path)


def test_a_sparse_suspect_that_is_dense_on_disk_is_copied(
    tree: Tree, sync: Sync, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ZFS with compression reports the compressed size in st_blocks, and a file system
    that allocates late reports few blocks for a fresh file: the stat is only a suspicion,
    confirmed with SEEK_DATA/SEEK_HOLE on the opened file before anything is refused."""
    data = LINE * (2 * MiB // len(LINE))
    tree.write_fast("alice", "compressed.jsonl", data)
    os.utime(tree.source("alice", "compressed.jsonl"), (1_700_000_000, 1_700_000_000))
    real = copy_mod.refusal

    def as_if_compressed(
        st: os.stat_result, owner_uid: int, max_bytes: int, dev: int | None = None
    ) -> Refusal | None:
        why = real(st, owner_uid, max_bytes, dev)
        return why or Refusal("sparse", f"sparse: 4096 bytes allocated of {st.st_size}")

    monkeypatch.setattr(copy_mod, "refusal", as_if_compressed)
    assert sync("compressed.jsonl") == Result(Outcome.COPIED, nbytes=len(data))
    assert sync("compressed.jsonl") == Result(Outcome.SKIPPED)  # and up to date after


def test_sparse_is_a_bounded_metrics_label_that_does_not_depend_on_wording() -> None:
    assert "sparse" in REFUSAL_KINDS
    m = Metrics()
    m.record(Result(Outcome.REFUSED, detail="reworded: mostly holes", kind="sparse"))
    m.record(
        Result(Outcome.REFUSED, detail="sparse: 4096 bytes allocated of 67108864", kind="sparse")
    )
    assert m.refusals.labels(reason="sparse")._value.get() == 2


# --- hot files: a bounded tail scan, and only when hot -------------------------------------


def test_hot_file_with_no_newline_in_its_last_mib_is_held_back_reading_one_mib(
    tree: Tree, sync: Sync, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree.write_fast("alice", "blob.jsonl", LINE + b"x" * (8 * MiB))
    m = os.stat(tree.source("alice", "blob.jsonl")).st_mtime
    read = []
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        read.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    r = sync("blob.jsonl", now=m + 1)
    assert r == Result(Outcome.SKIPPED, recheck_at=m + 5)  # like "no whole line yet"
    assert 0 < sum(read) <= MiB
    assert not tree.stored("alice", "blob.jsonl").exists()
    # Once quiet it goes in whole, without looking for a newline at all.
    read.clear()
    assert sync("blob.jsonl", now=m + 5) == Result(Outcome.COPIED, nbytes=len(LINE) + 8 * MiB)
    assert read == []


def test_quiet_file_is_never_searched_for_its_last_newline(
    tree: Tree, sync: Sync, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree.write("alice", "s.jsonl", LINE + b'{"unfinished', mtime=1_700_000_000)

    def no_scan(*args: object) -> int:
        raise AssertionError("a quiet file must not be scanned")

    monkeypatch.setattr(copy_mod, "_line_end", no_scan)
    assert sync("s.jsonl", now=1_700_000_010) == Result(Outcome.COPIED, nbytes=len(LINE) + 12)


# --- an mtime in the future ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("mtime", "now", "hot", "recheck"),
    [
        (1000.0, 1001.0, True, 1005.0),
        (1000.0, 1005.0, False, 1005.0),
        (1003.0, 1000.0, True, 1005.0),  # a little ahead (another host's clock): hot
        (1005.0, 1000.0, False, 1005.0),  # `settle` ahead: quiet
        (16_725_225_600.0, 1000.0, False, 1005.0),  # year 2500: quiet, recheck capped
    ],
)
def test_is_hot_and_recheck_time(mtime: float, now: float, hot: bool, recheck: float) -> None:
    assert is_hot(mtime, now, 5.0) is hot
    assert recheck_time(mtime, now, 5.0) == recheck


def test_mtime_far_in_the_future_is_not_held_back(tree: Tree, sync: Sync) -> None:
    now = time.time()
    tree.write("alice", "s.jsonl", LINE + b'{"half', mtime=16_725_225_600)  # year 2500
    r = sync("s.jsonl", now=now)
    assert r == Result(Outcome.COPIED, nbytes=len(LINE) + 6)
    assert tree.stored("alice", "s.jsonl").read_bytes() == LINE + b'{"half'


def test_mtime_a_little_ahead_is_held_back_at_most_two_settles_with_rechecks_in_reach(
    tree: Tree, sync: Sync
) -> None:
    t0 = 1_700_000_000.0
    tree.write("alice", "s.jsonl", LINE + b'{"half', mtime=t0 + 4)
    now = t0
    held = []
    while True:
        r = sync("s.jsonl", now=now)
        if r.recheck_at is None:
            break
        assert now < r.recheck_at <= now + 5
        held.append(now)
        now = r.recheck_at
    assert r.outcome is Outcome.COPIED and now - t0 <= 2 * 5
    assert tree.stored("alice", "s.jsonl").read_bytes() == LINE + b'{"half'
    assert len(held) <= 2


# --- one WARNING per refused entry ----------------------------------------------------------


def test_a_refused_entry_warns_once_and_its_repeats_go_to_debug(
    tree: Tree, sync: Sync, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="session_watcher")
    os.mkfifo(tree.source("alice", "p.jsonl"))
    results = [sync("p.jsonl") for _ in range(50)]
    assert results == [Result(Outcome.REFUSED, detail="a FIFO", kind="fifo")] * 50
    assert log_lines(caplog.records, logging.WARNING) == ["refused 'alice/p.jsonl': a FIFO"]
    assert log_lines(caplog.records, logging.DEBUG).count("refused 'alice/p.jsonl': a FIFO") == 49

    # Replaced by something else hostile: a new entry, one new WARNING.
    caplog.clear()
    os.unlink(tree.source("alice", "p.jsonl"))
    os.symlink("/etc/shadow", tree.source("alice", "p.jsonl"))
    for _ in range(5):
        assert sync("p.jsonl").kind == "symlink"
    assert log_lines(caplog.records, logging.WARNING) == ["refused 'alice/p.jsonl': a symlink"]


def test_an_oversized_file_that_keeps_growing_warns_once(
    tree: Tree, sync: Sync, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(1, 6):
        tree.write_fast("alice", "big.jsonl", LINE * (10 + i))
        r = sync("big.jsonl", max_file_bytes=len(LINE) * 10)
        assert (r.outcome, r.kind) == (Outcome.REFUSED, "size")
    (w,) = log_lines(caplog.records, logging.WARNING)
    assert "over the limit" in w


def test_many_threads_on_one_refused_entry_give_one_warning(
    tree: Tree, sync: Sync, caplog: pytest.LogCaptureFixture
) -> None:
    os.mkfifo(tree.source("alice", "p.jsonl"))
    outcomes: list[Outcome] = []

    def hammer() -> None:
        for _ in range(20):
            outcomes.append(sync("p.jsonl").outcome)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes == [Outcome.REFUSED] * 160
    assert len(log_lines(caplog.records, logging.WARNING)) == 1


def test_the_log_limiter_memory_is_bounded_and_forgets_the_oldest() -> None:
    t = [0.0]
    w = LogLimiter(60.0, clock=lambda: t[0], size=3)
    keys = [(f"u{i}", "fifo") for i in range(4)]
    assert [w.admit(*k)[0] for k in keys] == [True] * 4  # the 4th evicts the 1st
    assert not w.admit(*keys[3])[0] and not w.admit(*keys[2])[0]
    assert w.admit(*keys[0])[0]  # forgotten: logs again (bounded memory, not silence)
