"""`session-watcher status`: in sync, missing, stale, hostile trees; exit codes; the
service's view from its state file. Real trees with real owners, the real CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from helpers import Tree, root_only, run_cli, snapshot

from session_watcher import reconcile
from session_watcher.status import Unsynced, classify, lagging, pid_alive, scan, service_state

OLD = time.time() - 1000  # a source changed long ago: past any grace


def _st(mode: int = 0o100600, size: int = 10, mtime_ns: int = 5, uid: int = 1000) -> Any:
    # (mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime, 3 float times, 3 ns times)
    fields = [mode, 1, 1, 1, uid, uid, size, 0, 0, 0, 0.0, 0.0, 0.0, 0, mtime_ns, 0]
    return os.stat_result(fields)


def status_json(tree: Tree, *extra: str) -> tuple[int, dict[str, Any]]:
    p = run_cli(
        "status", *tree.cli_args("--json", "--state-file", str(tree.base / "state.json"), *extra)
    )
    assert p.stderr == "" or "Traceback" not in p.stderr, p.stderr
    return p.returncode, json.loads(p.stdout)


# --- pure decisions -----------------------------------------------------------------------


def test_classify_is_the_copy_engines_rules() -> None:
    src = _st()
    assert classify(src, _st(), 1000, 1 << 30) == "in_sync"
    assert classify(src, None, 1000, 1 << 30) == "missing"
    assert classify(src, _st(size=9), 1000, 1 << 30) == "stale"
    assert classify(src, _st(mtime_ns=4), 1000, 1 << 30) == "stale"
    assert classify(src, _st(mode=0o120777), 1000, 1 << 30) == "stale"  # a link in the store
    assert classify(_st(mode=0o120777), None, 1000, 1 << 30) == "refused"  # symlink
    assert classify(_st(mode=0o010600), None, 1000, 1 << 30) == "refused"  # FIFO
    assert classify(_st(uid=0), None, 1000, 1 << 30) == "refused"  # foreign owner
    assert classify(_st(size=11), None, 1000, 10) == "refused"  # too large


def test_lagging_only_past_the_grace_most_behind_first() -> None:
    now = 10_000.0
    files = [
        Unsynced("a", "new.jsonl", "missing", now - 5),
        Unsynced("a", "old.jsonl", "stale", now - 500),
        Unsynced("b", "older.jsonl", "missing", now - 900),
    ]
    assert [(u.file, lag) for u, lag in lagging(files, now, 120)] == [
        ("older.jsonl", 900.0),
        ("old.jsonl", 500.0),
    ]
    assert lagging(files, now, 1000) == []
    assert len(lagging(files, now, 0)) == 3


# --- real trees ---------------------------------------------------------------------------


def test_in_sync_exits_0(tree: Tree) -> None:
    tree.add_user("alice")
    tree.add_user("bob")
    tree.write("alice", "a.jsonl", b'{"a":1}\n', mtime=OLD)
    tree.write("bob", "b.jsonl", b'{"b":1}\n', mtime=OLD)
    reconcile(tree.config())
    rc, doc = status_json(tree)
    assert rc == 0, doc
    assert doc["ok"] is True
    assert doc["totals"] == {"in_sync": 2, "missing": 0, "stale": 0, "refused": 0}
    assert [u["user"] for u in doc["users"]] == ["alice", "bob"]
    assert doc["lagging"] == []
    assert doc["service"] is None
    text = run_cli("status", *tree.cli_args())
    assert text.returncode == 0
    assert "OK: every file changed more than 120 s ago is in the store" in text.stdout


def test_missing_and_stale_past_grace_exit_1_naming_them(tree: Tree) -> None:
    tree.add_user("alice")
    tree.write("alice", "stale.jsonl", b"1\n", mtime=OLD - 100)
    tree.write("alice", "in.jsonl", b"1\n", mtime=OLD)
    reconcile(tree.config())
    tree.write("alice", "stale.jsonl", b"2\n", append=True, mtime=OLD)
    tree.write("alice", "missing.jsonl", b"1\n", mtime=OLD - 50)
    tree.write("alice", "fresh.jsonl", b"1\n")  # just written: within the grace
    before = snapshot(tree.target)
    rc, doc = status_json(tree)
    assert rc == 1
    assert doc["ok"] is False
    (alice,) = doc["users"]
    assert (alice["in_sync"], alice["missing"], alice["stale"]) == (1, 2, 1)
    assert alice["oldest_unsynced_age_s"] > 1000
    lag = {e["file"]: e for e in doc["lagging"]}
    assert set(lag) == {"stale.jsonl", "missing.jsonl"}
    assert lag["stale.jsonl"]["state"] == "stale"
    assert lag["missing.jsonl"]["state"] == "missing"
    assert lag["missing.jsonl"]["lag_s"] > lag["stale.jsonl"]["lag_s"] > 1000
    assert doc["unsynced_within_grace"] == 1
    text = run_cli("status", *tree.cli_args())
    assert text.returncode == 1
    assert "LAGGING: 2 file(s)" in text.stdout
    # OLD is set when the module is imported: its age grows with the suite's run time.
    assert re.search(r"'alice/missing\.jsonl'  missing, \d+ min \d\d s behind", text.stdout)
    assert re.search(r"'alice/stale\.jsonl'  stale, \d+ min \d\d s behind", text.stdout)
    # A grace longer than the oldest change: nothing lags (flag, or its environment variable).
    assert status_json(tree, "--grace", "50000")[0] == 0
    via_env = run_cli("status", *tree.cli_args(), env={"SESSION_WATCHER_GRACE": "50000"})
    assert via_env.returncode == 0, via_env.stdout
    flag_wins = run_cli(
        "status", *tree.cli_args("--grace", "1"), env={"SESSION_WATCHER_GRACE": "50000"}
    )
    assert flag_wins.returncode == 1
    assert snapshot(tree.target) == before  # copied nothing, changed nothing


def test_no_store_yet_is_all_missing_and_creates_nothing(tree: Tree) -> None:
    tree.add_user("alice")
    tree.write("alice", "a.jsonl", b"1\n", mtime=OLD)
    rc, doc = status_json(tree)
    assert rc == 1
    assert doc["totals"]["missing"] == 1
    assert not tree.target.exists()


@root_only
def test_hostile_tree_never_followed_nothing_opened(tree: Tree) -> None:
    alice = tree.add_user("alice")
    bob = tree.add_user("bob", sessions_dir=False)
    mallory = tree.add_user("mallory")
    tree.write("alice", "secret.jsonl", b"alice's secret\n", mtime=OLD)
    secret_dir = tree.base / "secret"
    secret_dir.mkdir()
    (secret_dir / "shadow.jsonl").write_bytes(b"root secret\n")
    # A FIFO as the target of a link: following the link and opening it would hang.
    fifo = tree.base / "trap.fifo"
    os.mkfifo(fifo)
    # bob's sessions directory is a symlink to alice's.
    (bob.home / "user").mkdir()
    os.chown(bob.home / "user", bob.uid, bob.gid)
    os.symlink(alice.sessions, bob.home / "user" / "sessions")
    os.lchown(bob.home / "user" / "sessions", bob.uid, bob.gid)
    # mallory's files: links to a secret file and to the FIFO, a FIFO, a hard link to root's.
    for name, target in (("evil.jsonl", secret_dir / "shadow.jsonl"), ("trap.jsonl", fifo)):
        os.symlink(target, mallory.sessions / name)
        os.lchown(mallory.sessions / name, mallory.uid, mallory.gid)
    os.mkfifo(mallory.sessions / "x.jsonl")
    os.chown(mallory.sessions / "x.jsonl", mallory.uid, mallory.gid)
    os.link(secret_dir / "shadow.jsonl", mallory.sessions / "hard.jsonl")
    # The store: mallory's directory is a link to a directory with a "copy" of evil.jsonl.
    reconcile(tree.config(exclude_users=frozenset({"mallory"})))
    fake = tree.base / "fake-store"
    fake.mkdir()
    os.symlink(fake, tree.target / "mallory")
    (fake / "evil.jsonl").write_bytes(b"root secret\n")
    before = snapshot(tree.target)

    rc, doc = status_json(tree)
    users = {u["user"]: u for u in doc["users"]}
    assert users["alice"]["in_sync"] == 1
    assert "symlink" in users["bob"]["problem"]
    assert users["bob"]["in_sync"] == users["bob"]["missing"] == 0  # not alice's files
    assert users["mallory"]["refused"] == 4  # two links, a FIFO, a root-owned hard link
    assert users["mallory"]["in_sync"] == users["mallory"]["missing"] == 0
    assert rc == 0  # refusals are the copy engine's decision, not a lag
    assert "secret" not in json.dumps(doc["lagging"])
    assert snapshot(tree.target) == before
    assert (tree.target / "mallory").is_symlink()

    # A planted store link never counts as the store's copy.
    tree.write("mallory", "real.jsonl", b"1\n", mtime=OLD)
    rc, doc = status_json(tree)
    users = {u["user"]: u for u in doc["users"]}
    assert rc == 1
    assert users["mallory"]["missing"] == 1
    assert "store directory" in users["mallory"]["problem"]


def test_store_root_symlink_is_a_problem_not_followed(tree: Tree) -> None:
    tree.add_user("alice")
    tree.write("alice", "a.jsonl", b"1\n", mtime=OLD)
    real = tree.base / "elsewhere"
    reconcile(tree.config(target=real))
    os.symlink(real, tree.target)
    report = scan(tree.config(), grace=120)
    assert report.store_problem is not None and "symlink" in report.store_problem
    assert report.users[0].missing == 1


def test_usage_errors_exit_2(tree: Tree) -> None:
    for args in (
        ["status", *tree.cli_args("--grace", "soon")],
        ["status", *tree.cli_args("--grace", "-1")],
        ["status", *tree.cli_args("--bogus")],
        ["status", "--home-root", str(tree.base / "nope"), "--target", str(tree.target)],
        ["status", *tree.cli_args("--state-file", "relative.json")],
    ):
        p = run_cli(*args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "Traceback" not in p.stderr


def test_service_view_from_the_state_file(tree: Tree) -> None:
    tree.add_user("alice")
    state = tree.base / "state.json"
    now = time.time()
    state.write_text(
        json.dumps(
            {
                "version": "0.1.0",
                "pid": os.getpid(),  # a live process that started before started_at
                "running": True,
                "ready": True,
                "started_at": now,
                "updated_at": now - 1,
                "users_watched": 1,
                "degraded": ["/home/carol/user/sessions"],
                "last_pass": {
                    "at": now - 60,
                    "files_copied": 3,
                    "files_skipped": 9,
                    "files_refused": 1,
                    "files_failed": 0,
                    "duration_s": 0.2,
                },
                "totals": {
                    "copies": 7,
                    "bytes": 700,
                    "refusals": 1,
                    "failures": 0,
                    "overflows": 2,
                    "passes": 4,
                },
                "last_error": {"at": now - 30, "msg": "failed 'alice/x.jsonl': No space left"},
            }
        )
    )
    p = run_cli("status", *tree.cli_args("--state-file", str(state)))
    assert p.returncode == 0
    out = p.stdout
    assert f"service: running, pid {os.getpid()}" in out
    assert "degraded (scanned every 30 s): '/home/carol/user/sessions'" in out
    assert "3 copied, 9 skipped, 1 refused, 0 failed" in out
    assert "7 copies (700 bytes)" in out and "2 overflows" in out
    assert "No space left" in out
    _, doc = status_json(tree, "--state-file", str(state))
    assert doc["service"]["pid"] == os.getpid() and 0 < doc["service_state_age_s"] < 60
    assert doc["service_state"] == "running"
    # An old state of a "running" service is flagged; a broken file is reported, not fatal.
    state.write_text(json.dumps({"running": True, "ready": True, "updated_at": now - 600}))
    assert (
        "may be hung or gone"
        in run_cli("status", *tree.cli_args("--state-file", str(state))).stdout
    )
    state.write_text("{not json")
    p = run_cli("status", *tree.cli_args("--state-file", str(state)))
    assert p.returncode == 0 and "unreadable" in p.stdout
    assert status_json(tree, "--state-file", str(state))[1]["service_state"] is None


def test_service_state_stopped_gone_starting_running() -> None:
    assert service_state({"running": False, "ready": True}, None) == "stopped"
    assert service_state({"running": False}, True) == "stopped"  # its own word wins
    assert service_state({"running": True, "ready": True}, False) == "gone"
    assert service_state({"running": True, "ready": False}, False) == "gone"
    assert service_state({"running": True, "ready": False}, True) == "starting"
    assert service_state({"running": True, "ready": True}, True) == "running"
    assert service_state({"running": True, "ready": True}, None) == "running"  # no pid


def test_pid_alive_is_the_process_that_wrote_the_file() -> None:
    now = time.time()
    assert pid_alive(os.getpid(), now) is True
    # Our pid, but a process that started an hour after "the service": the pid was reused.
    assert pid_alive(os.getpid(), now - 3600) is False
    exited = subprocess.Popen(["true"])
    exited.wait()  # exited and reaped: no process has its pid now
    assert pid_alive(exited.pid, now) is False
    assert pid_alive(1, None) is True  # alive; no start time to compare
    for no_pid in (None, "42", True, 0, -1):
        assert pid_alive(no_pid, now) is None


def test_status_says_stopped_or_gone(tree: Tree) -> None:
    tree.add_user("alice")
    state = tree.base / "state.json"
    now = time.time()
    base = {"version": "0.1.0", "ready": False, "started_at": now - 100, "updated_at": now - 90}
    state.write_text(json.dumps({**base, "pid": os.getpid(), "running": False}))
    _, doc = status_json(tree, "--state-file", str(state))
    assert doc["service_state"] == "stopped"
    text = run_cli("status", *tree.cli_args("--state-file", str(state))).stdout
    assert f"service: stopped, pid {os.getpid()}" in text

    exited = subprocess.Popen(["true"])
    exited.wait()
    state.write_text(json.dumps({**base, "pid": exited.pid, "running": True, "ready": True}))
    _, doc = status_json(tree, "--state-file", str(state))
    assert doc["service_state"] == "gone"
    text = run_cli("status", *tree.cli_args("--state-file", str(state))).stdout
    assert "service: not running: its process is gone" in text

    state.unlink()
    _, doc = status_json(tree, "--state-file", str(state))
    assert (doc["service"], doc["service_state"]) == (None, None)
    text = run_cli("status", *tree.cli_args("--state-file", str(state))).stdout
    assert "service: no state file at" in text and "not run since boot" in text


def test_status_is_read_only_on_store_modes(tree: Tree) -> None:
    tree.add_user("alice")
    tree.write("alice", "a.jsonl", b"1\n", mtime=OLD)
    reconcile(tree.config())
    os.chmod(tree.target / "alice", 0o700)  # not the configured 2770: a pass would fix it
    before = snapshot(tree.target)
    assert status_json(tree)[0] == 0
    assert snapshot(tree.target) == before
    assert Path(tree.target / "alice").stat().st_mode & 0o7777 == 0o700
