"""Figures for the object store (issue 11's closing note), on moto or a local Ceph RGW,
with a counting loopback proxy between session-watcher and the engine (tests/s3helpers.py):

    python -m bench.s3figures --engine moto hot       # 20 MB + 10 KB every 100 ms for 60 s
    python -m bench.s3figures --engine moto bursty    # sessions appending in bursts
    python -m bench.s3figures --engine moto restart   # a restart over 10,000 objects in sync

As root (homes are chowned to uid 1000+). The service is a real `session-watcher run`
process; lag is measured by HEADs straight to the engine (not through the proxy) every
50 ms: the time from a write until the object holds it."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from s3helpers import Engine, Moto

HOST = "bench"


@contextmanager
def engine_for(name: str, tmp: Path) -> Iterator[Engine]:
    if name == "moto":
        moto = Moto()
        try:
            yield moto
        finally:
            moto.stop()
        return
    from ceph import start_rgw

    rgw = start_rgw(tmp / "ceph")
    engine = Engine("ceph", ("127.0.0.1", rgw.rgw_port), rgw.access_key, rgw.secret_key)
    try:
        yield engine
    finally:
        engine.stop()
        rgw.cleanup()


class Bench:
    def __init__(self, engine: Engine, base: Path, users: int = 1) -> None:
        self.engine = engine
        self.base = base
        self.bucket = engine.new_bucket()
        self.client = engine.client()
        self.home = base / "home"
        self.state = base / "state"
        self.users: list[tuple[str, Path, int]] = []
        for i in range(users):
            name = f"u{i:04d}"
            sessions = self.home / name / "user" / "sessions"
            sessions.mkdir(parents=True)
            for p in (self.home / name, self.home / name / "user", sessions):
                os.chown(p, 1000 + i, 1000 + i)
            self.users.append((name, sessions, 1000 + i))
        self.proc: subprocess.Popen[bytes] | None = None

    def key(self, user: str, name: str) -> str:
        return f"{HOST}/{user}/{name}"

    def size(self, user: str, name: str) -> int:
        try:
            return int(
                self.client.head_object(Bucket=self.bucket, Key=self.key(user, name))[
                    "ContentLength"
                ]
            )
        except Exception:  # not there yet
            return -1

    def argv(self, command: str, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "session_watcher",
            command,
            "--home-root",
            str(self.home),
            "--target",
            f"s3://{self.bucket}",
            "--host-id",
            HOST,
            "--state-dir",
            str(self.state),
            *extra,
        ]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_WATCHER_")}
        env.update(self.engine.env())
        env["SESSION_WATCHER_STATE_FILE"] = str(self.base / "state.json")
        return env

    def start(self, *extra: str) -> None:
        log = (self.base / "service.log").open("ab")
        self.proc = subprocess.Popen(
            self.argv("run", "--reconcile-interval", "0", *extra),
            stdout=log,
            stderr=log,
            env=self.env(),
        )
        deadline = time.monotonic() + 600
        while b"ready: watching" not in (self.base / "service.log").read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((self.base / "service.log").read_text()[-3000:])
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)

    def reconcile(self) -> dict[str, Any]:
        out = subprocess.run(
            self.argv("reconcile", "--json"),
            capture_output=True,
            env=self.env(),
            check=True,
            timeout=1800,
        )
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def counts(self) -> dict[str, int]:
        reqs = self.engine.proxy.requests()
        out: dict[str, int] = {}
        for r in reqs:
            kind = r.method
            if r.method == "GET" and "list-type=2" in r.path:
                kind = "LIST"
            elif r.method == "PUT" and "partNumber=" in r.path:
                kind = "PUT part"
            out[kind] = out.get(kind, 0) + 1
        return out


def append(path: Path, data: bytes, uid: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
        os.fchown(fd, uid, uid)
    finally:
        os.close(fd)


def chunk(i: int, size: int) -> bytes:
    head = b'{"type":"assistant","i":%d,"text":"' % i
    return head + b"x" * (size - len(head) - 3) + b'"}\n'


class LagWatch:
    """Polls an object's size; each (time written, end offset) gets its visible lag."""

    def __init__(self, bench: Bench, user: str, name: str) -> None:
        self.bench, self.user, self.name = bench, user, name
        self.writes: list[tuple[float, int]] = []
        self.lags: list[float] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def wrote(self, end: int) -> None:
        with self._lock:
            self.writes.append((time.time(), end))

    def _run(self) -> None:
        while not self._stop.is_set():
            size = self.bench.size(self.user, self.name)
            now = time.time()
            with self._lock:
                while self.writes and self.writes[0][1] <= size:
                    self.lags.append(now - self.writes.pop(0)[0])
            time.sleep(0.05)

    def finish(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self.writes:
                    break
            time.sleep(0.05)
        self._stop.set()
        self._thread.join()


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def hot(bench: Bench, seconds: float) -> dict[str, Any]:
    user, sessions, uid = bench.users[0]
    bench.start()
    bench.engine.proxy.reset()
    path = sessions / "hot.jsonl"
    watch = LagWatch(bench, user, "hot.jsonl")
    base = b"".join(chunk(i, 1000) for i in range(20_000))  # 20 MB of whole lines
    append(path, base, uid)
    watch.wrote(len(base))
    produced = len(base)
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds:
        data = chunk(10**6 + i, 10_000)
        append(path, data, uid)
        produced += len(data)
        watch.wrote(produced)
        i += 1
        time.sleep(max(0.0, t0 + (i * 0.1) - time.monotonic()))
    watch.finish()
    final_ok = bench.size(user, "hot.jsonl") == produced
    bench.stop()
    sent = bench.engine.proxy.bytes_up()
    return {
        "scenario": f"hot: 20 MB + 10 KB every 100 ms for {seconds:g} s",
        "bytes_produced": produced,
        "bytes_sent": sent,
        "sent_per_produced": round(sent / produced, 3),
        "lag_p50_s": round(pct(watch.lags, 50), 2),
        "lag_p99_s": round(pct(watch.lags, 99), 2),
        "lag_max_s": round(max(watch.lags), 2),
        "requests": bench.counts(),
        "final_object_complete": final_ok,
    }


def bursty(bench: Bench, seconds: float, seed: int) -> dict[str, Any]:
    rnd = random.Random(seed)  # noqa: S311 (a replayable workload, not a secret)
    bench.start()
    bench.engine.proxy.reset()
    results: list[float] = []
    produced = [0]
    lock = threading.Lock()

    def session(user: str, sessions: Path, uid: int) -> None:
        path = sessions / "bursty.jsonl"
        end = time.monotonic() + seconds
        i = 0
        size = 0
        while time.monotonic() < end:
            burst_end = time.monotonic() + rnd.uniform(5, 60)
            while time.monotonic() < min(burst_end, end):
                data = chunk(i, rnd.randint(200, 4000))
                append(path, data, uid)
                size += len(data)
                i += 1
                time.sleep(0.1)
            t_end = time.time()
            quiet = rnd.uniform(10, 90)
            deadline = time.monotonic() + quiet
            landed = None
            while time.monotonic() < deadline:
                if landed is None and bench.size(user, "bursty.jsonl") == size:
                    landed = time.time() - t_end
                time.sleep(0.05)
            with lock:
                results.append(landed if landed is not None else float("inf"))
        with lock:
            produced[0] += size

    threads = [threading.Thread(target=session, args=u) for u in bench.users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bench.stop()
    counts = bench.counts()
    total = sum(counts.values())
    hours = seconds / 3600 * len(bench.users)
    return {
        "scenario": f"bursty: {len(bench.users)} sessions, bursts 5-60 s every 100 ms, "
        f"quiet 10-90 s, {seconds:g} s",
        "bursts": len(results),
        "after_burst_lag_p50_s": round(pct(results, 50), 2),
        "after_burst_lag_p99_s": round(pct(results, 99), 2),
        "after_burst_lag_max_s": round(max(results), 2),
        "requests_per_session_hour": round(total / hours),
        "requests": counts,
        "bytes_produced": produced[0],
        "sent_per_produced": round(bench.engine.proxy.bytes_up() / max(1, produced[0]), 2),
    }


def restart(bench: Bench, files: int) -> dict[str, Any]:
    per_user = files // len(bench.users)
    for _user, sessions, uid in bench.users:
        for j in range(per_user):
            p = sessions / f"s{j:05d}.jsonl"
            p.write_bytes(chunk(j, 300))
            os.chown(p, uid, uid)
            os.utime(p, (time.time() - 3600,) * 2)
    t = time.monotonic()
    first = bench.reconcile()
    upload_s = time.monotonic() - t
    bench.engine.proxy.reset()
    t = time.monotonic()
    bench.start()
    ready_s = time.monotonic() - t
    bench.stop()
    restart_counts = bench.counts()
    bench.engine.proxy.reset()
    t = time.monotonic()
    again = bench.reconcile()
    pass_s = time.monotonic() - t
    return {
        "scenario": f"restart over {files} objects in sync ({len(bench.users)} users)",
        "first_pass_copied": first["files_copied"],
        "first_pass_s": round(upload_s, 1),
        "restart_ready_s": round(ready_s, 2),
        "restart_requests": restart_counts,
        "reconcile_in_sync_copied": again["files_copied"],
        "reconcile_in_sync_s": round(pass_s, 2),
        "reconcile_in_sync_requests": bench.counts(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.s3figures")
    ap.add_argument("scenario", choices=["hot", "bursty", "restart"])
    ap.add_argument("--engine", choices=["moto", "ceph"], default="moto")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--users", type=int, default=None)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="sw-s3bench-"))
    tmp.chmod(0o755)
    try:
        with engine_for(args.engine, tmp) as engine:
            if args.scenario == "hot":
                out = hot(Bench(engine, tmp), args.seconds or 60)
            elif args.scenario == "bursty":
                out = bursty(Bench(engine, tmp, args.users or 5), args.seconds or 1200, args.seed)
            else:
                out = restart(Bench(engine, tmp, args.users or 100), args.files)
        out["engine"] = args.engine
        print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
