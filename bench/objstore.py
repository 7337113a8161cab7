"""The object-store rows of `make bench` (issue 12): session-watcher `run --target s3://…`
against the tools an operator would pick instead (`rclone copy` and `aws s3 sync` on a
10 s and a 60 s timer), on a real single-node Ceph RGW (tests/ceph.py).

Every tool gets its own bucket and its own counting proxy (bench/proxy.py) in front of the
engine, so bytes and requests are what crossed the wire, not what a tool reports. A
watcher per bucket LISTs it directly (not through the proxy) every POLL seconds and GETs
the tail of each changed object: an arrival is the first time an object holds a given
line (lag resolution about POLL), and an object whose bytes do not end a line, or differ
from the source at the same offsets, is a torn object.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .measure import Arrival, Row, landing_times, pct
from .peers import PROJECT, LivePeer
from .proxy import Counts, Proxy
from .tree import Tree, append, line

sys.path.insert(0, str(PROJECT / "tests"))
from ceph import Rgw, missing_binaries, start_rgw

__all__ = [
    "S3_SCENARIOS",
    "S3Sizes",
    "ceph_or_none",
    "s3_burst",
    "s3_hot",
    "s3_outage",
    "s3_restart",
    "sw_supports_s3",
]

Log = Callable[[str], None]
POLL = 0.2  # seconds between two LISTs of a bucket by its watcher
TAIL = 16384  # bytes of an object's end that the watcher GETs and checks
HOST_ID = "bench"
# What the object-store section of bench/results.md says about how it measures.
ABOUT = [
    "On a single-node Ceph RGW (Debian 12 packages, memstore OSD) started by the harness "
    "(tests/ceph.py). Each tool has its own bucket and its own counting proxy: bytes are what "
    "crossed the wire to the engine (client → engine, headers included), requests are "
    "counted by S3 operation at the proxy. A watcher per bucket LISTs it every 0.2 s and GETs "
    "the last 16 KB of each changed object: lag is the time from an append (hot) or from the "
    "end of a burst (bursty) until an object holds that line; a torn object is one whose end "
    "is not a line end or differs from the source. The bursty and outage scenarios run all "
    "tools at once on one tree (each into its own bucket); the hot and restart scenarios one "
    "tool at a time. Timer peers run their command, then sleep the interval (like a cron job "
    "or `OnUnitActiveSec=`)."
]
S3_SCENARIOS = ("s3-hot", "s3-burst", "s3-restart", "s3-outage")


@dataclass(frozen=True)
class S3Sizes:
    quick: bool
    intervals: tuple[int, ...]  # timers of the peers, seconds
    hot_bytes: int
    hot_seconds: float
    burst_users: int
    burst_seconds: float
    burst_on: tuple[float, float]  # a burst lasts U(a, b) seconds
    burst_off: tuple[float, float]  # then the session is quiet U(a, b) seconds
    restart_users: int
    restart_files: int
    outage_users: int
    outage_before: float
    outage_seconds: float


S3_FULL = S3Sizes(
    quick=False,
    intervals=(10, 60),
    hot_bytes=20 << 20,
    hot_seconds=60,
    burst_users=50,
    burst_seconds=600,
    burst_on=(5, 60),
    burst_off=(10, 90),
    restart_users=100,
    restart_files=100,
    outage_users=20,
    outage_before=15,
    outage_seconds=30,
)
S3_QUICK = S3Sizes(
    quick=True,
    intervals=(10,),
    hot_bytes=2 << 20,
    hot_seconds=5,
    burst_users=5,
    burst_seconds=20,
    burst_on=(2, 5),
    burst_off=(2, 6),
    restart_users=10,
    restart_files=20,
    outage_users=4,
    outage_before=3,
    outage_seconds=5,
)


def sw_supports_s3() -> bool:
    """True when the session-watcher in this tree takes `--target s3://…` (issue 11)."""
    r = subprocess.run(
        [sys.executable, "-m", "session_watcher", "run", "--help"],
        capture_output=True,
        cwd=PROJECT,
        check=False,
    )
    return r.returncode == 0 and b"s3://" in r.stdout


def ceph_or_none(work: Path, log: Log) -> Rgw | None:
    missing = missing_binaries()
    if missing:
        log(f"object-store rows skipped: Ceph not installed ({', '.join(missing)})")
        return None
    rgw = start_rgw(work)
    log(f"Ceph RGW up at {rgw.endpoint} in {rgw.start_seconds:.1f} s")
    return rgw


# --- the tools ------------------------------------------------------------------------------


class S3Peer(LivePeer):
    """A tool that ships the home root into one bucket through its own proxy."""

    interval = 0  # timer, seconds (0: a live service)

    def key_of(self, user: str, name: str) -> str:
        return f"{user}/user/sessions/{name}"

    def start_s3(self, tree: Tree, bucket: str, endpoint: str, rgw: Rgw, work: Path) -> None:
        raise NotImplementedError

    def once(self, tree: Tree, bucket: str, endpoint: str, rgw: Rgw) -> list[str]:
        """The command of one run (timer peers)."""
        raise NotImplementedError

    def env(self, rgw: Rgw, endpoint: str) -> dict[str, str]:
        # The engine is plain HTTP on loopback; a CA bundle from the caller's environment
        # only breaks rclone ("unable to load custom CA bundle").
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        env.update(rgw.env(endpoint))
        return env


TIMER = r"""
# A timer the way a cron job or a systemd timer (OnUnitActiveSec=) runs a sync: run, wait.
interval=$1; shift
while :; do "$@" >>"$TIMER_LOG" 2>&1; sleep "$interval"; done
"""


class TimerPeer(S3Peer):
    def __init__(self, interval: int) -> None:
        super().__init__()
        self.interval = interval
        self.key = f"{self.tool}-{interval}"
        self.label = f"{self.base_label} every {interval} s"

    base_label = ""

    def start_s3(self, tree: Tree, bucket: str, endpoint: str, rgw: Rgw, work: Path) -> None:
        script = work / "timer.sh"
        script.write_text(TIMER)
        env = self.env(rgw, endpoint)
        env["TIMER_LOG"] = str(work / f"{self.key}.log")
        cmd = ["bash", str(script), str(self.interval), *self.once(tree, bucket, endpoint, rgw)]
        self._spawn(cmd, work / f"{self.key}.out", env)


class Rclone(TimerPeer):
    tool = "rclone"
    base_label = "rclone copy"

    def env(self, rgw: Rgw, endpoint: str) -> dict[str, str]:
        env = super().env(rgw, endpoint)
        env.update(
            RCLONE_CONFIG_CEPH_TYPE="s3",
            RCLONE_CONFIG_CEPH_PROVIDER="Ceph",
            RCLONE_CONFIG_CEPH_ENDPOINT=endpoint,
            RCLONE_CONFIG_CEPH_ACCESS_KEY_ID=rgw.access_key,
            RCLONE_CONFIG_CEPH_SECRET_ACCESS_KEY=rgw.secret_key,
            RCLONE_CONFIG_CEPH_REGION=rgw.region,
        )
        return env

    def once(self, tree: Tree, bucket: str, endpoint: str, rgw: Rgw) -> list[str]:
        return [
            "rclone",
            "copy",
            str(tree.root),
            f"ceph:{bucket}",
            "--include",
            "/*/user/sessions/*.jsonl",
        ]


class AwsSync(TimerPeer):
    tool = "aws"
    base_label = "aws s3 sync"

    def once(self, tree: Tree, bucket: str, endpoint: str, rgw: Rgw) -> list[str]:
        return [
            "aws",
            "s3",
            "sync",
            str(tree.root),
            f"s3://{bucket}",
            "--exclude",
            "*",
            "--include",
            "*/user/sessions/*.jsonl",
            "--only-show-errors",
        ]


class SwS3(S3Peer):
    """`session-watcher run --target s3://BUCKET` (READY=1 read from a NOTIFY_SOCKET)."""

    key = "sw"
    label = "session-watcher"

    def __init__(self) -> None:
        super().__init__()
        self._sock: socket.socket | None = None
        self.state: Path | None = None

    def key_of(self, user: str, name: str) -> str:
        return f"{HOST_ID}/{user}/{name}"

    def unavailable(self) -> str | None:
        if not sw_supports_s3():
            return "this session-watcher has no `--target s3://` yet (issue 11)"
        return None

    def command(self, tree: Tree, bucket: str, state: Path, sub: str = "run") -> list[str]:
        return [
            sys.executable,
            "-m",
            "session_watcher",
            sub,
            "--home-root",
            str(tree.root),
            "--target",
            f"s3://{bucket}",
            "--host-id",
            HOST_ID,
            "--state-dir",
            str(state),
            "--min-uid",
            "0",
            "--group",
            "root",
        ]

    def start_s3(self, tree: Tree, bucket: str, endpoint: str, rgw: Rgw, work: Path) -> None:
        if self.state is None:
            self.state = work / f"state-{bucket}"
            self.state.mkdir(parents=True, exist_ok=True)
        path = work / f"notify-{os.getpid()}-{time.monotonic_ns()}.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        self._sock = sock
        env = {
            k: v
            for k, v in self.env(rgw, endpoint).items()
            if not k.startswith(("NOTIFY_", "WATCHDOG_", "SESSION_WATCHER_"))
        }
        env["NOTIFY_SOCKET"] = str(path)
        self._spawn(self.command(tree, bucket, self.state), work / f"sw-{bucket}.log", env)
        sock.settimeout(0.5)
        deadline = time.monotonic() + 600
        while True:
            try:
                msg = sock.recv(4096)
            except TimeoutError:
                assert self.proc is not None
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("session-watcher did not send READY=1") from None
                continue
            if b"READY=1" in msg.split(b"\n"):
                return

    def stop(self) -> None:
        super().stop()
        if self._sock is not None:
            self._sock.close()
            self._sock = None


TOOL_KEYS = ("sw", "rclone", "aws")  # --tools for the object-store rows
_only: tuple[str, ...] = ()  # set by run_all: only these tools (empty: all)


def _wanted(peers: list[S3Peer]) -> list[S3Peer]:
    return [p for p in peers if not _only or (p.tool or p.key) in _only]


def s3_peers(sizes: S3Sizes) -> list[S3Peer]:
    peers: list[S3Peer] = [SwS3()]
    for i in sizes.intervals:
        peers += [Rclone(i), AwsSync(i)]
    return _wanted(peers)


# --- watching a bucket ----------------------------------------------------------------------


def _last_seq(data: bytes) -> int:
    """seq of the last complete line of `data` (-1: none)."""
    end = data.rfind(b"\n")
    if end < 0:
        return -1
    start = data.rfind(b"\n", 0, end) + 1
    ln = data[start:end]
    if not ln.startswith(b'{"seq":'):
        return -1
    return int(ln[7 : ln.index(b",")])


class BucketWatch:
    """LIST the bucket every POLL s; GET the tail of each changed object; record arrivals
    and torn objects. Keys map to source files."""

    def __init__(self, rgw: Rgw, bucket: str, keys: dict[str, Path], tails: bool = True) -> None:
        self.tails = tails  # False: sizes from LIST only (10,000 objects: no GET each)
        self.s3 = rgw.client()
        self.bucket, self.keys = bucket, keys
        self.index = {k: i for i, k in enumerate(keys)}
        self.seen: dict[str, tuple[int, str]] = {}
        self.arrivals: list[Arrival] = []
        self.torn: list[str] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{bucket}", daemon=True)
        self._thread.start()

    def key(self, k: str) -> tuple[int, str]:
        return (self.index[k], k)

    def _run(self) -> None:
        while not self._stop.wait(POLL):
            try:
                self._round()
            except Exception:  # engine down (outage), a reset: count, go on
                self.errors += 1

    def _round(self) -> None:
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for o in page.get("Contents", []):
                k, size, etag = o["Key"], int(o["Size"]), str(o["ETag"])
                if k not in self.keys or self.seen.get(k) == (size, etag) or size == 0:
                    continue
                if not self.tails:
                    self.seen[k] = (size, etag)
                    continue
                t = time.monotonic()
                start = max(0, size - TAIL)
                got = self.s3.get_object(Bucket=self.bucket, Key=k, Range=f"bytes={start}-")
                data = got["Body"].read()
                self.seen[k] = (size, etag)
                with open(self.keys[k], "rb") as f:
                    f.seek(start)
                    src = f.read(len(data))
                if not data.endswith(b"\n") or src != data:
                    self.torn.append(f"{k} at {start + len(data)} B")
                self.arrivals.append(Arrival(self.key(k), t, size, _last_seq(data)))

    def current(self) -> list[str]:
        """Keys whose object, as this watcher last saw it, lacks its source's size."""
        seen = dict(self.seen)
        return [k for k, p in self.keys.items() if seen.get(k, (-1, ""))[0] != p.stat().st_size]

    def exact(self) -> list[str]:
        """Keys whose object is not byte-identical to its source (full GETs)."""
        bad = []
        for k, p in self.keys.items():
            try:
                data = self.s3.get_object(Bucket=self.bucket, Key=k)["Body"].read()
            except Exception:
                data = None
            if data != p.read_bytes():
                bad.append(k)
        return bad

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.s3.close()


class _Run:
    """One tool on one tree: its bucket, its proxy, the tool started, its watcher."""

    def __init__(self, peer: S3Peer, tree: Tree, rgw: Rgw, work: Path, tag: str) -> None:
        self.peer, self.tree, self.rgw = peer, tree, rgw
        self.bucket = f"{tag}-{peer.key}".lower().replace("_", "-")
        self.dir = work / self.bucket
        self.dir.mkdir(parents=True, exist_ok=True)
        s3 = rgw.client()
        s3.create_bucket(Bucket=self.bucket)
        s3.close()
        self.proxy = Proxy(rgw.rgw_port)
        self.keys = {peer.key_of(u, n): tree.path(u, n) for u, n in tree.pairs()}
        self.watch: BucketWatch | None = None

    def start(self, tails: bool = True) -> None:
        self.peer.start_s3(self.tree, self.bucket, self.proxy.endpoint, self.rgw, self.dir)
        self.watch = BucketWatch(self.rgw, self.bucket, self.keys, tails)

    def wait_current(self, timeout: float) -> float | None:
        """Seconds until every object has its source's size (None: not by the deadline)."""
        assert self.watch is not None
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not self.watch.current():
                return time.monotonic() - t0
            time.sleep(0.25)
        return None

    def close(self) -> None:
        self.peer.stop()
        if self.watch is not None:
            self.watch.stop()
        self.proxy.close()


def _available(peers: list[S3Peer], scenario: str, log: Log) -> tuple[list[S3Peer], list[Row]]:
    ok, rows = [], []
    for p in peers:
        why = p.unavailable()
        if why:
            log(f"{scenario}: skipping {p.label}: {why}")
            rows.append(Row(scenario, p.label, "skipped", why))
        else:
            ok.append(p)
    return ok, rows


def _drain_budget(peer: S3Peer) -> float:
    return (2 * peer.interval + 60) if peer.interval else 60


def _req(c: Counts) -> str:
    kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(c.by_kind.items()))
    return f"{c.requests:,} ({kinds})" if kinds else f"{c.requests:,}"


def _lags(lags: list[float]) -> str:
    if not lags:
        return "— / — / —"
    return f"{pct(lags, 50):.1f} / {pct(lags, 99):.1f} / {max(lags):.1f}"


# --- hot transcript -------------------------------------------------------------------------


def s3_hot(sizes: S3Sizes, rgw: Rgw, work: Path, log: Log) -> list[Row]:
    scen = "S3 hot transcript"
    peers, rows = _available(s3_peers(sizes), scen, log)
    for peer in peers:
        tree = Tree(work / f"s3hot-{peer.key}")
        tree.add_file("hot", "long.jsonl", sizes.hot_bytes)
        src = tree.path("hot", "long.jsonl")
        seq = 0
        run = _Run(peer, tree, rgw, work, "hot")
        try:
            run.start()
            if run.wait_current(_drain_budget(peer) + 120) is None:
                rows.append(Row(scen, peer.label, "first upload", "never landed"))
                continue
            assert run.watch is not None
            c0, cpu0 = run.proxy.counts(), peer.cpu_seconds()
            chunks: list[tuple[tuple[int, str], int, float]] = []
            k = run.watch.key(peer.key_of("hot", "long.jsonl"))
            t0 = time.monotonic()
            produced = 0
            for i in range(int(sizes.hot_seconds * 10)):
                delay = t0 + i * 0.1 - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                seq += 1
                chunk = line(seq, 2048) * 5  # 10 KB, one close
                append(src, chunk)
                produced += len(chunk)
                chunks.append((k, seq, time.monotonic()))
            done = run.wait_current(_drain_budget(peer))
            elapsed = time.monotonic() - t0
            cpu = peer.cpu_seconds() - cpu0
            c = run.proxy.counts().minus(c0)
            exact = not run.watch.exact()
            torn = len(run.watch.torn)
            lags = [x for x in landing_times(chunks, run.watch.arrivals) if x is not None]
        finally:
            run.close()
            shutil.rmtree(tree.root, ignore_errors=True)
        ratio = c.bytes_up / produced
        unlanded = len(chunks) - len(lags)
        target = verdict = ""
        if isinstance(peer, SwS3):
            target = "≤ 1.5x bytes, lag p99 ≤ 10 s, 0 torn, final exact"
            ok = ratio <= 1.5 and lags and pct(lags, 99) <= 10 and not torn and exact
            verdict = "met" if ok and not unlanded else "missed"
        rows.append(
            Row(
                scen,
                peer.label,
                f"{sizes.hot_bytes >> 20} MB + 10 KB every 100 ms for {sizes.hot_seconds:.0f} s: "
                "bytes sent ÷ bytes produced / requests / lag s p50 / p99 / max / "
                "CPU s (cores) / torn / final exact (1 run)"
                + (f"; {unlanded} chunks never seen" if unlanded else ""),
                f"{ratio:.2f}x / {_req(c)} / {_lags(lags)} / {cpu:.2f} ({cpu / elapsed:.3f}) / "
                f"{torn} / {'yes' if exact and done is not None else 'NO'}",
                target,
                verdict,
            )
        )
        log(f"{scen}: {peer.label}: {rows[-1].result}")
    return rows


# --- bursty sessions (all tools at once on one tree) -----------------------------------------


class Bursts:
    """Users appending every 100 ms for U(on) s, then quiet U(off) s, until `seconds`.
    Records every append (user, seq, t) and every burst end."""

    def __init__(self, tree: Tree, users: list[str], sizes: S3Sizes, seed: int) -> None:
        self.tree, self.users, self.sizes = tree, users, sizes
        self.rng = random.Random(seed)  # noqa: S311  (a repeatable workload)
        self.seq = dict.fromkeys(users, 0)
        self.produced = 0
        self.ends: list[tuple[str, int, float]] = []  # (user, last seq, t)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bursts", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        on, off = self.sizes.burst_on, self.sizes.burst_off
        t0 = time.monotonic()
        # user -> (burst ends at, next quiet ends at); users start staggered
        state = {u: (t0 + self.rng.uniform(*on), 0.0) for u in self.users}
        nxt = t0
        while not self._stop.is_set():
            now = time.monotonic()
            for u in self.users:
                end, quiet_end = state[u]
                if now < end:
                    self.seq[u] += 1
                    data = line(self.seq[u], self.rng.randint(300, 3000))
                    append(self.tree.path(u, "s.jsonl"), data)
                    self.produced += len(data)
                elif quiet_end == 0.0:
                    if self.seq[u]:
                        self.ends.append((u, self.seq[u], time.monotonic()))
                    state[u] = (end, now + self.rng.uniform(*off))
                elif now >= quiet_end:
                    state[u] = (now + self.rng.uniform(*on), 0.0)
            nxt += 0.1
            self._stop.wait(max(0.0, nxt - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        now = time.monotonic()
        ended = {u for u, _, t in self.ends}
        for u in self.users:  # a burst cut by the end of the run ends now
            last = max((s for v, s, _ in self.ends if v == u), default=0)
            if self.seq[u] > last or u not in ended:
                self.ends.append((u, self.seq[u], now))


def _side_by_side(
    sizes: S3Sizes,
    rgw: Rgw,
    work: Path,
    log: Log,
    scen: str,
    tag: str,
    nusers: int,
    during: Callable[[Bursts], None],
) -> tuple[list[_Run], Bursts, Tree, float, dict[str, Counts], list[Row]]:
    """Start every available tool on one tree (each its own bucket), wait until each holds
    the first versions, run the bursts while `during(bursts)` runs, stop the bursts."""
    tree = Tree(work / f"{tag}-home")
    users = [f"u{i:03d}" for i in range(nusers)]
    for u in users:
        tree.add_file(u, "s.jsonl", 4096)
    peers, rows = _available(s3_peers(sizes), scen, log)
    runs: list[_Run] = []
    for p in peers:
        r = _Run(p, tree, rgw, work, tag)
        runs.append(r)
        r.start()
    for r in runs:
        if r.wait_current(_drain_budget(r.peer) + 60) is None:
            log(f"{scen}: {r.peer.label}: first versions never all landed")
    c0 = {r.peer.key: r.proxy.counts() for r in runs}
    bursts = Bursts(tree, users, sizes, seed=12)
    t0 = time.monotonic()
    bursts.start()
    try:
        during(bursts)
    finally:
        bursts.stop()
    return runs, bursts, tree, time.monotonic() - t0, c0, rows


def s3_burst(sizes: S3Sizes, rgw: Rgw, work: Path, log: Log) -> list[Row]:
    scen = "S3 bursty sessions"
    runs, bursts, tree, wall, c0, rows = _side_by_side(
        sizes,
        rgw,
        work,
        log,
        scen,
        "burst",
        sizes.burst_users,
        lambda b: time.sleep(sizes.burst_seconds),
    )
    try:
        for r in runs:
            r.wait_current(_drain_budget(r.peer))
        for r in runs:
            assert r.watch is not None
            c = r.proxy.counts().minus(c0[r.peer.key])
            ends = [(r.watch.key(r.peer.key_of(u, "s.jsonl")), s, t) for u, s, t in bursts.ends]
            got = landing_times(ends, r.watch.arrivals)
            lags = [x for x in got if x is not None]
            never = len(got) - len(lags)
            hours = sizes.burst_users * wall / 3600
            torn = len(r.watch.torn)
            exact = not r.watch.exact()
            target = verdict = ""
            if isinstance(r.peer, SwS3):
                target = "lag p99 ≤ 5 s after a burst, 0 torn, final exact"
                ok = lags and pct(lags, 99) <= 5 and not torn and not never and exact
                verdict = "met" if ok else "missed"
            rows.append(
                Row(
                    scen,
                    r.peer.label,
                    f"{sizes.burst_users} users, appends every 100 ms for "
                    f"{sizes.burst_on[0]:.0f}-{sizes.burst_on[1]:.0f} s then quiet "
                    f"{sizes.burst_off[0]:.0f}-{sizes.burst_off[1]:.0f} s, "
                    f"{wall / 60:.1f} min, all tools at once: lag s after a burst ends "
                    "p50 / p99 / max / requests per session-hour / bytes sent ÷ produced / "
                    f"torn objects seen / final exact ({len(ends)} bursts"
                    + (f", {never} never seen" if never else "")
                    + ")",
                    f"{_lags(lags)} / {c.requests / hours:,.0f} / "
                    f"{c.bytes_up / max(1, bursts.produced):.2f}x / {torn} / "
                    f"{'yes' if exact else 'NO'}",
                    target,
                    verdict,
                )
            )
            log(f"{scen}: {r.peer.label}: {rows[-1].result}")
    finally:
        for r in runs:
            r.close()
        shutil.rmtree(tree.root, ignore_errors=True)
    return rows


# --- store outage ---------------------------------------------------------------------------


def s3_outage(sizes: S3Sizes, rgw: Rgw, work: Path, log: Log) -> list[Row]:
    scen = "S3 store outage"
    back: list[float] = []

    def outage(_b: Bursts) -> None:
        time.sleep(sizes.outage_before)
        rgw.stop_rgw()
        log(f"{scen}: radosgw killed (-9) for {sizes.outage_seconds:.0f} s")
        time.sleep(sizes.outage_seconds)
        rgw.start_rgw()
        back.append(time.monotonic())
        log(f"{scen}: radosgw back")

    runs, _bursts, tree, _wall, _c0, rows = _side_by_side(
        sizes, rgw, work, log, scen, "outage", sizes.outage_users, outage
    )
    try:
        # All tools ran at once: each one's time counts from the engine's return, polled
        # together so that a slow tool does not hide a fast one's figure.
        done: dict[str, float | None] = {r.peer.key: None for r in runs}
        deadline = {r.peer.key: back[0] + _drain_budget(r.peer) + 60 for r in runs}
        waiting = list(runs)
        while waiting:
            for r in list(waiting):
                assert r.watch is not None
                if not r.watch.current():
                    done[r.peer.key] = time.monotonic() - back[0]
                    waiting.remove(r)
                elif time.monotonic() > deadline[r.peer.key]:
                    waiting.remove(r)
            time.sleep(0.1)
        for r in runs:
            assert r.watch is not None
            lost = len(r.watch.exact())
            t = done[r.peer.key]
            target = verdict = ""
            if isinstance(r.peer, SwS3):
                target = "0 lost, current ≤ 60 s after the engine is back"
                verdict = "met" if not lost and t is not None and t <= 60 else "missed"
            rows.append(
                Row(
                    scen,
                    r.peer.label,
                    f"{sizes.outage_users} users in bursts, radosgw killed (-9) for "
                    f"{sizes.outage_seconds:.0f} s, then started: s until every object is "
                    "current (after the engine is back) / objects lost / torn seen",
                    f"{'never' if t is None else f'{t:.1f}'} / {lost} / {len(r.watch.torn)}",
                    target,
                    verdict,
                )
            )
            log(f"{scen}: {r.peer.label}: {rows[-1].result}")
    finally:
        if not rgw.rgw_ready():
            rgw.start_rgw()
        for r in runs:
            r.close()
        shutil.rmtree(tree.root, ignore_errors=True)
    return rows


# --- restart over many objects in sync ------------------------------------------------------


def _idle(proxy: Proxy, quiet: float, timeout: float) -> float:
    """Wait until no request has crossed the proxy for `quiet` s; seconds waited."""
    t0 = time.monotonic()
    last, since = proxy.counts().requests, time.monotonic()
    while time.monotonic() - t0 < timeout:
        time.sleep(0.2)
        n = proxy.counts().requests
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return since - t0


def s3_restart(sizes: S3Sizes, rgw: Rgw, work: Path, log: Log) -> list[Row]:
    scen = "S3 restart"
    nobj = sizes.restart_users * sizes.restart_files
    tree = Tree(work / "restart-home")
    for u in range(sizes.restart_users):
        user = f"u{u:04d}"
        d = tree.add_user(user)
        for f in range(sizes.restart_files):
            name = f"s{f:03d}.jsonl"
            (d / name).write_bytes(line(f, 1500))
            tree.files[user].append(name)
    # one row per tool, not per timer: a restart is one run of the timer's command
    peers, rows = _available(_wanted([SwS3(), Rclone(10), AwsSync(10)]), scen, log)
    try:
        for peer in peers:
            run = _Run(peer, tree, rgw, work, "restart")
            try:
                t0 = time.monotonic()
                if isinstance(peer, SwS3):
                    run.start(tails=False)
                    if run.wait_current(1800) is None:
                        rows.append(Row(scen, peer.label, "first pass", "never in sync"))
                        continue
                    _idle(run.proxy, 3, 120)
                    peer.stop()
                    log(
                        f"{scen}: {peer.label}: {nobj:,} objects in sync after "
                        f"{time.monotonic() - t0:.0f} s; restarting"
                    )
                    c0 = run.proxy.counts()
                    t1 = time.monotonic()
                    run.peer.start_s3(tree, run.bucket, run.proxy.endpoint, rgw, run.dir)
                    ready = time.monotonic() - t1
                    # until idle: start-up to READY=1, then to its last request before 5 s
                    # without any
                    wall = ready + _idle(run.proxy, 5, 600)
                    c = run.proxy.counts().minus(c0)
                else:
                    cmd = peer.once(tree, run.bucket, run.proxy.endpoint, rgw)
                    env = peer.env(rgw, run.proxy.endpoint)
                    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=1800)
                    log(
                        f"{scen}: {peer.label}: {nobj:,} objects in sync after "
                        f"{time.monotonic() - t0:.0f} s; running it again"
                    )
                    c0 = run.proxy.counts()
                    t1 = time.monotonic()
                    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=1800)
                    wall = time.monotonic() - t1
                    c = run.proxy.counts().minus(c0)
            finally:
                run.close()
            uploads = c.by_kind["put"] + c.by_kind["part"] + c.by_kind["copy-part"]
            target = verdict = ""
            if isinstance(peer, SwS3):
                target = "0 uploads"
                verdict = "met" if uploads == 0 else "missed"
            label = peer.base_label if isinstance(peer, TimerPeer) else peer.label
            rows.append(
                Row(
                    scen,
                    label,
                    f"{nobj:,} objects in sync, the tool restarted (a timer: its command run "
                    "again): requests / uploads / MB up / MB down / s until idle (1 run)",
                    f"{_req(c)} / {uploads} / {c.bytes_up / 1e6:.2f} / "
                    f"{c.bytes_down / 1e6:.2f} / {wall:.1f}",
                    target,
                    verdict,
                )
            )
            log(f"{scen}: {label}: {rows[-1].result}")
    finally:
        shutil.rmtree(tree.root, ignore_errors=True)
    return rows


def run_all(
    wanted: list[str], quick: bool, work: Path, log: Log, tools: list[str] | None = None
) -> list[Row]:
    """The object-store scenarios in `wanted`, on one Ceph cluster started for them;
    `tools`: only these (TOOL_KEYS)."""
    global _only
    _only = tuple(tools or ())
    names = [w for w in wanted if w in S3_SCENARIOS]
    if not names:
        return []
    sizes = S3_QUICK if quick else S3_FULL
    rgw = ceph_or_none(work, log)
    if rgw is None:
        return [Row("Object store", "all", "skipped", "Ceph not installed")]
    rows: list[Row] = []
    try:
        for name in names:
            log(f"scenario {name}")
            fn: dict[str, Callable[[S3Sizes, Rgw, Path, Log], list[Row]]] = {
                "s3-hot": s3_hot,
                "s3-burst": s3_burst,
                "s3-restart": s3_restart,
                "s3-outage": s3_outage,
            }
            rows += fn[name](sizes, rgw, work, log)
    finally:
        rgw.cleanup()
    return rows
