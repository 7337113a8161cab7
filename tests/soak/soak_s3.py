# ruff: noqa: S311  (the schedule is random.Random(seed), to be replayable; nothing secret)
"""`SOAK_TARGET=s3 make soak`: today's soak (soak.py) with the store on a real Ceph RGW
(tests/ceph.py), through a loopback proxy that drops and stalls connections (bench/proxy.py).

The service runs `--target s3://soak --host-id soak` with the standard AWS variables
pointing at the proxy. Chaos keeps kill -9 (also right after a multi-MB file closed: mid
multipart), the inotify overflow, churn and attacks of today's soak, and replaces the full
disk by engine faults: radosgw killed and restarted, once per run the whole cluster (mon,
OSD, radosgw) stopped and started, connections reset or stalled by the proxy. Readers GET
every changed object in a loop, directly from the engine, and check that each is a
line-complete prefix of what its writer wrote and holds no secret. At the end: every
source byte-identical in its object, no torn read, no secret, no object for a refused
entry or an attacker, no incomplete multipart upload (ListMultipartUploads empty), and
the service's index (if it keeps one in its state directory) agreeing with the bucket.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
from typing import Any

from soak import REPO, Soak, say

sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from ceph import Rgw, missing_binaries, start_rgw

from bench.proxy import Proxy

BUCKET = "soak"
HOST = "soak"
PREFIX = f"{HOST}/"


def key_ok(user: str, name: str) -> bool:
    """Whether the service can name this transcript's object: a key must be valid UTF-8 of
    at most 1,024 bytes (issue 11); any other name is refused like a hostile entry."""
    try:
        return len(f"{PREFIX}{user}/{name}".encode()) <= 1024
    except UnicodeEncodeError:
        return False


def supports_s3() -> bool:
    r = subprocess.run(
        [sys.executable, "-m", "session_watcher", "run", "--help"],
        capture_output=True,
        cwd=REPO,
        check=False,
    )
    return r.returncode == 0 and b"s3://" in r.stdout


class SoakS3(Soak):
    def __init__(self) -> None:
        super().__init__()
        # No issue-14 abusers here: one memstore Ceph on the soak's two cores takes about
        # 30 PUTs/s, so one abuser's thousand tiny files already hold every other user's
        # uploads for half a minute (per-user budgets do not bound the engine's share;
        # see the README). The object store's own faults are what this soak is about.
        self.abuse_scale = {}
        self.rgw: Rgw | None = None
        self.proxy: Proxy | None = None
        self.state_dir = self.base / "state"
        self.engine_lock = threading.Lock()  # one engine fault at a time
        self.engine_restarts = 0
        self.cluster_restarts = 0
        self.dropped = 0
        self.stalled = 0
        self.reads = 0
        self.orphaned: list[str] = []
        self.index_note = "no index found"
        self.quick = False

    # --- setup ----------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()  # forks the writers before any thread exists
        # Ceph's logs go with the service logs: kept when a run fails.
        self.rgw = start_rgw(self.logdir)
        say(f"Ceph RGW up at {self.rgw.endpoint} in {self.rgw.start_seconds:.1f} s")
        s3 = self.rgw.client()
        s3.create_bucket(Bucket=BUCKET)
        s3.close()
        self.proxy = Proxy(self.rgw.rgw_port)
        os.environ.pop("AWS_CA_BUNDLE", None)  # plain HTTP on loopback
        for k in list(os.environ):
            if k.startswith("AWS_"):
                del os.environ[k]
        os.environ.update(self.rgw.env(self.proxy.endpoint))
        self.state_dir.mkdir(mode=0o700)

    def client(self) -> Any:
        """A direct client (not through the proxy) for readers and checks."""
        assert self.rgw is not None
        return self.rgw.client(max_pool_connections=4)

    def service_argv(self) -> list[str]:
        argv = super().service_argv()
        argv[argv.index("--target") + 1] = f"s3://{BUCKET}"
        return [*argv, "--host-id", HOST, "--state-dir", str(self.state_dir)]

    # --- chaos ------------------------------------------------------------------------------

    def chaos(self) -> None:
        rng = random.Random(self.seed + 2)
        # Every action at least once, the engine and network faults first (a quick run
        # has time for about ten actions); `must` is popped from its end.
        first = ["kill-mid-copy", "rgw", "cluster", "drop", "stall"]
        rest = ["kill", "overflow", "new-home", "recreate", "rename", "kill-then-rename"]
        rng.shuffle(first)
        rng.shuffle(rest)
        must = rest + first
        self.quick = self.seconds < 90
        weights = {
            "kill": 4,
            "kill-mid-copy": 3,
            "overflow": 1,
            "rgw": 3,
            "drop": 2,
            "stall": 3,
            "new-home": 1,
            "recreate": 1,
            "rename": 1,
            "kill-then-rename": 1,
        }
        gap = (2.0, 6.0) if self.seconds >= 90 else (1.0, 2.5)
        if self.stop.wait(rng.uniform(*gap)):
            return
        while not self.stop.is_set():
            action = must.pop() if must else rng.choices(*zip(*weights.items(), strict=True))[0]
            try:
                getattr(self, "do_" + action.replace("-", "_"))(rng)
            except Exception as e:
                self.problem(f"chaos {action}: {e!r}")
            if self.stop.wait(rng.uniform(*gap)):
                return

    def do_rgw(self, rng: random.Random) -> None:
        """radosgw killed (-9), down for 1-8 s (quick: 1-3 s), started again."""
        assert self.rgw is not None
        with self.engine_lock:
            self.rgw.stop_rgw()
            try:
                self.stop.wait(rng.uniform(1.0, 3.0 if self.quick else 8.0))
            finally:
                self.rgw.start_rgw()
            self.engine_restarts += 1

    def do_cluster(self, rng: random.Random) -> None:
        """The whole cluster (mon, OSD, radosgw) stopped, down 1-5 s (quick 1-2 s), started."""
        assert self.rgw is not None
        with self.engine_lock:
            self.rgw.stop_cluster()
            try:
                self.stop.wait(rng.uniform(1.0, 2.0 if self.quick else 5.0))
            finally:
                self.rgw.start_cluster()
            self.engine_restarts += 1
            self.cluster_restarts += 1

    def do_drop(self, rng: random.Random) -> None:
        assert self.proxy is not None
        self.dropped += self.proxy.drop(rng.uniform(0.3, 1.0))

    def do_stall(self, rng: random.Random) -> None:
        assert self.proxy is not None
        seconds = rng.uniform(2.0, 5.0 if self.quick else 15.0)
        self.stalled += self.proxy.stall(seconds, rng.uniform(0.3, 1.0))

    def do_enospc(self, rng: random.Random) -> None:  # no local store to fill
        self.do_stall(rng)

    # --- readers and checks -------------------------------------------------------------------

    def objects(self, s3: Any) -> list[tuple[str, str, str, str]]:
        """(user, name, key, etag) of every object under the host's prefix."""
        out = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            for o in page.get("Contents", []):
                key = str(o["Key"])
                if not key.startswith(PREFIX):
                    with self.fig_lock:
                        self.leaked.append(f"object outside the host's prefix: {key!r}")
                    continue
                user, _, name = key[len(PREFIX) :].partition("/")
                out.append((user, name, key, str(o["ETag"])))
        return out

    def get(self, s3: Any, key: str) -> tuple[bytes, str] | None:
        try:
            r = s3.get_object(Bucket=BUCKET, Key=key)
        except s3.exceptions.NoSuchKey:
            return None
        return r["Body"].read(), str(r["ETag"])

    def reader(self, reverse: bool) -> None:
        s3 = self.client()
        seen: dict[str, str] = {}
        try:
            while not self.readers_stop.is_set():
                try:
                    objs = self.objects(s3)
                except Exception:  # engine down or restarting: try again
                    self.readers_stop.wait(0.2)
                    continue
                if reverse:
                    objs.reverse()
                for user, name, key, etag in objs:
                    if seen.get(key) == etag or user in self.abusers:
                        continue
                    try:
                        got = self.get(s3, key)
                    except Exception:
                        break
                    if got is None:
                        continue
                    data, seen[key] = got
                    self.reads += 1
                    self.check_file(user, name, data, "reader")
                self.readers_stop.wait(0.05)
        finally:
            s3.close()

    def final_mismatches(self) -> list[str]:
        out = []
        s3 = self.client()
        try:
            stored = {(u, n): k for u, n, k, _ in self.objects(s3)}
            for u in self.users:
                for s in u.sessions:
                    if s.deleted:
                        continue
                    src = self.sessions_dir(u) / s.name
                    try:
                        on_disk = src.read_bytes()
                    except FileNotFoundError:
                        if not s.data:
                            continue
                        out.append(f"source {src!r} missing")
                        continue
                    except OSError as e:
                        out.append(f"source {src!r} unreadable: {e}")
                        continue
                    if on_disk != s.data:
                        self.problem(f"harness: source {src!r} differs from what was written")
                    if not key_ok(u.name, s.name):
                        continue  # refused: check_file reports an object for it, if any
                    key = stored.get((u.name, s.name))
                    got = None if key is None else self.get(s3, key)
                    if got is None:
                        out.append(f"{u.name}/{s.name!r} ({len(s.data)} bytes) has no object")
                    elif got[0] != s.data:
                        out.append(
                            f"{u.name}/{s.name!r}: object has {len(got[0])} bytes, "
                            f"source {len(s.data)}"
                        )
        except Exception as e:  # the engine is up at the end; an error here is a finding
            out.append(f"checking the bucket: {e!r}")
        finally:
            s3.close()
        return out

    def check_index(self, s3: Any, objs: list[tuple[str, str, str, str]]) -> None:
        """If the service keeps an sqlite index with (key, etag) rows in its state directory,
        every row must name an object of the bucket with that ETag."""
        etags = {k: e.strip('"') for _, _, k, e in objs}
        for db in sorted(self.state_dir.glob("*.sqlite*")) + sorted(self.state_dir.glob("*.db")):
            if db.suffix in (".sqlite-wal", ".sqlite-shm"):
                continue
            try:
                con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            except sqlite3.Error:
                continue
            try:
                tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master")]
                for t in tables:
                    cols = [r[1] for r in con.execute(f"PRAGMA table_info({t})")]
                    if "key" not in cols or "etag" not in cols:
                        continue
                    rows = con.execute(f"SELECT key, etag FROM {t}").fetchall()  # noqa: S608
                    bad = [k for k, e in rows if etags.get(k) != str(e).strip('"')]
                    self.index_note = f"index {db.name}: {len(rows)} rows, {len(bad)} disagree"
                    for k in bad[:10]:
                        self.problem(f"index row {k!r} does not match the bucket")
            except sqlite3.Error as e:
                self.index_note = f"index {db.name} unreadable: {e}"
            finally:
                con.close()

    def verdict(self) -> int:
        s3 = self.client()
        try:
            objs = self.objects(s3)
            for user, name, key, _ in objs:
                if user in self.abusers:
                    continue  # an abuse's object: abuse_problems checks their share
                got = self.get(s3, key)
                if got is not None:
                    self.check_file(user, name, got[0], "final")
            for user, _, key, _ in objs:
                if user in self.attackers:
                    self.leaked.append(f"object for attacker {user}: {key!r}")
            usage: dict[str, list[tuple[str, int]]] = {}
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
                for o in page.get("Contents", []):
                    user, _, name = str(o["Key"])[len(PREFIX) :].partition("/")
                    if user in self.abusers:
                        usage.setdefault(user, []).append((name, int(o["Size"])))
            uploads = s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
            self.orphaned = [f"{u['Key']!r} ({u['UploadId']})" for u in uploads]
            self.check_index(s3, objs)
        finally:
            s3.close()
        for item in self.orphaned[:10]:
            self.problem(f"incomplete multipart upload left: {item}")
        for gap in self.watchdog_gaps():
            self.problem("watchdog: " + gap)
        detected = self.count_log("inotify queue overflowed")
        if self.overflow_episodes and not detected:
            self.problem("no overflow was ever detected by the service")
        for item in self.abuse_problems(usage):
            self.problem(item)
        for what, items in (("LOST", self.lost), ("TORN", self.torn), ("LEAKED", self.leaked)):
            for item in items[:20]:
                say(f"{what}: {item}")
            if len(items) > 20:
                say(f"{what}: ... and {len(items) - 20} more")
        ok = not (self.lost or self.torn or self.leaked or self.problems or self.orphaned)
        assert self.proxy is not None
        c = self.proxy.counts()
        say(
            f"{len(self.incarnations)} service starts, {detected} overflows detected, "
            f"{self.churn} churn events, {self.behind} files behind before the final pass, "
            f"{self.reads:,} object reads, {c.summary()}, {self.index_note}, "
            f"{len(self.problems)} other problems"
        )
        print(
            f"soak s3: {self.seconds} s, {self.nusers} users, {self.appends:,} appends, "
            f"{self.kills} kill -9, {self.engine_restarts} engine restarts "
            f"({self.cluster_restarts} whole cluster), {self.stalled} stalled connections, "
            f"{self.dropped} dropped, {self.hostile} hostile entries, {len(self.lost)} lost, "
            f"{len(self.torn)} torn, {len(self.leaked)} leaked, "
            f"{len(self.orphaned)} orphaned uploads, {len(self.abusers)} abusers "
            f"({self.abuse_episodes} episodes, peak RSS {self.peak_rss_mb:.0f} MB)",
            flush=True,
        )
        if not ok:
            say(f"FAILED (seed {self.seed}); service and Ceph logs kept in {self.logdir}")
        return 0 if ok else 1

    def cleanup(self, ok: bool) -> None:
        # The service first (it may be mid-request), then the proxy and the engine.
        self.stop.set()
        self.readers_stop.set()
        with self.proc_lock:
            proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGCONT)
                proc.kill()
        if self.proxy is not None:
            self.proxy.close()
        if self.rgw is not None:
            if ok:
                self.rgw.cleanup()
            else:
                self.rgw.stop()
        super().cleanup(ok)


def main() -> int:
    if os.geteuid() != 0:
        print("soak: needs root (writers run as other uids)", file=sys.stderr)
        return 2
    if not supports_s3():
        print(
            "soak s3: SKIPPED: this session-watcher has no `--target s3://` (issue 11)",
            flush=True,
        )
        return 0
    missing = missing_binaries()
    if missing:
        print(
            f"soak s3: Ceph not installed ({', '.join(missing)}): apt-get install -y "
            "--no-install-recommends ceph-mon ceph-osd radosgw ceph-common",
            file=sys.stderr,
        )
        return 2
    soak = SoakS3()

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    code = 1
    try:
        code = soak.run()
    except KeyboardInterrupt:
        say("interrupted")
        code = 130
    finally:
        soak.cleanup(code == 0)
    return code
