"""The full pass (`reconcile`) over real trees: which homes and files, refusals, counts."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import time
from pathlib import Path

import pytest
from helpers import (
    IS_ROOT,
    STATS_KEYS,
    TEST_GID,
    Tree,
    log_lines,
    root_only,
    snapshot,
    wait_for,
)

from session_watcher import Config, PassStats, reconcile
from session_watcher.copy import Outcome, Result, SourceDir
from session_watcher.ratelimit import ByteBudget
from session_watcher.store import ORPHAN_TEMP_SECONDS, TEMP_PREFIX
from session_watcher.workqueue import WorkQueue

LINE = b'{"type":"user","message":"hi"}\n'


def counts(stats: PassStats) -> dict[str, int]:
    d = stats.as_dict()
    del d["duration_s"]
    return d


def stored_tree(tree: Tree) -> dict[str, bytes]:
    """user/name → bytes of every file in the store (names as bytes decode to str escapes)."""
    out: dict[str, bytes] = {}
    if not tree.target.exists():
        return out
    for user in sorted(os.listdir(tree.target)):
        for name in sorted(os.listdir(tree.target / user)):
            out[f"{user}/{name}"] = (tree.target / user / name).read_bytes()
    return out


def test_library_api_pass_copies_then_skips(tree: Tree) -> None:
    tree.add_user("alice")
    tree.add_user("bob")
    tree.write("alice", "a1.jsonl", LINE)
    tree.write("alice", "a2.jsonl", LINE * 2)
    tree.write("bob", "b1.jsonl", LINE * 3)
    config = Config(
        home_root=tree.home_root,
        target=tree.target,
        group=tree.config().group,
        min_uid=tree.min_uid(),
        max_uid=tree.config().max_uid,
    )
    stats = reconcile(config)
    assert set(stats.as_dict()) == STATS_KEYS
    assert counts(stats) == {
        "users_processed": 2,
        "files_copied": 3,
        "files_skipped": 0,
        "files_refused": 0,
        "files_failed": 0,
        "bytes_copied": 6 * len(LINE),
    }
    assert isinstance(stats.as_dict()["duration_s"], float)
    assert stored_tree(tree) == {
        "alice/a1.jsonl": LINE,
        "alice/a2.jsonl": LINE * 2,
        "bob/b1.jsonl": LINE * 3,
    }
    again = reconcile(config)
    assert (again.files_copied, again.files_skipped, again.bytes_copied) == (0, 3, 0)


def test_only_session_files_directly_in_the_sessions_dir(tree: Tree) -> None:
    u = tree.add_user("alice")
    tree.write("alice", "s.jsonl", LINE)
    for name in (".hidden.jsonl", "notes.json", "s.jsonl.bak", "jsonl", f"{TEMP_PREFIX}x.tmp"):
        tree.write("alice", name, LINE)
    (u.sessions / "sub").mkdir()
    (u.sessions / "sub" / "deep.jsonl").write_bytes(LINE)
    stats = reconcile(tree.config())
    assert stored_tree(tree) == {"alice/s.jsonl": LINE}
    assert (stats.files_copied, stats.files_refused, stats.files_skipped) == (1, 0, 0)


def test_grown_file_is_copied_again_and_source_deletion_keeps_the_archive(tree: Tree) -> None:
    tree.add_user("alice")
    src = tree.write("alice", "s.jsonl", LINE)
    tree.write("alice", "gone.jsonl", LINE)
    reconcile(tree.config())
    tree.write("alice", "s.jsonl", LINE, append=True)
    tree.source("alice", "gone.jsonl").unlink()
    stats = reconcile(tree.config())
    assert (stats.files_copied, stats.files_skipped, stats.bytes_copied) == (1, 0, 2 * len(LINE))
    assert stored_tree(tree) == {"alice/gone.jsonl": LINE, "alice/s.jsonl": LINE * 2}
    assert os.stat(tree.stored("alice", "s.jsonl")).st_mtime_ns == os.stat(src).st_mtime_ns


def test_pass_holds_back_a_hot_half_line_and_takes_it_when_quiet(tree: Tree) -> None:
    tree.add_user("alice")
    m = 1_700_000_000.0
    tree.write("alice", "s.jsonl", LINE + b'{"half', mtime=m)
    hot = reconcile(tree.config(), now=lambda: m + 1)
    assert (hot.files_copied, hot.bytes_copied) == (1, len(LINE))
    assert tree.stored("alice", "s.jsonl").read_bytes() == LINE
    still_hot = reconcile(tree.config(), now=lambda: m + 2)
    assert (still_hot.files_copied, still_hot.files_skipped) == (0, 1)
    quiet = reconcile(tree.config(), now=lambda: m + 10)
    assert (quiet.files_copied, quiet.bytes_copied) == (1, len(LINE) + 6)
    assert tree.stored("alice", "s.jsonl").read_bytes() == LINE + b'{"half'


@root_only
def test_which_homes_qualify(tree: Tree) -> None:
    for name, uid in [
        ("low", 999),
        ("first", 1000),
        ("last", 60000),
        ("high", 60001),
        ("rooty", 0),
        (".hidden", 1500),
        ("excluded", 1501),
        ("ok", 1502),
    ]:
        tree.add_user(name, uid)
        tree.write(name, "s.jsonl", LINE)
    (tree.home_root / "alias").symlink_to(tree.home_root / "ok")  # same home, other name
    (tree.home_root / "plainfile").write_bytes(b"not a home")
    os.chown(tree.home_root / "plainfile", 1503, 1503)
    tree.add_user("nosessions", 1504, sessions_dir=False)
    tree.add_user("empty", 1505)
    config = tree.config(min_uid=1000, max_uid=60000, exclude_users=frozenset({"excluded"}))
    stats = reconcile(config)
    assert sorted(os.listdir(tree.target)) == ["first", "last", "ok"]
    assert stats.users_processed == 3
    assert stats.files_copied == 3


def test_custom_sessions_subdir(tree: Tree) -> None:
    u = tree.add_user("alice")
    other = u.home / ".claude" / "projects"
    other.mkdir(parents=True)
    if IS_ROOT:
        os.chown(u.home / ".claude", u.uid, u.gid)
        os.chown(other, u.uid, u.gid)
    (other / "p.jsonl").write_bytes(LINE)
    if IS_ROOT:
        os.chown(other / "p.jsonl", u.uid, u.gid)
    tree.write("alice", "s.jsonl", LINE)
    reconcile(tree.config(sessions_subdir=".claude/projects"))
    assert stored_tree(tree) == {"alice/p.jsonl": LINE}


@root_only
def test_every_hostile_entry_is_refused_with_one_warning_and_the_pass_goes_on(
    tree: Tree, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="session_watcher")
    alice = tree.add_user("alice")
    bob = tree.add_user("bob")
    tree.write("alice", "good.jsonl", LINE)
    tree.write("bob", "good.jsonl", LINE * 2)
    secret = tree.base / "secret"
    secret.write_bytes(b"root:$6$hash\n")
    secret.chmod(0o600)
    s = alice.sessions

    def own(p: Path, uid: int = alice.uid) -> None:
        os.chown(p, uid, uid, follow_symlinks=False)

    (s / "evil.jsonl").symlink_to("/etc/shadow")
    own(s / "evil.jsonl")
    (s / "secret.jsonl").symlink_to(secret)
    own(s / "secret.jsonl")
    os.mkfifo(s / "x.jsonl")
    own(s / "x.jsonl")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(s / "sock.jsonl"))
    own(s / "sock.jsonl")
    (s / "dir.jsonl").mkdir()
    own(s / "dir.jsonl")
    (s / "foreign.jsonl").write_bytes(LINE)
    own(s / "foreign.jsonl", bob.uid)
    os.link(secret, s / "hard.jsonl")  # a hard link to a root-owned file
    tree.write_fast("alice", "big.jsonl", LINE * (4096 // len(LINE) + 1))
    with open(s / "sparse.jsonl", "wb") as f:
        f.truncate(1 << 40)  # 1 TiB, no blocks: refused on its size, never read
    own(s / "sparse.jsonl")
    hostile = {
        "evil.jsonl": "a symlink",
        "secret.jsonl": "a symlink",
        "x.jsonl": "a FIFO",
        "sock.jsonl": "a socket",
        "dir.jsonl": "a directory",
        "foreign.jsonl": f"owned by uid {bob.uid}",
        "hard.jsonl": "owned by uid 0",
        "big.jsonl": "over the limit of 4096",
        "sparse.jsonl": "over the limit of 4096",
    }
    stats = reconcile(tree.config(max_file_bytes=4096))
    assert counts(stats) == {
        "users_processed": 2,
        "files_copied": 2,
        "files_skipped": 0,
        "files_refused": len(hostile),
        "files_failed": 0,
        "bytes_copied": 3 * len(LINE),
    }
    assert stored_tree(tree) == {"alice/good.jsonl": LINE, "bob/good.jsonl": LINE * 2}
    # One WARNING per user and kind (symlink, fifo, socket, directory, owner, size); the
    # repeats of a kind are at DEBUG, each naming its entry and reason.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(getattr(r, "reason", "") for r in warnings) == sorted(
        ["symlink", "fifo", "socket", "directory", "owner", "size"]
    )
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    for name, reason in hostile.items():
        (line,) = [w for w in refused if f"'alice/{name}'" in w]
        assert reason in line
    assert secret.read_bytes() == b"root:$6$hash\n"


@root_only
@pytest.mark.parametrize("how", ["symlinked sessions", "symlinked user", "foreign user dir"])
def test_unsafe_walk_refuses_the_user_once_and_other_users_go_on(
    tree: Tree, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    alice = tree.add_user("alice", sessions_dir=False)
    bob = tree.add_user("bob")
    tree.write("bob", "b.jsonl", LINE)
    if how == "symlinked sessions":
        # alice's sessions directory points at bob's: copying it would leak bob's transcripts
        # into alice's store directory.
        (alice.home / "user").mkdir()
        os.chown(alice.home / "user", alice.uid, alice.gid)
        (alice.home / "user" / "sessions").symlink_to(bob.sessions)
        os.chown(alice.home / "user" / "sessions", alice.uid, alice.gid, follow_symlinks=False)
    elif how == "symlinked user":
        (alice.home / "user").symlink_to(bob.home / "user")
        os.chown(alice.home / "user", alice.uid, alice.gid, follow_symlinks=False)
    else:
        (alice.home / "user" / "sessions").mkdir(parents=True)
        os.chown(alice.home / "user", bob.uid, bob.gid)  # someone else's component
        os.chown(alice.home / "user" / "sessions", alice.uid, alice.gid)
        (alice.home / "user" / "sessions" / "a.jsonl").write_bytes(LINE)
        os.chown(alice.home / "user" / "sessions" / "a.jsonl", alice.uid, alice.gid)
    stats = reconcile(tree.config())
    assert stored_tree(tree) == {"bob/b.jsonl": LINE}
    assert (stats.users_processed, stats.files_copied, stats.files_refused) == (1, 1, 0)
    assert stats.files_failed == 0
    warnings = log_lines(caplog.records, logging.WARNING)
    assert len(warnings) == 1
    assert "refused user 'alice'" in warnings[0]


@root_only
def test_root_owned_walk_components_are_allowed(tree: Tree) -> None:
    alice = tree.add_user("alice")
    os.chown(alice.home / "user", 0, 0)  # e.g. provisioned by an admin
    tree.write("alice", "a.jsonl", LINE)
    assert reconcile(tree.config()).files_copied == 1


def test_symlinked_store_user_dir_is_never_followed(
    tree: Tree, caplog: pytest.LogCaptureFixture
) -> None:
    tree.add_user("alice")
    tree.add_user("bob")
    tree.write("alice", "a1.jsonl", LINE)
    tree.write("alice", "a2.jsonl", LINE)
    tree.write("bob", "b.jsonl", LINE)
    elsewhere = tree.base / "elsewhere"
    elsewhere.mkdir()
    tree.target.mkdir()
    (tree.target / "alice").symlink_to(elsewhere)
    stats = reconcile(tree.config())
    assert os.listdir(elsewhere) == []
    assert (tree.target / "alice").is_symlink()
    assert (tree.target / "bob" / "b.jsonl").read_bytes() == LINE
    # alice's files were not delivered: failures (exit 1), reported once for the directory.
    assert (stats.files_copied, stats.files_failed) == (1, 2)
    problems = log_lines(caplog.records, logging.ERROR) + log_lines(caplog.records, logging.WARNING)
    assert len(problems) == 1
    assert "'alice'" in problems[0] and "symlink" in problems[0]


def test_symlinked_store_root_fails_the_pass(tree: Tree) -> None:
    tree.add_user("alice")
    tree.write("alice", "a.jsonl", LINE)
    real = tree.base / "real-store"
    real.mkdir()
    tree.target.symlink_to(real)
    with pytest.raises(OSError, match="symlink"):
        reconcile(tree.config())
    assert os.listdir(real) == []


def test_odd_names_are_copied_byte_exact_and_logged_escaped(
    tree: Tree, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="session_watcher")  # every copy's line
    u = tree.add_user("alice")
    names = [b"new\nline.jsonl", b"bad\xff\xfe.jsonl", b"-rf.jsonl", b"with space.jsonl"]
    for i, n in enumerate(names):
        tree.write("alice", os.fsdecode(n), LINE * (i + 1))
    reconcile(tree.config())
    assert sorted(os.listdir(os.fsencode(tree.target / "alice"))) == sorted(names)
    for i, n in enumerate(names):
        assert (tree.target / "alice" / os.fsdecode(n)).read_bytes() == LINE * (i + 1)
        assert (u.sessions / os.fsdecode(n)).read_bytes() == LINE * (i + 1)
    messages = [r.getMessage() for r in caplog.records]
    assert all("\n" not in m for m in messages)
    copied = [m for m in messages if m.startswith("copied ")]
    assert len(copied) == 4
    assert any("'alice/new\\x0aline.jsonl'" in m for m in copied)
    assert any("'alice/bad\\xff\\xfe.jsonl'" in m for m in copied)
    assert any("'alice/-rf.jsonl'" in m for m in copied)


def test_odd_name_refusal_is_logged_escaped(tree: Tree, caplog: pytest.LogCaptureFixture) -> None:
    u = tree.add_user("alice")
    link = u.sessions / "x\nWARNING forged.jsonl"
    link.symlink_to("/etc/shadow")
    os.chown(link, u.uid, u.gid, follow_symlinks=False)
    assert reconcile(tree.config()).files_refused == 1
    (w,) = log_lines(caplog.records, logging.WARNING)
    assert "\n" not in w and "'alice/x\\x0aWARNING forged.jsonl'" in w


def test_store_modes_and_group(tree: Tree) -> None:
    tree.add_user("alice")
    src = tree.write("alice", "a.jsonl", LINE)
    reconcile(tree.config())
    st = os.stat(tree.stored("alice", "a.jsonl"))
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, TEST_GID)
    assert st.st_mtime_ns == os.stat(src).st_mtime_ns
    for d in (tree.target, tree.target / "alice"):
        assert (stat.S_IMODE(os.stat(d).st_mode), os.stat(d).st_gid) == (0o2770, TEST_GID)


def test_missing_group_warns_once_per_pass_and_carries_on(
    tree: Tree, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("alice", "bob"):
        tree.add_user(name)
        tree.write(name, "a.jsonl", LINE)
        tree.write(name, "b.jsonl", LINE)
    stats = reconcile(tree.config(group="no-such-group-sw"))
    assert (stats.files_copied, stats.files_failed) == (4, 0)
    assert log_lines(caplog.records, logging.WARNING) == [
        "group 'no-such-group-sw' not found, using default group"
    ]
    assert stat.S_IMODE(os.stat(tree.stored("bob", "b.jsonl")).st_mode) == 0o640


def test_stale_temps_are_removed_at_the_start_of_a_pass(tree: Tree) -> None:
    tree.add_user("alice")
    tree.write("alice", "a.jsonl", LINE)
    reconcile(tree.config())
    crashed = tree.target / "alice" / f"{TEMP_PREFIX}deadbeefdeadbeef.tmp"
    crashed.write_bytes(b"half a cop")
    born = tree.target / "alice" / f"{TEMP_PREFIX}0123456789abcdef.tmp"
    born.write_bytes(b"")
    reconcile(tree.config())
    assert not crashed.exists()  # data and no lock: its copier is dead, whatever its age
    assert born.exists()  # empty and fresh: it may be a copy between its create and flock
    reconcile(tree.config(), now=lambda: time.time() + ORPHAN_TEMP_SECONDS + 1)
    assert not born.exists()
    assert sorted(os.listdir(tree.target / "alice")) == ["a.jsonl"]


def _mixed_tree(tree: Tree) -> None:
    """New, grown, up-to-date, hot and refused entries for two users."""
    tree.add_user("alice")
    tree.add_user("bob")
    tree.write("alice", "same.jsonl", LINE)
    tree.write("alice", "grows.jsonl", LINE)
    tree.write("bob", "shrinks.jsonl", LINE * 3)
    reconcile(tree.config())
    tree.write("alice", "grows.jsonl", LINE, append=True)
    tree.write("alice", "new.jsonl", LINE * 2)
    tree.write("bob", "hot.jsonl", LINE + b"{", mtime=time.time() + 3600)
    os.truncate(tree.source("bob", "shrinks.jsonl"), len(LINE))
    (tree.user("bob").sessions / "evil.jsonl").symlink_to("/etc/shadow")


def test_dry_run_writes_nothing_and_counts_what_a_real_pass_does(
    tree: Tree, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="session_watcher")
    _mixed_tree(tree)
    (tree.target / "alice" / f"{TEMP_PREFIX}0000000000000000.tmp").write_bytes(b"x")
    os.chmod(tree.target / "alice", 0o700)  # a real pass would fix this mode
    before = snapshot(tree.target)
    caplog.clear()
    dry = reconcile(tree.config(), dry_run=True, now=lambda: time.time() + 2 * 3600)
    assert snapshot(tree.target) == before
    would = [r.getMessage() for r in caplog.records if r.getMessage().startswith("would copy")]
    assert len(would) == dry.files_copied == 4
    real = reconcile(tree.config(), now=lambda: time.time() + 2 * 3600)
    assert counts(dry) == counts(real)
    assert snapshot(tree.target) != before


def test_dry_run_does_not_create_the_store(tree: Tree) -> None:
    tree.add_user("alice")
    tree.write("alice", "a.jsonl", LINE)
    dry = reconcile(tree.config(), dry_run=True)
    assert not tree.target.exists()
    assert not os.path.lexists(tree.target)
    real = reconcile(tree.config())
    assert counts(dry) == counts(real)
    assert tree.stored("alice", "a.jsonl").read_bytes() == LINE


def test_on_result_sees_every_file(tree: Tree) -> None:
    tree.add_user("alice")
    tree.write("alice", "a.jsonl", LINE)
    tree.write("alice", "b.jsonl", LINE + b"{")  # hot: just written
    seen: dict[str, tuple[str, float | None]] = {}
    reconcile(
        tree.config(),
        on_result=lambda src, name, r: seen.__setitem__(
            f"{src.user}/{name}", (r.outcome.value, r.recheck_at)
        ),
    )
    assert seen["alice/a.jsonl"] == ("copied", None)
    outcome, recheck = seen["alice/b.jsonl"]
    assert outcome == "copied" and recheck is not None and recheck > time.time()


def test_missing_home_root_raises(tree: Tree) -> None:
    with pytest.raises(FileNotFoundError):
        reconcile(tree.config(home_root=tree.base / "absent"))
    assert not tree.target.exists()


def test_an_io_error_on_one_home_does_not_end_the_pass(
    tree: Tree, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # EIO/ESTALE (a failing disk, a network home) cannot be made on a local tmp tree: fake
    # only that boundary, for alice's `user` component.
    from session_watcher import homes, safefs

    real = safefs.open_dir_at

    def open_dir_at(parent_fd: int, name: str) -> tuple[int, os.stat_result]:
        if name == "user" and os.readlink(f"/proc/self/fd/{parent_fd}").endswith("/alice"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(parent_fd, name)

    monkeypatch.setattr(homes, "open_dir_at", open_dir_at)
    for name in ("alice", "bob"):
        tree.add_user(name)
        tree.write(name, "s.jsonl", LINE)
    stats = reconcile(tree.config())
    assert stored_tree(tree) == {"bob/s.jsonl": LINE}
    assert (stats.users_processed, stats.files_copied) == (1, 1)
    (error,) = log_lines(caplog.records, logging.ERROR)
    assert "'alice'" in error and "EIO" in error


def test_pass_stats_count_a_vanished_source_as_skipped() -> None:
    from session_watcher.copy import Outcome, Result

    stats = PassStats()
    for r in [
        Result(Outcome.COPIED, nbytes=10),
        Result(Outcome.COPIED, nbytes=5),
        Result(Outcome.SKIPPED),
        Result(Outcome.VANISHED),
        Result(Outcome.REFUSED, detail="a FIFO"),
        Result(Outcome.FAILED, errno=28),
    ]:
        stats.record(r)
    assert counts(stats) == {
        "users_processed": 0,
        "files_copied": 2,
        "files_skipped": 2,
        "files_refused": 1,
        "files_failed": 1,
        "bytes_copied": 15,
    }


@pytest.mark.parametrize("workers", [1, 3])
def test_a_store_side_stat_error_fails_that_file_alone(
    tree: Tree, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """Issue 10, defect 1: an OSError from the target's lstat (EIO; ENAMETOOLONG where the
    store's file system takes shorter names than the home's) escaped `quick_skip`. With the
    pool it ended the whole pass (no sweep, exit 1); without it the user's remaining files
    went uncounted. Neither error can be made on a local tmp tree: only the store-side
    boundary, `UserStore.lstat`, is faked, for one name."""
    from session_watcher.store import Store, UserStore

    real_lstat = UserStore.lstat

    def lstat(self: UserStore, name: str) -> os.stat_result | None:
        if name == "bad.jsonl":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_lstat(self, name)

    real_sweep = Store.remove_stale_temps
    swept: list[str] = []

    def remove_stale_temps(self: Store, dir_fd: int, user: str, now: float | None = None) -> int:
        swept.append(user)
        return real_sweep(self, dir_fd, user, now)

    monkeypatch.setattr(UserStore, "lstat", lstat)
    monkeypatch.setattr(Store, "remove_stale_temps", remove_stale_temps)
    tree.add_user("alice")
    tree.add_user("bob")
    good = [f"s{i}.jsonl" for i in range(6)]
    for name in [*good, "bad.jsonl"]:  # scandir order decides which come after bad.jsonl
        tree.write("alice", name, LINE)
    tree.write("bob", "b.jsonl", LINE)
    (tree.target / "gone").mkdir(parents=True)  # a store directory whose home has gone

    stats = reconcile(tree.config(workers=workers))

    assert counts(stats) == {
        "users_processed": 2,
        "files_copied": 7,
        "files_skipped": 0,
        "files_refused": 0,
        "files_failed": 1,
        "bytes_copied": 7 * len(LINE),
    }
    assert stored_tree(tree) == {
        **{f"alice/{name}": LINE for name in good},
        "bob/b.jsonl": LINE,
    }
    assert "gone" in swept  # the pass went on to its sweep of the other store directories


def _flood_beside_quiet(tree: Tree, files: int) -> ByteBudget:
    """User "flood" with `files` transcripts to copy, "quiet" with one; a budget of 10
    copies (then 1 a second) on a clock that does not move."""
    tree.add_user("flood")
    tree.add_user("quiet")
    for i in range(files):
        tree.write("flood", f"f{i:03d}.jsonl", LINE)
    tree.write("quiet", "q.jsonl", LINE)
    return ByteBudget(rate=1e6, burst=16e6, copies=1.0, copies_burst=10, clock=lambda: 1000.0)


def test_a_pass_given_a_byte_budget_copies_within_it_and_holds_back_the_rest(
    tree: Tree,
) -> None:
    """The service's passes share each user's live budget: a user who renamed in
    thousands of files gets their copies paced, not a pass at disk speed; the rest come
    back SKIPPED with a time to look again, and other users are not held."""
    budget = _flood_beside_quiet(tree, 40)
    held: list[tuple[str, float]] = []

    def on_result(source: SourceDir, name: str, result: Result) -> None:
        if result.outcome is Outcome.SKIPPED:
            assert result.recheck_at is not None
            held.append((name, result.recheck_at))

    t0 = time.time()
    stats = reconcile(tree.config(), admit=budget.admit, on_result=on_result)
    stored = stored_tree(tree)
    assert sum(1 for k in stored if k.startswith("flood/")) == 10  # the burst, no more
    assert "quiet/q.jsonl" in stored  # its own budget
    assert stats.files_copied == 11 and len(held) == 30
    assert all(at > t0 for _, at in held)
    # Without a budget (a cold start) the pass copies the rest at once.
    rest = reconcile(tree.config())
    assert rest.files_copied == 30


def test_a_pass_stops_walking_a_user_whose_held_back_files_have_nowhere_to_go(
    tree: Tree,
) -> None:
    """Past the budget, each file is handed to the live queue until it is full for that
    user: then the walk of that user ends (200,000 files renamed in cost a walk as far as
    the queue's bound, not of the whole directory), the others go on, and the queue owes
    the user a pass once it has taken what it holds."""
    budget = _flood_beside_quiet(tree, 200)
    owed: list[object] = []
    queue = WorkQueue(lambda key, trigger: None, max_pending_per_user=25, on_shed=owed.append)

    def on_result(source: SourceDir, name: str, result: Result) -> None:
        if result.outcome is Outcome.SKIPPED:
            queue.submit((source.user, name))

    stats = reconcile(
        tree.config(workers=1), admit=budget.admit, on_result=on_result, held_full=queue.owe
    )
    assert stats.files_copied == 11  # flood's burst of 10, quiet's one
    assert queue.pending("flood") == 25  # handed on up to the bound; then the walk ended
    assert "quiet/q.jsonl" in stored_tree(tree)
    assert not queue.submit(("flood", "late"))  # owed: shed until the queue has drained
    queue.start()
    try:
        wait_for(lambda: owed == ["flood"], what="the pass owed once the queue drained")
    finally:
        assert queue.stop(5.0)
