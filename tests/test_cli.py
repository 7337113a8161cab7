"""`session-watcher reconcile` as an operator runs it: a real process, real trees, exit codes."""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import IS_ROOT, STATS_KEYS, TEST_GID, TEST_GROUP, Tree, cli_env, root_only, run_cli

from session_watcher import __version__
from session_watcher.store import TEMP_PREFIX

LINE = b'{"type":"user","message":"hi"}\n'
LOG_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    r"session_watcher[\w.]*: (.*)"
)


def log_of(stderr: str) -> list[tuple[str, str]]:
    """(level, message) per stderr line; every line must be one whole log record, so a
    name cannot have split or forged a line, and there is no traceback."""
    out = []
    for line in stderr.splitlines():
        m = LOG_LINE.fullmatch(line)
        assert m, f"not a log line: {line!r}"
        out.append((m.group(1), m.group(2)))
    return out


def messages(stderr: str, level: str) -> list[str]:
    return [msg for lvl, msg in log_of(stderr) if lvl == level]


def counts_of(stdout: str) -> dict[str, int]:
    (line,) = stdout.splitlines()
    d = json.loads(line)
    assert set(d) == STATS_KEYS
    del d["duration_s"]
    return dict(d)


def uid_args(tree: Tree) -> list[str]:
    """Not as root every "user" is us, whose uid may be below the default range."""
    return [] if IS_ROOT else ["--min-uid", str(tree.min_uid())]


def test_acceptance_two_users_with_hostile_entries(tree: Tree) -> None:
    """The issue's acceptance run: a symlink to /etc/shadow and a FIFO among real files."""
    alice = tree.add_user("alice")
    bob = tree.add_user("bob")
    tree.write("alice", "a.jsonl", LINE)
    tree.write("alice", "b.jsonl", LINE * 2)
    tree.write("bob", "c.jsonl", LINE * 3)
    (alice.sessions / "evil.jsonl").symlink_to("/etc/shadow")
    os.mkfifo(bob.sessions / "x.jsonl")
    if IS_ROOT:
        os.chown(alice.sessions / "evil.jsonl", alice.uid, alice.gid, follow_symlinks=False)
        os.chown(bob.sessions / "x.jsonl", bob.uid, bob.gid)
    args = ["reconcile", "--home-root", str(tree.home_root), "--target", str(tree.target)]
    first = run_cli(*args, "--json", *uid_args(tree))
    assert first.returncode == 0, first.stderr
    assert counts_of(first.stdout) == {
        "users_processed": 2,
        "files_copied": 3,
        "files_skipped": 0,
        "files_refused": 2,
        "files_failed": 0,
        "bytes_copied": 6 * len(LINE),
    }
    for user, name, data in [("alice", "a.jsonl", LINE), ("alice", "b.jsonl", LINE * 2)]:
        assert tree.stored(user, name).read_bytes() == data
    assert tree.stored("bob", "c.jsonl").read_bytes() == LINE * 3
    assert sorted(os.listdir(tree.target / "alice")) == ["a.jsonl", "b.jsonl"]
    assert sorted(os.listdir(tree.target / "bob")) == ["c.jsonl"]
    for p in (tree.target / "alice").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o640
    warnings = messages(first.stderr, "WARNING")
    assert sum("'alice/evil.jsonl'" in w and "a symlink" in w for w in warnings) == 1
    assert sum("'bob/x.jsonl'" in w and "a FIFO" in w for w in warnings) == 1
    assert "group 'data-ops' not found, using default group" in warnings  # no such group here
    assert len(warnings) == 3
    assert messages(first.stderr, "ERROR") == []

    second = run_cli(*args, "--json", *uid_args(tree))
    assert second.returncode == 0, second.stderr
    assert counts_of(second.stdout) == {
        "users_processed": 2,
        "files_copied": 0,
        "files_skipped": 3,
        "files_refused": 2,
        "files_failed": 0,
        "bytes_copied": 0,
    }


def test_summary_line_and_no_json_without_the_flag(tree: Tree) -> None:
    tree.add_user("alice")
    tree.write("alice", "a.jsonl", LINE)
    r = run_cli("reconcile", *tree.cli_args())
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    (summary,) = [m for m in messages(r.stderr, "INFO") if m.startswith("pass done")]
    assert "1 users, 1 copied, 0 skipped, 0 refused, 0 failed" in summary
    quiet = run_cli("reconcile", *tree.cli_args("--log-level", "WARNING"))
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_a_failed_file_exits_1_with_one_error_line(tree: Tree) -> None:
    tree.add_user("alice")
    tree.write("alice", "a.jsonl", LINE)
    tree.write("alice", "b.jsonl", LINE)
    (tree.target / "alice" / "b.jsonl").mkdir(parents=True)  # the store is in the way
    r = run_cli("reconcile", *tree.cli_args("--json"))
    assert r.returncode == 1
    c = counts_of(r.stdout)
    assert (c["files_copied"], c["files_failed"]) == (1, 1)
    (error,) = messages(r.stderr, "ERROR")
    assert "'alice/b.jsonl'" in error and "EISDIR" in error


@root_only
def test_enospc_exits_1_leaves_no_temp_file_and_no_traceback(
    tree: Tree, tmpfs: Callable[[Path, str], Path]
) -> None:
    tmpfs(tree.base / "small", "1m")
    target = tree.base / "small" / "store"
    tree.add_user("alice")
    tree.write_fast("alice", "big.jsonl", LINE * (2 * 1024 * 1024 // len(LINE)))
    tree.write("alice", "small.jsonl", LINE)
    r = run_cli("reconcile", *tree.cli_args("--json", "--target", str(target)))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    # One ERROR line for the user's ENOSPC however many files hit it (rate-limited per user
    # and kind). Copies run side by side, so the small one may fail too while the big one's
    # temp file fills the store: which is a race, that nothing is left behind is not.
    (error,) = messages(r.stderr, "ERROR")  # log_of also proves every line is a log record
    assert "ENOSPC" in error
    c = counts_of(r.stdout)
    assert c["files_failed"] >= 1 and c["files_copied"] + c["files_failed"] == 2
    assert set(os.listdir(target / "alice")) <= {"small.jsonl"}  # no temp file, no big one


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["reconcile", "--bogus"], "--bogus"),
        (["reconcile", "--min-uid", "abc"], "--min-uid"),
        (["reconcile", "--max-file-bytes", "1.5"], "--max-file-bytes"),
        (["reconcile", "--settle", "soon"], "--settle"),
        (["reconcile", "--settle", "-1"], "settle"),
        (["reconcile", "--file-mode", "999"], "--file-mode"),
        (["reconcile", "--dir-mode", "rwx"], "--dir-mode"),
        (["reconcile", "--file-mode", "4755"], "setuid"),
        (["reconcile", "--min-uid", "2000", "--max-uid", "1000"], "min uid"),
        (["reconcile", "--log-level", "LOUD"], "LOUD"),
        (["reconcile", "--workers", "0"], "workers"),  # it sizes the pass's copy threads
        (["reconcile", "--home-root", "relative/home"], "absolute"),
        (["reconcile", "--sessions-subdir", "../etc"], "sessions subdir"),
        (["reconcile", "--home-root", "{base}/absent"], "absent"),
        (["reconcile", "--home-root", "{base}/file"], "not a directory"),
        (["frobnicate"], "frobnicate"),
        ([], "required"),
    ],
)
def test_usage_and_configuration_errors_exit_2_with_one_line(
    tree: Tree, argv: list[str], needle: str
) -> None:
    (tree.base / "file").write_bytes(b"")
    argv = [a.replace("{base}", str(tree.base)) for a in argv]
    if argv and argv[0] == "reconcile" and "--home-root" not in argv:
        argv += ["--home-root", str(tree.home_root)]
    if argv and argv[0] == "reconcile":
        argv += ["--target", str(tree.target)]
    r = run_cli(*argv)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("session-watcher") and "error" in lines[0]
    assert needle in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not tree.target.exists()


def test_bad_environment_value_exits_2_naming_the_variable(tree: Tree) -> None:
    r = run_cli(
        "reconcile",
        "--home-root",
        str(tree.home_root),
        env={"SESSION_WATCHER_MAX_UID": "lots", "SESSION_WATCHER_TARGET": str(tree.target)},
    )
    assert r.returncode == 2
    (line,) = r.stderr.splitlines()
    assert "SESSION_WATCHER_MAX_UID" in line
    assert not tree.target.exists()


def test_environment_is_used_when_no_flag_and_a_flag_wins(tree: Tree) -> None:
    tree.add_user("alice")
    tree.add_user("bob")
    tree.write("alice", "a.jsonl", LINE)
    tree.write("bob", "b.jsonl", LINE)
    env = {
        "SESSION_WATCHER_HOME_ROOT": str(tree.base / "absent"),  # the flag below wins
        "SESSION_WATCHER_TARGET": str(tree.target),
        "SESSION_WATCHER_GROUP": TEST_GROUP,
        "SESSION_WATCHER_FILE_MODE": "0604",
        "SESSION_WATCHER_MIN_UID": str(tree.min_uid()),
        "SESSION_WATCHER_EXCLUDE_USER": "bob",
    }
    r = run_cli("reconcile", "--home-root", str(tree.home_root), "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert counts_of(r.stdout)["files_copied"] == 1
    st = tree.stored("alice", "a.jsonl").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o604, TEST_GID)
    assert not (tree.target / "bob").exists()
    # Without the flag the environment's (absent) home root is used: a usage error.
    r = run_cli("reconcile", env=env)
    assert r.returncode == 2 and "absent" in r.stderr


def test_exclude_user_is_repeatable(tree: Tree) -> None:
    for name in ("alice", "bob", "carol"):
        tree.add_user(name)
        tree.write(name, "s.jsonl", LINE)
    r = run_cli("reconcile", *tree.cli_args("--exclude-user", "alice", "--exclude-user", "carol"))
    assert r.returncode == 0, r.stderr
    assert os.listdir(tree.target) == ["bob"]


@root_only
def test_uid_range_flags(tree: Tree) -> None:
    for name in ("u1000", "u1001", "u1002"):
        tree.add_user(name)  # uids 1000, 1001, 1002
        tree.write(name, "s.jsonl", LINE)
    r = run_cli("reconcile", *tree.cli_args("--min-uid", "1001", "--max-uid", "1001"))
    assert r.returncode == 0, r.stderr
    assert os.listdir(tree.target) == ["u1001"]


def test_settle_flag_decides_when_a_half_line_goes_in(tree: Tree) -> None:
    tree.add_user("alice")
    past = time.time() - 1  # changed a second ago
    tree.write("alice", "s.jsonl", LINE + b'{"half', mtime=past)
    hot = run_cli("reconcile", *tree.cli_args("--settle", "3600"))
    assert hot.returncode == 0, hot.stderr
    assert tree.stored("alice", "s.jsonl").read_bytes() == LINE
    quiet = run_cli("reconcile", *tree.cli_args("--settle", "0"))
    assert quiet.returncode == 0, quiet.stderr
    assert tree.stored("alice", "s.jsonl").read_bytes() == LINE + b'{"half'


def test_modes_and_group_flags(tree: Tree) -> None:
    tree.add_user("alice")
    tree.write("alice", "s.jsonl", LINE)
    r = run_cli("reconcile", *tree.cli_args("--file-mode", "600", "--dir-mode", "0o750"))
    assert r.returncode == 0, r.stderr
    f, d = tree.stored("alice", "s.jsonl").stat(), (tree.target / "alice").stat()
    assert (stat.S_IMODE(f.st_mode), f.st_gid) == (0o600, TEST_GID)
    assert (stat.S_IMODE(d.st_mode), d.st_gid) == (0o750, TEST_GID)


def test_max_file_bytes_refuses_large_and_sparse_files(tree: Tree) -> None:
    u = tree.add_user("alice")
    tree.write("alice", "small.jsonl", LINE)
    tree.write_fast("alice", "big.jsonl", LINE * 100)
    with open(u.sessions / "sparse.jsonl", "wb") as f:
        f.truncate(1 << 40)
    if IS_ROOT:
        os.chown(u.sessions / "sparse.jsonl", u.uid, u.gid)
    r = run_cli("reconcile", *tree.cli_args("--max-file-bytes", "1000", "--json"))
    assert r.returncode == 0, r.stderr
    c = counts_of(r.stdout)
    assert (c["files_copied"], c["files_refused"]) == (1, 2)
    warnings = messages(r.stderr, "WARNING")
    # One line per user and kind (the second "size" refusal is counted, not printed).
    assert len(warnings) == 1 and "over the limit of 1000" in warnings[0]
    assert os.listdir(tree.target / "alice") == ["small.jsonl"]


def test_dry_run_writes_nothing_and_reports_what_a_pass_would_do(tree: Tree) -> None:
    u = tree.add_user("alice")
    tree.write("alice", "a.jsonl", LINE)
    tree.write("alice", "b.jsonl", LINE * 2)
    (u.sessions / "evil.jsonl").symlink_to("/etc/shadow")
    dry = run_cli("reconcile", *tree.cli_args("--dry-run", "--json"))
    assert dry.returncode == 0, dry.stderr
    assert not os.path.lexists(tree.target)
    would = [m for m in messages(dry.stderr, "INFO") if m.startswith("would copy")]
    assert len(would) == 2
    real = run_cli("reconcile", *tree.cli_args("--json"))
    assert real.returncode == 0, real.stderr
    assert counts_of(dry.stdout) == counts_of(real.stdout)
    assert counts_of(real.stdout)["files_copied"] == 2


def test_odd_names_are_logged_escaped_one_record_per_line(tree: Tree) -> None:
    u = tree.add_user("alice")
    tree.write("alice", "new\nline.jsonl", LINE)
    tree.write("alice", os.fsdecode(b"bad\xff.jsonl"), LINE)
    tree.write("alice", "-rf.jsonl", LINE)
    (u.sessions / "x\nERROR forged.jsonl").symlink_to("/etc/shadow")
    # DEBUG: a user's copies after the first in a minute are logged there.
    r = run_cli("reconcile", *tree.cli_args("--log-level", "DEBUG"))
    assert r.returncode == 0, r.stderr
    infos = messages(r.stderr, "INFO") + messages(r.stderr, "DEBUG")  # one record a line
    assert any("'alice/new\\x0aline.jsonl'" in m for m in infos)
    assert any("'alice/bad\\xff.jsonl'" in m for m in infos)
    assert any("'alice/-rf.jsonl'" in m for m in infos)
    (w,) = messages(r.stderr, "WARNING")
    assert "'alice/x\\x0aERROR forged.jsonl'" in w
    assert sorted(os.listdir(os.fsencode(tree.target / "alice"))) == sorted(
        [b"new\nline.jsonl", b"bad\xff.jsonl", b"-rf.jsonl"]
    )


def test_temp_files_of_a_crash_are_swept_but_not_those_of_a_live_copy(tree: Tree) -> None:
    tree.add_user("alice")
    tree.write("alice", "s.jsonl", LINE)
    assert run_cli("reconcile", *tree.cli_args()).returncode == 0
    live = tree.target / "alice" / f"{TEMP_PREFIX}00000000000000aa.tmp"
    dead = tree.target / "alice" / f"{TEMP_PREFIX}00000000000000bb.tmp"
    dead.write_bytes(b"half a cop")
    with live.open("wb") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a copy in flight holds it
        f.write(b"in flight")
        f.flush()
        assert run_cli("reconcile", *tree.cli_args()).returncode == 0
    assert live.exists()
    assert not dead.exists()


def test_version_via_python_m() -> None:
    r = run_cli("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"session-watcher {__version__}"


def test_console_script_runs_the_same_main(tree: Tree) -> None:
    script = Path(sys.executable).with_name("session-watcher")
    if not script.exists():
        pytest.skip("package not installed with its console script in this environment")
    r = subprocess.run(
        [str(script), "reconcile", *tree.cli_args("--json")],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=30,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert counts_of(r.stdout)["files_copied"] == 0


def test_reconcile_workers_sizes_the_pass_copy_threads(tree: Tree) -> None:
    """Issue 10, defect 8: `workers` also sizes the pass's copy threads, but only `run`
    took `--workers`."""
    tree.add_user("alice")
    for i in range(3):
        tree.write("alice", f"s{i}.jsonl", LINE)
    r = run_cli("reconcile", *tree.cli_args("--workers", "1", "--json"))
    assert r.returncode == 0, r.stderr
    assert counts_of(r.stdout)["files_copied"] == 3
