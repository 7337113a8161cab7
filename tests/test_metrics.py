"""The state file and the Prometheus metrics file: written atomically, parseable, bounded
labels; a missing state directory is one WARNING, not a crash. Real `run` subprocesses."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Tree, cli_env, run_cli, wait_for
from prometheus_client.parser import text_string_to_metric_families

from session_watcher.copy import Outcome, Result
from session_watcher.metrics import REFUSAL_KINDS, Metrics
from session_watcher.reconcile import PassStats
from session_watcher.state import AtomicFile, read_state, write_atomic


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a metrics file, parsed by prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


class Run:
    def __init__(self, tree: Tree, *extra: str) -> None:
        self.err = open(tree.base / "run.err", "w+b")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "session_watcher", "run", *tree.cli_args(*extra)],
            stdout=subprocess.DEVNULL,
            stderr=self.err,
            env=cli_env(),
        )
        self.path = tree.base / "run.err"

    def log(self) -> str:
        return self.path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=20)
        self.err.close()
        return rc


@pytest.fixture
def run(tree: Tree) -> Iterator[list[Run]]:
    runs: list[Run] = []
    yield runs
    for r in runs:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()
        r.err.close()


def test_service_writes_state_and_metrics(tree: Tree, run: list[Run]) -> None:
    tree.add_user("alice")
    tree.write("alice", "a.jsonl", b'{"a":1}\n')
    os.mkfifo(tree.user("alice").sessions / "x.jsonl")
    os.chown(tree.user("alice").sessions / "x.jsonl", tree.user("alice").uid, -1)
    state, prom = tree.base / "state.json", tree.base / "textfile" / "sw.prom"
    prom.parent.mkdir()
    old = os.umask(0o077)  # as under the unit's UMask=0077
    try:
        r = Run(tree, "--state-file", str(state), "--metrics-file", str(prom))
    finally:
        os.umask(old)
    run.append(r)

    doc = wait_for(
        lambda: (d := read_state(state)) is not None and d.get("ready") and d, what="ready state"
    )
    assert doc["running"] is True and doc["pid"] == r.proc.pid
    assert doc["users_watched"] == 1 and doc["degraded"] == []
    assert doc["last_pass"]["files_copied"] == 1 and doc["last_pass"]["files_refused"] == 1
    assert doc["totals"]["copies"] == 1 and doc["totals"]["refusals"] == 1
    assert value(prom.read_text(), "session_watcher_ready") == 1
    assert prom.stat().st_mode & 0o777 == 0o644  # readable by node_exporter all the same
    assert state.stat().st_mode & 0o777 == 0o644

    tree.write("alice", "a.jsonl", b'{"b":2}\n', append=True)  # a live copy: latency observed
    wait_for(
        lambda: (d := read_state(state)) is not None and d["totals"]["copies"] == 2,
        what="live copy",
    )
    # The state file follows within about a second (it changed).
    wait_for(lambda: (read_state(state) or {}).get("totals", {}).get("copies") == 2, what="state")
    assert r.stop() == 0

    doc = read_state(state)
    assert doc is not None and doc["running"] is False
    assert status_service(tree, state) == "stopped"
    text = prom.read_text()
    assert value(text, "session_watcher_ready") == 0
    assert value(text, "session_watcher_copies_total") == 2
    assert value(text, "session_watcher_copied_bytes_total") == 8 + 16
    assert value(text, "session_watcher_refusals_total", reason="fifo") == 1
    assert value(text, "session_watcher_refusals_total", reason="symlink") == 0
    assert value(text, "session_watcher_event_to_landed_seconds_count") == 1
    assert value(text, "session_watcher_passes_total", scope="full") >= 1
    assert value(text, "session_watcher_pass_duration_seconds_count") >= 1
    assert value(text, "session_watcher_watched_users") == 1
    assert value(text, "session_watcher_degraded_directories") == 0
    assert "alice" not in text and "a.jsonl" not in text  # no user data in labels
    assert sorted(os.listdir(prom.parent)) == ["sw.prom"]  # no temp file left
    assert sorted(p.name for p in tree.base.iterdir() if p.name.startswith(".")) == []


def status_service(tree: Tree, state: Path) -> str | None:
    """`session-watcher status --json`'s verdict on the service, from `state`."""
    p = run_cli("status", "--json", *tree.cli_args("--state-file", str(state)))
    verdict: str | None = json.loads(p.stdout)["service_state"]
    return verdict


def test_status_says_gone_after_kill_9(tree: Tree, run: list[Run]) -> None:
    tree.add_user("alice")
    state = tree.base / "state.json"
    r = Run(tree, "--state-file", str(state))
    run.append(r)
    wait_for(lambda: (read_state(state) or {}).get("ready"), what="ready state")
    assert status_service(tree, state) == "running"
    r.proc.kill()
    r.proc.wait(timeout=20)
    doc = read_state(state)
    assert doc is not None and doc["running"] is True  # it had no chance to say otherwise
    assert status_service(tree, state) == "gone"


def test_missing_state_dir_is_one_warning_and_the_service_runs(tree: Tree, run: list[Run]) -> None:
    tree.add_user("alice")
    r = Run(tree, "--state-file", str(tree.base / "no" / "such" / "state.json"))
    run.append(r)
    wait_for(lambda: "ready: watching" in r.log(), what="ready")
    tree.write("alice", "a.jsonl", b"1\n")
    wait_for(lambda: tree.stored("alice", "a.jsonl").exists(), what="copy")
    assert r.stop() == 0
    log = r.log()
    assert log.count("cannot write the state file") == 1, log
    assert "Traceback" not in log


# --- the writers ----------------------------------------------------------------------------


def test_write_atomic_mode_never_follows_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(victim, target)  # a link at the name is replaced, never written through
    old = os.umask(0o077)
    try:
        write_atomic(target, b"{}\n")
    finally:
        os.umask(old)
    assert not target.is_symlink() and target.read_bytes() == b"{}\n"
    assert victim.read_text() == "keep"
    assert target.stat().st_mode & 0o777 == 0o644
    assert sorted(os.listdir(tmp_path)) == ["state.json", "victim"]


def test_readers_never_see_a_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "m.prom"
    m = Metrics(target)
    m.write(now=0, force=True)
    stop = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            text = target.read_text()
            try:
                if value(text, "session_watcher_ready") != 0:
                    bad.append(text)
            except Exception as e:
                bad.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(300):
            m.record(Result(Outcome.COPIED, nbytes=i, latency=0.001))
            m.write(now=i * 20.0)
    finally:
        stop.set()
        t.join()
    assert bad == []
    assert value(target.read_text(), "session_watcher_copies_total") == 300


def test_atomic_file_warns_once_and_is_rate_limited(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = AtomicFile(tmp_path / "missing" / "state.json", "state file", min_interval=1.0)
    with caplog.at_level(logging.WARNING):
        assert f.write(lambda: b"{}", now=0.0) is False
        assert f.write(lambda: b"{}", now=5.0) is False
    assert [r.getMessage() for r in caplog.records].count(
        f"cannot write the state file '{tmp_path}/missing/state.json': "
        "No such file or directory; carrying on without it"
    ) == 1
    (tmp_path / "missing").mkdir()
    calls: list[int] = []

    def render() -> bytes:
        calls.append(1)
        return json.dumps({"n": len(calls)}).encode()

    assert f.write(render, now=10.0) is True
    assert f.write(render, now=10.5) is False  # at most once a second
    assert f.write(render, now=11.0) is True
    assert json.loads((tmp_path / "missing" / "state.json").read_text()) == {"n": 2}


def test_labels_are_bounded() -> None:
    m = Metrics()
    for kind, detail in (
        ("symlink", "a symlink"),
        ("fifo", "a FIFO"),
        ("socket", "a socket"),
        ("directory", "a directory"),
        ("device", "a character device"),
        ("device", "a block device"),
        ("owner", "owned by uid 0, not by the home's owner 1000"),
        ("size", "2000000000 bytes, over the limit of 1073741824"),
        (None, "something 'alice/evil\\nname.jsonl' new"),
    ):
        m.record(Result(Outcome.REFUSED, detail=detail, kind=kind))
    m.record(Result(Outcome.FAILED, errno=errno.ENOSPC))
    m.record(Result(Outcome.FAILED, errno=None))
    m.record(Result(Outcome.FAILED, errno=99999))
    m.record_pass(PassStats(files_copied=3, duration_s=0.5), full=True)
    m.record_pass(PassStats(), full=False)
    text = m.render().decode()
    reasons = {
        dict(labels)["reason"]: v
        for (name, labels), v in samples(text).items()
        if name == "session_watcher_refusals_total"
    }
    assert set(reasons) == set(REFUSAL_KINDS)
    assert reasons["device"] == 2 and reasons["other"] == 1 and reasons["size"] == 1
    assert value(text, "session_watcher_failures_total", errno="ENOSPC") == 1
    assert value(text, "session_watcher_failures_total", errno="unknown") == 2
    assert value(text, "session_watcher_last_pass_files_copied") == 3
    assert value(text, "session_watcher_passes_total", scope="users") == 1
    assert "alice" not in text
