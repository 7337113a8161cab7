"""The object store as the store (`--target s3://...`), against moto's S3 server over real
HTTP, with a counting loopback proxy in front (tests/s3helpers.py).

In-process passes for what the requests and bytes must be; real `session-watcher run`
processes for kill -9, the store going down, a second instance and the log."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from harness import StartFn
from helpers import Tree, make_base, remove_base, run_cli
from s3helpers import Engine, Moto, Request, wait_for

from session_watcher.config import Bucket, Config
from session_watcher.index import INDEX_NAME
from session_watcher.objstore import (
    APPEND_INTERVAL,
    MULTIPART_MIN,
    QUIET_SECONDS,
    object_key,
    upload_due,
)
from session_watcher.reconcile import reconcile

HOST = "host-a"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    m = Moto()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="module")
def ceph(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """The session's Ceph RGW (tests/ceph.py; skipped where Ceph is not installed) behind
    this module's own counting proxy."""
    rgw = request.getfixturevalue("ceph_rgw")
    engine = Engine("ceph", ("127.0.0.1", rgw.rgw_port), rgw.access_key, rgw.secret_key)
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="module", params=["moto", "ceph"])
def engine(request: pytest.FixtureRequest) -> Engine:
    """Each object-store test runs on moto, and on Ceph RGW wherever it is installed."""
    got: Engine = request.getfixturevalue(request.param)
    return got


class S3:
    """One test's bucket on the module's moto server."""

    def __init__(self, engine: Engine, tree: Tree) -> None:
        self.engine = engine
        self.tree = tree
        self.bucket = engine.new_bucket()
        self.proxy = engine.proxy
        self.client = engine.client()
        self.state_dir = tree.base / "state"
        self.target = f"s3://{self.bucket}/sessions"

    def config(self, **overrides: Any) -> Config:
        values: dict[str, Any] = {
            "bucket": Bucket(self.bucket, "sessions"),
            "host_id": HOST,
            "state_dir": self.state_dir,
            "settle": 0.0,
        }
        values.update(overrides)
        return self.tree.config(**values)

    def key(self, user: str, name: str) -> str:
        return f"sessions/{HOST}/{user}/{name}"

    def get(self, user: str, name: str) -> bytes | None:
        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=self.key(user, name))[
                "Body"
            ].read()
        except self.client.exceptions.NoSuchKey:
            return None
        return body

    def head(self, user: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.client.head_object(
            Bucket=self.bucket, Key=self.key(user, name)
        )
        return result

    def ours(self) -> list[Request]:
        """Requests to this test's bucket since the last reset."""
        return [r for r in self.proxy.requests() if r.path.startswith(f"/{self.bucket}")]

    def count(self, method: str) -> int:
        return sum(1 for r in self.ours() if r.method == method)

    def cli(self, *args: str) -> list[str]:
        return [
            *self.tree.cli_args(*args),
            "--target",
            self.target,
            "--host-id",
            HOST,
            "--state-dir",
            str(self.state_dir),
        ]


@pytest.fixture
def s3(engine: Engine, tree: Tree, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    for k, v in engine.env().items():
        monkeypatch.setenv(k, v)
    env = S3(engine, tree)
    engine.proxy.reset()
    yield env
    env.client.close()
    # Cut the keep-alive connections, so the proxy's and moto's threads for them end.
    engine.proxy.drop()


def line(i: int, pad: int = 60) -> bytes:
    return b'{"type":"assistant","i":%d,"text":"%s"}\n' % (i, b"x" * pad)


def lines(first: int, n: int, pad: int = 60) -> bytes:
    return b"".join(line(i, pad) for i in range(first, first + n))


# --- pure ---------------------------------------------------------------------------------


def test_upload_due_new_now_grown_when_quiet_or_at_the_interval() -> None:
    assert upload_due(None, 100.0, 100.0, 100.0, 30) is None  # a new transcript: at once
    # Grown, written just now: back when quiet, unless the interval comes first.
    assert upload_due(10, 100.0, 100.0, 100.5, 30) == 100.0 + QUIET_SECONDS
    assert upload_due(10, 100.0, 100.0, 100.0 + QUIET_SECONDS, 30) is None
    # Written every 100 ms: never quiet, so at the latest `interval` after first seen.
    assert upload_due(10, 100.0, 129.9, 129.95, 30) == 130.0
    assert upload_due(10, 100.0, 130.0, 130.0, 30) is None
    assert APPEND_INTERVAL < 30


def test_target_s3_from_flag_or_environment() -> None:
    from session_watcher.config import ConfigError, resolve

    cfg = resolve({}, {"SESSION_WATCHER_TARGET": "s3://my-bucket/a/b/"})
    assert cfg.bucket == Bucket("my-bucket", "a/b")
    assert cfg.target_text == "s3://my-bucket/a/b"
    assert resolve({}, {"SESSION_WATCHER_TARGET": "s3://my-bucket"}).bucket == Bucket("my-bucket")
    assert resolve({}, {}).bucket is None
    for bad in ("s3://", "s3://a", "s3://b_c/x", "s3://bucket/a//b"):
        with pytest.raises(ConfigError):
            resolve({}, {"SESSION_WATCHER_TARGET": bad})
    for key, value in (
        ("SESSION_WATCHER_OBJECT_KEY", "{host}/{name}"),  # no {user}
        ("SESSION_WATCHER_OBJECT_KEY", "{host}/{user}/{name}/{x}"),
        ("SESSION_WATCHER_HOST_ID", "a/b"),
        ("SESSION_WATCHER_OBJECT_CHECKSUMS", "always"),
        ("SESSION_WATCHER_UPLOAD_INTERVAL", "0"),
    ):
        with pytest.raises(ConfigError):
            resolve({}, {"SESSION_WATCHER_TARGET": "s3://my-bucket", key: value})


def test_keys_and_refusals(tree: Tree) -> None:
    cfg = tree.config(bucket=Bucket("b-1", "p/q"), host_id="h")
    assert object_key(cfg, "alice", "s.jsonl") == "p/q/h/alice/s.jsonl"
    assert (
        object_key(cfg, "alice", "proj/s/subagents/a.jsonl")
        == "p/q/h/alice/proj/s/subagents/a.jsonl"
    )
    from session_watcher.safefs import Refused

    with pytest.raises(Refused) as e:
        object_key(cfg, "alice", "bad-\udcff.jsonl")  # undecodable byte in the name
    assert e.value.kind == "key"
    long = tree.config(
        bucket=Bucket("b-1"), host_id="h", object_key="{host}/{user}/" + "x" * 1000 + "/{name}"
    )
    with pytest.raises(Refused):
        object_key(long, "alice", "y" * 40 + ".jsonl")


# --- in-process passes: requests and bytes ---------------------------------------------------


def test_first_upload_then_a_pass_in_sync_is_one_list(s3: S3) -> None:
    s3.tree.add_user("alice")
    data = lines(0, 50)
    s3.tree.write("alice", "s1.jsonl", data, mtime=time.time() - 60)
    s3.tree.write("alice", "s2.jsonl", data + b"tail", mtime=time.time() - 60)
    stats = reconcile(s3.config())
    assert (stats.files_copied, stats.files_failed) == (2, 0)
    assert s3.get("alice", "s1.jsonl") == data
    assert s3.get("alice", "s2.jsonl") == data + b"tail"  # quiet: whole, unfinished line too
    head = s3.head("alice", "s1.jsonl")
    assert head["ContentType"] == "application/x-ndjson"
    st = os.stat(s3.tree.source("alice", "s1.jsonl"))
    assert head["Metadata"]["sw-host"] == HOST
    assert head["Metadata"]["sw-source-size"] == str(st.st_size)
    assert head["Metadata"]["sw-mtime-ns"] == str(st.st_mtime_ns)
    assert head["Metadata"]["sw-inode"] == str(st.st_ino)
    assert head["Metadata"]["sw-version"]
    assert s3.count("PUT") == 2

    s3.proxy.reset()
    stats = reconcile(s3.config())
    assert (stats.files_copied, stats.files_skipped) == (0, 2)
    # One LIST, and the process's one look for uploads a killed process left behind.
    assert sorted((r.method, r.path.split("?")[1][:8]) for r in s3.ours()) == [
        ("GET", "list-typ"),
        ("GET", "uploads&"),
    ], s3.ours()


def test_index_deleted_rebuilt_from_list_and_head_uploads_nothing(s3: S3) -> None:
    s3.tree.add_user("alice")
    for i in range(3):
        s3.tree.write("alice", f"s{i}.jsonl", lines(0, 10 + i), mtime=time.time() - 60)
    assert reconcile(s3.config()).files_copied == 3
    (s3.state_dir / INDEX_NAME).unlink()
    s3.proxy.reset()
    stats = reconcile(s3.config())
    assert (stats.files_copied, stats.files_skipped, stats.files_failed) == (0, 3, 0)
    assert s3.count("PUT") == s3.count("POST") == 0
    assert s3.count("HEAD") == 3
    s3.proxy.reset()
    assert reconcile(s3.config()).files_copied == 0
    assert s3.count("HEAD") == 0  # rebuilt: LIST only again


def test_a_crash_between_upload_and_index_write_costs_a_head_not_an_upload(s3: S3) -> None:
    import shutil

    s3.tree.add_user("alice")
    path = s3.tree.write("alice", "s.jsonl", lines(0, 10), mtime=time.time() - 60)
    reconcile(s3.config())
    saved = s3.tree.base / "saved-index"
    shutil.copytree(s3.state_dir, saved)
    s3.tree.write("alice", "s.jsonl", lines(10, 10), append=True, mtime=time.time() - 30)
    reconcile(s3.config())  # uploaded; now "crash" and lose its index row:
    shutil.rmtree(s3.state_dir)
    shutil.copytree(saved, s3.state_dir)
    s3.proxy.reset()
    stats = reconcile(s3.config())
    assert (stats.files_copied, stats.files_skipped) == (0, 1)
    assert (s3.count("PUT"), s3.count("POST"), s3.count("HEAD")) == (0, 0, 1)
    assert s3.get("alice", "s.jsonl") == path.read_bytes()


def test_growth_past_5mib_sends_only_the_new_bytes(s3: S3) -> None:
    s3.tree.add_user("alice")
    path = s3.tree.source("alice", "big.jsonl")
    big = lines(0, 6 * MiB // 100 + 1, pad=60)
    s3.tree.write_fast("alice", "big.jsonl", big)
    os.utime(path, (time.time() - 60,) * 2)
    assert reconcile(s3.config()).files_copied == 1
    assert len(big) >= MULTIPART_MIN
    added = lines(10**6, 2000)  # about 200 KB
    with open(path, "ab") as f:
        f.write(added)
    os.utime(path, (time.time() - 60,) * 2)
    s3.proxy.reset()
    assert reconcile(s3.config()).files_copied == 1
    assert s3.get("alice", "big.jsonl") == big + added
    sent = sum(r.body for r in s3.ours())
    assert len(added) <= sent <= len(added) + 4096, (sent, len(added))
    assert s3.proxy.bytes_up() < len(added) + 16 * 1024
    # Part 1 is a server-side copy: a PUT with no body.
    puts = [r for r in s3.ours() if r.method == "PUT"]
    assert [r.body for r in puts if "partNumber=1" in r.path] == [0]
    uploads = s3.client.list_multipart_uploads(Bucket=s3.bucket)
    assert uploads.get("Uploads", []) == []
    # The multipart object's ETag (HEAD after complete) is the one LIST gives: in sync.
    s3.proxy.reset()
    assert reconcile(s3.config()).files_copied == 0
    assert s3.count("HEAD") == s3.count("PUT") == 0


def test_an_upload_a_killed_process_left_is_aborted(s3: S3) -> None:
    s3.tree.add_user("alice")
    s3.tree.write("alice", "s.jsonl", lines(0, 5), mtime=time.time() - 60)
    key = s3.key("alice", "s.jsonl")
    s3.client.create_multipart_upload(Bucket=s3.bucket, Key=key)
    assert len(s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])) == 1
    assert reconcile(s3.config()).files_copied == 1
    assert s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []


def test_a_grown_small_object_is_replaced_only_if_it_is_ours(s3: S3) -> None:
    """If-Match on the ETag we wrote: AWS and moto take it quoted, Ceph RGW 16 bare; the
    code learns which from one HEAD and then every update is one PUT."""
    s3.tree.add_user("alice")
    data = lines(0, 10)
    s3.tree.write("alice", "s.jsonl", data, mtime=time.time() - 60)
    reconcile(s3.config())
    for round_ in range(3):
        more = lines(100 * (round_ + 1), 10)
        data += more
        s3.tree.write("alice", "s.jsonl", more, append=True, mtime=time.time() - 50 + round_)
        s3.proxy.reset()
        assert reconcile(s3.config()).files_copied == 1
        assert s3.get("alice", "s.jsonl") == data
        if round_ > 0:  # learnt (and the index knows the ETag)
            assert (s3.count("PUT"), s3.count("HEAD")) == (1, 0), s3.ours()


def test_a_rewritten_source_goes_up_whole(s3: S3) -> None:
    s3.tree.add_user("alice")
    path = s3.tree.source("alice", "big.jsonl")
    big = lines(0, 6 * MiB // 100 + 1)
    s3.tree.write_fast("alice", "big.jsonl", big)
    os.utime(path, (time.time() - 60,) * 2)
    assert reconcile(s3.config()).files_copied == 1
    other = big.replace(b'"i":5,', b'"i":6,', 1) + lines(10**6, 10)
    with open(path, "r+b") as f:  # same inode, first bytes changed: not an append
        f.write(other)
    assert reconcile(s3.config()).files_copied == 1
    assert s3.get("alice", "big.jsonl") == other


def test_a_foreign_object_at_our_key_is_never_overwritten(
    s3: S3, caplog: pytest.LogCaptureFixture
) -> None:
    s3.tree.add_user("alice")
    s3.tree.write("alice", "s.jsonl", lines(0, 5), mtime=time.time() - 60)
    s3.client.put_object(Bucket=s3.bucket, Key=s3.key("alice", "s.jsonl"), Body=b"not ours\n")
    with caplog.at_level(logging.ERROR):
        stats = reconcile(s3.config())
    assert (stats.files_copied, stats.files_failed) == (0, 1)
    assert s3.get("alice", "s.jsonl") == b"not ours\n"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "another host" in errors[0], errors
    from session_watcher.status import scan

    report = scan(s3.config(), grace=0)
    assert [(u.file, u.state) for u in report.unsynced] == [("s.jsonl", "stale")]
    # Also when it replaces one of ours after we uploaded it.
    s3.tree.write("alice", "t.jsonl", lines(0, 5), mtime=time.time() - 60)
    reconcile(s3.config())
    s3.client.put_object(Bucket=s3.bucket, Key=s3.key("alice", "t.jsonl"), Body=b"theirs\n")
    s3.tree.write("alice", "t.jsonl", lines(5, 5), append=True, mtime=time.time() - 30)
    assert reconcile(s3.config()).files_failed == 2
    assert s3.get("alice", "t.jsonl") == b"theirs\n"


def test_a_name_whose_key_is_too_long_is_refused(s3: S3) -> None:
    s3.tree.add_user("alice")
    s3.tree.write("alice", "s.jsonl", lines(0, 2), mtime=time.time() - 60)
    cfg = s3.config(object_key="{host}/{user}/" + "d" * 1010 + "/{name}")
    stats = reconcile(cfg)
    assert (stats.files_refused, stats.files_copied) == (1, 0)


def test_user_quota_counts_the_users_objects(s3: S3) -> None:
    s3.tree.add_user("alice")
    for i in range(3):
        s3.tree.write("alice", f"s{i}.jsonl", lines(0, 5), mtime=time.time() - 60)
    stats = reconcile(s3.config(max_user_files=2))
    assert (stats.files_copied, stats.files_refused) == (2, 1)
    stats = reconcile(s3.config(max_user_files=2))  # counted from the bucket now
    assert (stats.files_copied, stats.files_refused) == (0, 1)


# --- the command line ---------------------------------------------------------------------


def test_status_and_dry_run_against_a_bucket(s3: S3) -> None:
    import json

    s3.tree.add_user("alice")
    s3.tree.write("alice", "s.jsonl", lines(0, 5), mtime=time.time() - 600)
    env = s3.engine.env()
    dry = run_cli("reconcile", "--dry-run", "--json", *s3.cli(), env=env)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["files_copied"] == 1
    assert s3.get("alice", "s.jsonl") is None
    assert not (s3.state_dir / INDEX_NAME).exists()  # a dry run writes nothing
    before = s3.count("PUT")
    st = run_cli("status", "--json", *s3.cli(), env=env)
    assert st.returncode == 1, st.stdout + st.stderr
    report = json.loads(st.stdout)
    assert [(x["file"], x["state"]) for x in report["lagging"]] == [("s.jsonl", "missing")]
    assert run_cli("reconcile", *s3.cli(), env=env).returncode == 0
    st = run_cli("status", "--json", *s3.cli(), env=env)
    assert st.returncode == 0, st.stdout + st.stderr
    assert json.loads(st.stdout)["totals"]["in_sync"] == 1
    assert s3.count("PUT") == before + 1  # status put nothing


def test_no_such_bucket_and_bad_keys_fail_the_files_with_a_reason(s3: S3) -> None:
    s3.tree.add_user("alice")
    s3.tree.write("alice", "s.jsonl", lines(0, 5), mtime=time.time() - 60)
    env = s3.engine.env()
    args = s3.cli()
    args[args.index(s3.target)] = "s3://no-such-bucket-here"
    proc = run_cli("reconcile", "--json", *args, env=env)
    assert proc.returncode == 1
    assert "ENXIO" in proc.stderr and "NoSuchBucket" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    bad = {**env, "AWS_SECRET_ACCESS_KEY": "wrong-" + s3.engine.secret}
    proc = run_cli("reconcile", "--json", *s3.cli(), env=bad)
    if s3.engine.name == "ceph":  # moto takes any key
        assert proc.returncode == 1
        assert "EACCES" in proc.stderr, proc.stderr
    assert s3.engine.secret not in proc.stderr + proc.stdout


def test_slow_down_is_retried_then_a_counted_failure_then_lands(
    s3: S3, caplog: pytest.LogCaptureFixture
) -> None:
    s3.tree.add_user("alice")
    s3.tree.write("alice", "s.jsonl", lines(0, 5), mtime=time.time() - 60)
    s3.proxy.drop()  # new connections only, each answered 503 SlowDown
    s3.proxy.slow_down = True
    try:
        with caplog.at_level(logging.ERROR):
            stats = reconcile(s3.config())
    finally:
        s3.proxy.slow_down = False
    assert (stats.files_copied, stats.files_failed) == (0, 1)
    assert s3.proxy.count("SLOWDOWN") >= 3  # botocore's standard retries first
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "EAGAIN" in errors[0] and "SlowDown" in errors[0], errors
    assert reconcile(s3.config()).files_copied == 1


def test_without_boto3_an_s3_target_is_exit_2_with_one_line(tree: Tree) -> None:
    code = (
        "import sys; sys.modules['boto3'] = None; "
        "from session_watcher.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "reconcile", *tree.cli_args("--target", "s3://bucket-x")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "session-watcher: error: --target s3://bucket-x needs boto3: "
        "pip install 'session-watcher[s3]'"
    ]


# --- the live service ---------------------------------------------------------------------


def _indexed(s3: S3, suffix: str, size: int) -> bool:
    """The state directory's index has a row for the key ending in `suffix` at `size`."""
    path = s3.state_dir / INDEX_NAME
    if not path.exists():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            rows = db.execute("SELECT key, size FROM objects").fetchall()
    except sqlite3.Error:  # not created yet, or busy: look again
        return False
    return any(k.endswith("/" + suffix) and n == size for k, n in rows)


def test_live_first_version_fast_then_kill_9_and_restart_uploads_nothing(
    s3: S3,
    start: StartFn,
) -> None:
    u = s3.tree.add_user("alice")
    old = lines(0, 20)
    s3.tree.write("alice", "old.jsonl", old, mtime=time.time() - 600)
    svc = start(*s3.cli(), env=s3.engine.env())
    assert s3.get("alice", "old.jsonl") == old
    new = lines(0, 3)
    t0 = time.monotonic()
    s3.tree.write(u, "new.jsonl", new)
    wait_for(lambda: s3.get("alice", "new.jsonl") == new, timeout=10, what="first version")
    first_version = time.monotonic() - t0
    assert first_version < 2.0, first_version
    # The index row is written just after the upload: a kill -9 between the two costs a
    # HEAD on restart (test_a_crash_between_upload_and_index_write_costs_a_head_not_an_upload).
    # Here the kill comes once the row is there: the restart must cost LISTs only.
    wait_for(lambda: _indexed(s3, "alice/new.jsonl", len(new)), what="index row of new.jsonl")
    svc.stop(signal.SIGKILL)
    s3.proxy.reset()
    svc2 = start(*s3.cli(), env=s3.engine.env())
    assert s3.count("PUT") == s3.count("POST") == s3.count("HEAD") == 0, s3.ours()
    assert s3.count("GET") == 2  # one LIST, one ListMultipartUploads
    svc2.stop()
    assert s3.engine.secret not in svc.log() + svc2.log()


def test_second_instance_with_the_same_state_dir_is_refused(
    s3: S3,
    start: StartFn,
) -> None:
    s3.tree.add_user("alice")
    svc = start(*s3.cli(), env=s3.engine.env())
    other = start(*s3.cli(), env=s3.engine.env(), ready=False)
    assert other.proc.wait(20) == 2
    assert other.log().strip().splitlines() == [
        f"session-watcher: error: another session-watcher is running with state dir "
        f"'{s3.state_dir}'"
    ]
    assert svc.proc.poll() is None


def test_store_down_10_s_then_back_everything_lands_without_restart(
    s3: S3,
    start: StartFn,
) -> None:
    u = s3.tree.add_user("alice")
    svc = start(*s3.cli(), env=s3.engine.env())
    s3.proxy.down()
    try:
        want = {}
        for i in range(5):
            want[f"d{i}.jsonl"] = lines(0, 3 + i)
            s3.tree.write(u, f"d{i}.jsonl", want[f"d{i}.jsonl"])
        svc.wait_log("ERROR", timeout=15)
        time.sleep(10)  # the outage itself: 10 s down while files wait
    finally:
        s3.proxy.up()
    for name, data in want.items():

        def landed(n: str = name, d: bytes = data) -> bool:
            return s3.get("alice", n) == d

        wait_for(landed, timeout=60, what=name)
    assert svc.proc.poll() is None
    errors = svc.lines("ERROR")
    assert 1 <= len(errors) <= 5, errors  # one per file and episode at most, no flood
    assert s3.engine.secret not in svc.log()


def test_a_reader_never_sees_a_torn_or_shrunken_object(
    s3: S3,
    start: StartFn,
) -> None:
    u = s3.tree.add_user("alice")
    svc = start(*s3.cli("--settle", "5"), env=s3.engine.env())
    path = s3.tree.source(u.name, "w.jsonl")
    s3.tree.write(u, "w.jsonl", b"")
    full = b"".join(line(i, 300) for i in range(120))
    seen: list[bytes] = []
    stop = threading.Event()
    problems: list[str] = []

    def reader() -> None:
        client = s3.engine.client()
        last = 0
        while not stop.is_set():
            try:
                body = client.get_object(Bucket=s3.bucket, Key=s3.key("alice", "w.jsonl"))[
                    "Body"
                ].read()
            except client.exceptions.NoSuchKey:
                continue
            if body and not body.endswith(b"\n"):
                problems.append(f"torn: {len(body)} bytes")
            if not full.startswith(body):
                problems.append(f"not a prefix: {len(body)} bytes")
            if len(body) < last:
                problems.append(f"shrank from {last} to {len(body)}")
            last = len(body)
            seen.append(body[-20:])
        client.close()

    t = threading.Thread(target=reader)
    t.start()
    try:
        # Mid-line chunks, each an open/append/close like Claude Code's writes (as root on
        # the user's file): 137 bytes at a time, so most closes leave half a line.
        for off in range(0, len(full), 137):
            with open(path, "ab") as f:
                f.write(full[off : off + 137])
            time.sleep(0.02)
        wait_for(lambda: s3.get("alice", "w.jsonl") == full, timeout=30, what="the final object")
    finally:
        stop.set()
        t.join(10)
    assert problems == []
    assert len(seen) > 10
    svc.stop()


# --- races: only on a real engine (moto's conditional create is not atomic) ----------------


@pytest.mark.timeout(240)
def test_16_writers_racing_for_one_key_one_wins_whole(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 hosts whose keys collide (`--object-key {user}/{name}`) create one key at once,
    three times: each time exactly one version lands, whole, and the 15 others fail
    (EEXIST), never overwriting it."""
    rgw = request.getfixturevalue("ceph_rgw")
    engine = Engine("ceph", ("127.0.0.1", rgw.rgw_port), rgw.access_key, rgw.secret_key)
    for k, v in engine.env().items():
        monkeypatch.setenv(k, v)
    bucket = engine.new_bucket()
    client = engine.client()
    trees = [Tree(make_base()) for _ in range(16)]
    try:
        for t in trees:
            t.add_user("alice")
        for round_ in range(3):
            name = f"race{round_}.jsonl"
            sources = []
            for i, t in enumerate(trees):
                data = b"".join(line(1000 * i + j, 200) for j in range(20 + i))
                t.write("alice", name, data, mtime=time.time() - 60)
                sources.append(data)
            barrier = threading.Barrier(16)
            results: list[tuple[int, int]] = []

            def one(
                i: int,
                t: Tree,
                barrier: threading.Barrier = barrier,
                results: list[tuple[int, int]] = results,
            ) -> None:
                cfg = t.config(
                    bucket=Bucket(bucket),
                    host_id=f"h{i}",
                    object_key="{user}/{name}",
                    state_dir=t.base / "state",
                    settle=0.0,
                )
                barrier.wait()
                stats = reconcile(cfg, only=["alice"])
                results.append((stats.files_copied, stats.files_failed))

            threads = [threading.Thread(target=one, args=(i, t)) for i, t in enumerate(trees)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(60)
            copied = sum(c for c, _ in results)
            body = client.get_object(Bucket=bucket, Key=f"alice/{name}")["Body"].read()
            assert copied == 1, results
            assert body in sources
            # Everyone else's earlier objects untouched too: the 15 losers failed.
            assert sum(f for _, f in results) >= 15
    finally:
        client.close()
        engine.stop()
        for t in trees:
            remove_base(t.base)
