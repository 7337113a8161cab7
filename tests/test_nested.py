"""Issue 13: nested sources (`--depth N`, `--layout claude-code`): the walk and its refusals
at every level, the store mirroring the relative path, live creation at each level, a
resumed old session, deletion and recreation at each level, the watch bound, threads.

Trees are real (homes chowned to uid 1000+i), writes run as the user (setpriv), the
service is a real `session-watcher run` process logging JSON; every wait has a deadline.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from harness import StartFn, line, stored_bytes
from helpers import TEST_GID, Tree, User, root_only, run_as, wait_for, write_as

from session_watcher import watch as watch_mod
from session_watcher.config import Config, ConfigError, resolve
from session_watcher.copy import SourceDir
from session_watcher.homes import Walk, open_source_path
from session_watcher.ratelimit import LogLimiter
from session_watcher.reconcile import reconcile, store_for
from session_watcher.safefs import Refused
from session_watcher.status import scan
from session_watcher.watch import Watcher

PROJECTS = ".claude/projects"
OLD = time.time() - 30 * 86400  # a month ago: outside the active window


# --- the tree ------------------------------------------------------------------------------


def claude_user(tree: Tree, name: str) -> User:
    """A home with Claude Code's `~/.claude/projects`, owned by the user."""
    u = tree.add_user(name, sessions_dir=False)
    projects = u.home / PROJECTS
    projects.mkdir(parents=True, mode=0o700)
    for p in (u.home / ".claude", projects):
        os.chown(p, u.uid, u.gid)
    user = User(u.name, u.uid, u.gid, u.home, projects)
    tree.users[name] = user
    return user


def mkdir_as(u: User, rel: str) -> Path:
    path = u.sessions / rel
    run_as(u.uid, u.gid, ["mkdir", "-p", str(path)])
    return path


def put(u: User, rel: str, data: bytes, *, mtime: float | None = None) -> Path:
    """`rel` (below the projects directory) written as the user, its directories made."""
    path = u.sessions / rel
    if not path.parent.exists():
        mkdir_as(u, str(path.parent.relative_to(u.sessions)))
    write_as(u.uid, u.gid, path, data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def age(u: User, rel: str) -> None:
    """Set `rel` and everything below it a month back (an old session)."""
    top = u.sessions / rel
    for dirpath, dirnames, filenames in os.walk(top, topdown=False):
        for n in filenames + dirnames:
            os.utime(os.path.join(dirpath, n), (OLD, OLD), follow_symlinks=False)
    os.utime(top, (OLD, OLD))


def config(tree: Tree, **kw: Any) -> Config:
    return tree.config(sessions_subdir=PROJECTS, depth=4, **kw)


def stored(tree: Tree, u: User, rel: str) -> Path:
    return tree.target / u.name / rel


def json_log(path: Path) -> list[dict[str, Any]]:
    out = []
    for raw in path.read_text(errors="backslashreplace").splitlines():
        try:
            out.append(json.loads(raw))
        except ValueError:
            continue
    return out


def records(svc: Any, **match: Any) -> list[dict[str, Any]]:
    return [r for r in json_log(svc.log_path) if all(r.get(k) == v for k, v in match.items())]


def wait_file(path: Path, data: bytes, timeout: float = 10.0) -> None:
    wait_for(lambda: stored_bytes(path) == data, timeout=timeout, what=f"{path} to land")


def inotify_watches(pid: int) -> int:
    """Watches the process holds, from /proc (the kernel's count, not ours)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        n += sum(1 for ln in text.splitlines() if ln.startswith("inotify wd:"))
    return n


# --- config ----------------------------------------------------------------------------------


def test_layout_claude_code_is_a_preset_that_explicit_settings_beat() -> None:
    c = resolve({"layout": "claude-code"}, {})
    assert (c.sessions_subdir, c.depth) == (".claude/projects", 4)
    c = resolve({"layout": "claude-code", "depth": 2}, {})
    assert (c.sessions_subdir, c.depth) == (".claude/projects", 2)
    # The flag beats the environment's subdir; the environment's layout loses to it.
    env = {"SESSION_WATCHER_SESSIONS_SUBDIR": "x/y", "SESSION_WATCHER_LAYOUT": "flat"}
    c = resolve({"layout": "claude-code"}, env)
    assert (c.sessions_subdir, c.depth) == (".claude/projects", 4)
    c = resolve({}, {"SESSION_WATCHER_LAYOUT": "claude-code"})
    assert (c.sessions_subdir, c.depth) == (".claude/projects", 4)
    assert resolve({}, {}).depth == 1
    with pytest.raises(ConfigError):
        resolve({"layout": "nope"}, {})
    with pytest.raises(ConfigError):
        resolve({"depth": 0}, {})


# --- the pass ----------------------------------------------------------------------------------


@root_only
def test_pass_mirrors_the_relative_path_with_store_modes(tree: Tree) -> None:
    alice = claude_user(tree, "alice")
    put(alice, "-home-alice-repo/s1.jsonl", line(1))
    put(alice, "-home-alice-repo/s1/subagents/agent-a.jsonl", line(2))
    put(alice, "-home-alice-repo/s1/subagents/agent-a.meta.json", b"{}\n")
    put(alice, "-home-alice-other/s2.jsonl", line(3))
    stats = reconcile(config(tree))
    assert (stats.files_copied, stats.files_refused, stats.files_failed) == (3, 0, 0)
    assert stored_bytes(stored(tree, alice, "-home-alice-repo/s1.jsonl")) == line(1)
    agent = stored(tree, alice, "-home-alice-repo/s1/subagents/agent-a.jsonl")
    assert stored_bytes(agent) == line(2)
    assert not stored(tree, alice, "-home-alice-repo/s1/subagents/agent-a.meta.json").exists()
    assert stored_bytes(stored(tree, alice, "-home-alice-other/s2.jsonl")) == line(3)
    for d in ("-home-alice-repo", "-home-alice-repo/s1", "-home-alice-repo/s1/subagents"):
        st = os.lstat(stored(tree, alice, d))
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o2770, d
        assert st.st_gid == TEST_GID, d
    st = os.lstat(agent)
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == TEST_GID
    # A second pass is a no-op; the default depth 1 never looks below the first level.
    again = reconcile(config(tree))
    assert (again.files_copied, again.files_skipped) == (0, 3)
    flat = reconcile(tree.config(sessions_subdir=PROJECTS, target=tree.base / "flat"))
    assert (flat.files_copied, flat.users_processed) == (0, 0)


@root_only
def test_refusals_at_every_level_are_one_warning_each_and_the_pass_goes_on(
    tree: Tree, caplog: pytest.LogCaptureFixture
) -> None:
    alice = claude_user(tree, "alice")
    bob = claude_user(tree, "bob")
    put(bob, "-home-bob/secret.jsonl", line(9))
    put(bob, "-home-bob/bs/subagents/agent-b.jsonl", line(9))
    put(alice, "ok/s1.jsonl", line(1))
    put(alice, "ok/s1/subagents/agent-a.jsonl", line(2))
    # A symlink at each level, pointing into bob's tree.
    os.symlink(bob.sessions / "-home-bob", alice.sessions / "link-project")
    os.symlink(bob.sessions / "-home-bob/bs", alice.sessions / "ok/link-session")
    os.symlink(bob.sessions / "-home-bob/bs/subagents", alice.sessions / "ok/s1/link-sub")
    for link in ("link-project", "ok/link-session", "ok/s1/link-sub"):
        os.lchown(alice.sessions / link, alice.uid, alice.gid)
    # Owned by someone else (root made it), a hidden name, deeper than --depth.
    foreign = alice.sessions / "foreign"
    foreign.mkdir()
    (foreign / "x.jsonl").write_bytes(line(7))
    put(alice, ".hidden/h.jsonl", line(8))
    put(alice, "ok/s1/subagents/deeper/too-deep.jsonl", line(6))
    caplog.set_level(logging.WARNING, logger="session_watcher")
    every = LogLimiter(0.0)  # every line, to see each refusal
    stats = reconcile(config(tree), only={"alice"}, limiter=every)
    assert stats.files_copied == 2 and stats.files_failed == 0
    assert sorted(p.name for p in (tree.target / "alice").rglob("*.jsonl")) == [
        "agent-a.jsonl",
        "s1.jsonl",
    ]

    def refused() -> list[tuple[str | None, str | None]]:
        return sorted(
            (getattr(r, "file", None), getattr(r, "reason", None))
            for r in caplog.records
            if r.levelno == logging.WARNING and r.getMessage().startswith("refused")
        )

    assert refused() == [
        (".hidden", "hidden"),
        ("foreign", "owner"),
        ("link-project", "symlink"),
        ("ok/link-session", "symlink"),
        ("ok/s1/link-sub", "symlink"),
        ("ok/s1/subagents/deeper", "depth"),
    ]
    # Limited per user and kind: one line each, however many passes in the window.
    limiter = LogLimiter()
    caplog.clear()
    for _ in range(3):
        reconcile(config(tree), only={"alice"}, limiter=limiter)
    assert sorted(str(reason) for _, reason in refused()) == ["depth", "hidden", "owner", "symlink"]


@root_only
def test_a_store_directory_swapped_for_a_symlink_is_never_followed(tree: Tree) -> None:
    alice = claude_user(tree, "alice")
    put(alice, "p/s1.jsonl", line(1))
    elsewhere = tree.base / "elsewhere"
    elsewhere.mkdir()
    (tree.target / "alice").mkdir(parents=True)
    os.symlink(elsewhere, tree.target / "alice" / "p")
    stats = reconcile(config(tree))
    assert stats.files_failed == 1 and stats.files_copied == 0
    assert list(elsewhere.iterdir()) == []


@root_only
def test_quota_counts_nested_store_files(tree: Tree) -> None:
    alice = claude_user(tree, "alice")
    for i in range(3):
        put(alice, f"p/s{i}/subagents/agent-{i}.jsonl", line(i))
    assert reconcile(config(tree)).files_copied == 3
    put(alice, "p/new.jsonl", line(9))
    stats = reconcile(config(tree, max_user_files=3))
    assert (stats.files_copied, stats.files_refused) == (0, 1)


@root_only
def test_walk_bounds_entries_per_directory_and_per_user(
    tree: Tree, caplog: pytest.LogCaptureFixture
) -> None:
    alice = claude_user(tree, "alice")
    for i in range(30):
        put(alice, f"p/s{i:02d}.jsonl", line(i))
    for i in range(5):
        put(alice, f"q{i}/s.jsonl", line(i))
    cfg = config(tree)
    caplog.set_level(logging.WARNING, logger="session_watcher")
    fd = os.open(alice.sessions, os.O_RDONLY | os.O_DIRECTORY)
    try:
        top = SourceDir("alice", alice.uid, fd)
        walk = Walk(cfg, LogLimiter(), dir_limit=10)
        files = [v for v in walk.visits(top) if v.kind == "file"]
        # p/ stops at its 10th entry; each q*/ holds one file.
        assert len(files) == 10 + 5
        walk = Walk(cfg, LogLimiter(), user_limit=12)
        files = [v for v in walk.visits(top) if v.kind == "file"]
        assert len(files) < 12 and walk.entries > 12
    finally:
        os.close(fd)
    bound = [getattr(r, "reason", None) for r in caplog.records if r.levelno == logging.WARNING]
    assert bound == ["bound", "bound"]


@root_only
def test_live_path_walks_each_level_with_the_same_checks(tree: Tree) -> None:
    alice = claude_user(tree, "alice")
    put(alice, "p/s1/subagents/agent-a.jsonl", line(1))
    os.symlink(alice.sessions / "p", alice.sessions / "q")
    fd = os.open(alice.sessions, os.O_RDONLY | os.O_DIRECTORY)
    try:
        top = SourceDir("alice", alice.uid, fd)
        sub = open_source_path(top, "p/s1/subagents", config(tree))
        try:
            assert sub.rel == "p/s1/subagents" and sub.level == 4
            assert sub.key("agent-a.jsonl") == "p/s1/subagents/agent-a.jsonl"
        finally:
            os.close(sub.fd)
        with pytest.raises(Refused) as e:
            open_source_path(top, "q/s1", config(tree))
        assert e.value.kind == "symlink"
    finally:
        os.close(fd)


# --- the watch bound (a Watcher without the service) ----------------------------------------


@root_only
def test_past_the_per_user_watch_bound_is_one_warning_and_a_scan(
    tree: Tree, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    alice = claude_user(tree, "alice")
    for i in range(4):
        mkdir_as(alice, f"p{i}")
    monkeypatch.setattr(watch_mod, "NESTED_WATCH_LIMIT", 2)
    caplog.set_level(logging.DEBUG, logger="session_watcher")
    w = Watcher(config(tree), lambda *a: None, lambda: None, lambda u: None)
    w.start()
    fd = os.open(alice.sessions, os.O_RDONLY | os.O_DIRECTORY)
    try:
        top = SourceDir("alice", alice.uid, fd)
        token = w.begin("alice")
        got = []
        for i in range(4):
            sub = open_source_path(top, f"p{i}", w.config)
            try:
                got.append(w.add_nested(sub, os.fstat(sub.fd)))
            finally:
                os.close(sub.fd)
        w.end("alice", token, True)
        assert got == [True, True, False, False]
        assert w.nested_count() == 2 and w.nested_failed() == {"alice"}
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and getattr(warnings[0], "reason", "") == "watch-degraded"
    finally:
        os.close(fd)
        w.stop()


# --- the service ----------------------------------------------------------------------------


def run_claude(start: StartFn, *extra: str) -> Any:
    return start("--layout", "claude-code", "--log-format", "json", *extra)


@root_only
def test_live_creation_at_every_level_lands(tree: Tree, start: StartFn) -> None:
    alice = claude_user(tree, "alice")
    svc = run_claude(start)
    # A new project directory and its first transcript.
    put(alice, "-home-alice-new/s1.jsonl", line(1))
    wait_file(stored(tree, alice, "-home-alice-new/s1.jsonl"), line(1))
    # A new session directory with subagents/ and a first agent file.
    put(alice, "-home-alice-new/s1/subagents/agent-a.jsonl", line(2))
    wait_file(stored(tree, alice, "-home-alice-new/s1/subagents/agent-a.jsonl"), line(2))
    # Now all three are watched: an append at each level is an event (a close), copied
    # with its latency from the event in the structured log.
    for rel, n in (
        ("-home-alice-new/s1.jsonl", 3),
        ("-home-alice-new/s1/subagents/agent-a.jsonl", 4),
        ("-home-alice-new/s1/subagents/agent-b.jsonl", 5),
    ):
        path = alice.sessions / rel
        before = path.read_bytes() if path.exists() else b""
        write_as(alice.uid, alice.gid, path, line(n), append=True)
        wait_file(stored(tree, alice, rel), before + line(n))

        def evented(rel: str = rel) -> list[dict[str, Any]]:
            return [r for r in records(svc, file=rel) if "latency_ms" in r]

        wait_for(evented, what=f"an event-driven copy of {rel}")
    assert records(svc, level="ERROR") == []


@root_only
def test_a_resumed_old_session_is_watched_again_and_its_new_subagent_lands(
    tree: Tree, start: StartFn
) -> None:
    alice = claude_user(tree, "alice")
    put(alice, "p/old.jsonl", line(1))
    put(alice, "p/old/subagents/agent-a.jsonl", line(2))
    age(alice, "p/old")
    os.utime(alice.sessions / "p/old.jsonl", (OLD, OLD))
    svc = run_claude(start)
    wait_file(stored(tree, alice, "p/old/subagents/agent-a.jsonl"), line(2))
    # projects, p: watched; the old session's two directories are not.
    assert inotify_watches(svc.proc.pid) == 1 + 1 + 1  # home root, projects, p
    # Claude Code resumes it: the transcript grows, then a new subagent file appears.
    write_as(alice.uid, alice.gid, alice.sessions / "p/old.jsonl", line(3), append=True)
    wait_file(stored(tree, alice, "p/old.jsonl"), line(1) + line(3))
    wait_for(lambda: inotify_watches(svc.proc.pid) == 5, what="the resumed session watched")
    put(alice, "p/old/subagents/agent-new.jsonl", line(4))
    wait_file(stored(tree, alice, "p/old/subagents/agent-new.jsonl"), line(4))
    write_as(
        alice.uid, alice.gid, alice.sessions / "p/old/subagents/agent-a.jsonl", line(5), append=True
    )
    wait_file(stored(tree, alice, "p/old/subagents/agent-a.jsonl"), line(2) + line(5))


@root_only
def test_deleted_renamed_and_recreated_directories_at_every_level(
    tree: Tree, start: StartFn
) -> None:
    alice = claude_user(tree, "alice")
    put(alice, "p/s/subagents/agent-a.jsonl", line(1))
    put(alice, "p/s.jsonl", line(1))
    svc = run_claude(start)
    wait_file(stored(tree, alice, "p/s/subagents/agent-a.jsonl"), line(1))
    n = 10
    for rel in ("p/s/subagents", "p/s", "p"):
        # Deleted, then made again: watched again, a file in it lands.
        run_as(alice.uid, alice.gid, ["rm", "-rf", str(alice.sessions / rel)])
        n += 1
        put(alice, f"{rel}/after-{n}.jsonl", line(n))
        wait_file(stored(tree, alice, f"{rel}/after-{n}.jsonl"), line(n))
        # And the new one is live: an append is an event.
        again = alice.sessions / rel / f"after-{n}.jsonl"
        write_as(alice.uid, alice.gid, again, line(0), append=True)
        wait_file(stored(tree, alice, f"{rel}/after-{n}.jsonl"), line(n) + line(0))
    # Renamed: the new name is watched, the old one is not.
    run_as(alice.uid, alice.gid, ["mv", str(alice.sessions / "p"), str(alice.sessions / "p2")])
    put(alice, "p2/moved.jsonl", line(20))
    wait_file(stored(tree, alice, "p2/moved.jsonl"), line(20))
    # Replaced by a symlink: never followed (a pass says so once).
    run_as(alice.uid, alice.gid, ["ln", "-s", "/etc", str(alice.sessions / "p")])
    svc.send(1)  # SIGHUP: a full pass
    wait_for(
        lambda: records(svc, level="WARNING", file="p", reason="symlink"),
        what="the symlink refused",
    )
    assert not (tree.target / "alice" / "p" / "passwd").exists()
    assert records(svc, level="ERROR") == []


@root_only
def test_watches_are_bounded_to_projects_and_active_sessions(tree: Tree, start: StartFn) -> None:
    alice = claude_user(tree, "alice")
    for p in range(3):
        for s in range(10):
            put(alice, f"proj{p}/s{s}.jsonl", line(s))
            put(alice, f"proj{p}/s{s}/subagents/agent.jsonl", line(s))
            age(alice, f"proj{p}/s{s}")
            os.utime(alice.sessions / f"proj{p}/s{s}.jsonl", (OLD, OLD))
    # One recent session with subagents.
    put(alice, "proj0/live.jsonl", line(1))
    put(alice, "proj0/live/subagents/agent.jsonl", line(1))
    svc = run_claude(start)
    # READY=1 once the projects are watched: home root, projects, the 3 projects.
    assert inotify_watches(svc.proc.pid) >= 1 + 1 + 3
    # The first pass goes on after it: everything is copied all the same, and the live
    # session's two directories are watched, not the 60 of the old ones.
    wait_for(
        lambda: len(list((tree.target / "alice").rglob("*.jsonl"))) == 3 * 10 * 2 + 2,
        what="the first pass",
    )
    svc.wait_log("pass done")
    assert inotify_watches(svc.proc.pid) == 1 + 1 + 3 + 2


@root_only
def test_threads_do_not_grow_with_nested_directories(tree: Tree, start: StartFn) -> None:
    """2,000 watched directories below 20 users' projects directories: the same small,
    fixed number of threads as one directory."""
    users = 20
    for i in range(users):
        u = claude_user(tree, f"u{i:02d}")
        base = u.sessions
        for p in range(100):
            (base / f"p{p:03d}").mkdir()
            os.chown(base / f"p{p:03d}", u.uid, u.gid)
    svc = start("--layout", "claude-code", "--log-format", "json", ready=False)
    svc.wait_log("ready: watching", timeout=120.0)
    assert inotify_watches(svc.proc.pid) >= users * 100
    threads = len(os.listdir(f"/proc/{svc.proc.pid}/task"))
    assert threads <= 16, threads
    u = tree.users["u19"]
    put(u, "p099/live.jsonl", line(1))
    wait_file(stored(tree, u, "p099/live.jsonl"), line(1))


@root_only
def test_status_compares_every_level(tree: Tree) -> None:
    alice = claude_user(tree, "alice")
    put(alice, "p/s1.jsonl", line(1), mtime=OLD)
    put(alice, "p/s1/subagents/agent-a.jsonl", line(2), mtime=OLD)
    reconcile(config(tree))
    assert scan(config(tree), grace=0).unsynced == []
    put(alice, "p/s1/subagents/agent-b.jsonl", line(3), mtime=OLD)
    got = [(u.user, u.file, u.state) for u in scan(config(tree), grace=0).unsynced]
    assert got == [("alice", "p/s1/subagents/agent-b.jsonl", "missing")]


@root_only
def test_walk_watches_projects_always_and_sessions_while_active(tree: Tree) -> None:
    alice = claude_user(tree, "alice")
    put(alice, "p/old.jsonl", line(1))
    put(alice, "p/old/subagents/agent.jsonl", line(1))
    age(alice, "p/old")
    os.utime(alice.sessions / "p/old.jsonl", (OLD, OLD))
    put(alice, "p/resumed.jsonl", line(1))  # its transcript is recent: the session is active
    put(alice, "p/resumed/subagents/agent.jsonl", line(1))
    age(alice, "p/resumed")
    put(alice, "p/fresh/subagents/agent.jsonl", line(1))  # a new subagent: its dir is recent
    age(alice, "p")
    os.utime(alice.sessions / "p/resumed.jsonl")
    os.utime(alice.sessions / "p/fresh/subagents")
    fd = os.open(alice.sessions, os.O_RDONLY | os.O_DIRECTORY)
    try:
        top = SourceDir("alice", alice.uid, fd)
        watch = {v.source.rel: v.watch for v in Walk(config(tree)).visits(top) if v.kind == "enter"}
        hot = {
            v.source.rel: v.watch
            for v in Walk(config(tree), hot=True).visits(top)
            if v.kind == "enter"
        }
    finally:
        os.close(fd)
    assert watch == {
        "p": True,
        "p/old": False,
        "p/old/subagents": False,
        "p/resumed": True,
        "p/resumed/subagents": True,
        "p/fresh": False,
        "p/fresh/subagents": True,
    }
    assert all(hot.values())


@root_only
def test_nested_store_usage_is_measured_once_and_carried_to_the_next_pass(tree: Tree) -> None:
    alice = claude_user(tree, "alice")
    put(alice, "p/s/subagents/agent.jsonl", line(1))
    put(alice, "p/s.jsonl", line(2))
    reconcile(config(tree))
    store = store_for(config(tree))
    root = store.open_root(create=False)
    assert root is not None
    user_fd = store.open_user_dir(root, "alice", create=False)
    try:
        store.measure("alice", user_fd)
        usage = store.usage("alice")
        assert usage is not None and (usage.files, usage.nbytes) == (2, len(line(1) + line(2)))
        carried = store_for(config(tree)).inherit(store).usage("alice")
        assert carried is not None and carried.files == 2
        # The flat layout measures afresh with every pass, as before.
        flat = store_for(tree.config())
        flat.measure("alice", user_fd)
        assert flat.usage("alice") is not None
        assert store_for(tree.config()).inherit(flat).usage("alice") is None
    finally:
        os.close(root)
        if user_fd is not None:
            os.close(user_fd)
