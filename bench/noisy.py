"""Noisy neighbour (issue 14): part of `make bench` (`python -m bench --only noisy`), or
alone: `python -m bench.noisy [--seconds S] [--scale F] [--store tmpfs|disk ...] [--only
NAME ...]`, as root.

A real `session-watcher run --log-format json` on a fresh tree per run; a victim (uid 1000)
appends 200 bytes every 100 ms; an abuser (uid 1001) runs one abuse of bench/abuse.py,
either in their sessions directory ("abuse") or the same I/O in ~/scratch, outside any
sessions directory ("control"). Per run: the victim's close -> copy latency (JSON
`latency_ms`) p50/p99/max and how many appends landed, the service's peak RSS, the bytes it
wrote for the abuser, the lines the abuser caused in the log, and inotify overflows. Each
abuse row gets the issue's targets against its own control row. Writes nothing but its
temp trees (removed at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import abuse as abuse_mod

VICTIM_UID, ABUSER_UID = 1000, 1001
MB = 1_000_000

# Prints each close's wall time and the file's size after it: the bench matches them to the
# copies in the service's log (close -> copy, the measure; the service's own
# `latency_ms` starts only when its reader handles the event).
VICTIM = r"""
import json, os, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
end = time.monotonic() + seconds
i, closes = 0, []
while time.monotonic() < end:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, b'{"i":%08d,"t":"%s"}\n' % (i, b"x" * 180))
    size = os.fstat(fd).st_size
    os.close(fd)
    closes.append((time.time(), size))
    i += 1
    time.sleep(0.1)
print(json.dumps({"appends": i, "closes": closes}))
"""

# "none": no abuser; "diskwriter": no abuser, but root writes 64 MB + fsync in a loop
# outside the home root (the disk-store baseline under load); the rest: bench/abuse.py.
ABUSES = ["none", "diskwriter", *abuse_mod.PROGRAMS]

DISKWRITER = r"""
import os, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
block = b"y" * (1 << 20)
end = time.monotonic() + seconds
while time.monotonic() < end:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for _ in range(64):
        os.write(fd, block)
    os.fsync(fd)
    os.close(fd)
"""


# Beside a baseline row (run: direct): no service; the victim's own loop copies each append
# durably right after its close (read, temp file, write, fsync, rename, fsync the
# directory) into a directory on the same kind of store, on the victim's 100 ms ticks. What
# one durable copy costs on that disk at that moment: a reference, not a bound (the disk
# writer's phase differs from run to run).
DIRECT = r"""
import json, os, sys, time
src, store, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
dfd = os.open(store, os.O_RDONLY | os.O_DIRECTORY)
start = time.monotonic()
end = start + seconds
lat, i = [], 0
while time.monotonic() < end:
    fd = os.open(src, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, b'{"i":%08d,"t":"%s"}\n' % (i, b"x" * 180))
    os.close(fd)
    t0 = time.monotonic()
    i += 1
    fd = os.open(src, os.O_RDONLY)
    data = os.read(fd, 1 << 24)
    os.close(fd)
    out = os.open(".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640, dir_fd=dfd)
    os.write(out, data)
    os.fsync(out)
    os.close(out)
    os.rename(".tmp", "victim.jsonl", src_dir_fd=dfd, dst_dir_fd=dfd)
    os.fsync(dfd)
    lat.append((time.monotonic() - t0) * 1000)
    time.sleep(max(0.0, start + 0.1 * i - time.monotonic()))
print(json.dumps({"appends": i, "latency_ms": lat}))
"""


# What the noisy-neighbour section of bench/results.md says about how it measures.
ABOUT = [
    "A real `session-watcher run` per row, on a fresh tree with two users: a victim appending "
    "200 bytes every 100 ms (open, write, close), and an abuser running one abuse of "
    "`bench/abuse.py` for the row's seconds, in their sessions directory (run: abuse) or the "
    "same I/O in a directory outside it (run: control; the service never sees it, so any "
    "cost left is the machine's). Latency is close → copy: from each close of the victim "
    "(its own wall clock) to the first copy in the service's JSON log holding that append "
    "(the line's millisecond time stamp, plus 1 ms for its truncation, so the figure is "
    "never low by it); the service's own `latency_ms` (from when its reader handles the "
    "event to the copy durable in the store) is beside it, p99. The MB written for the abuser, "
    "the log lines (the abuser's at INFO and above, and any WARNING or ERROR naming no user) "
    "and overflows come from the service's JSON log; RSS is sampled every 0.25 s. Abuses at "
    "scale 1 are the issue's: hardlink (200 MB + 30 links), fill (30 x 100 MB files: the "
    "10 GiB quota is not reached; tests/test_limits.py covers it), churn (50,000 names "
    "created and deleted in a loop), touch (two 1 GB files, 20 touches/s), burst (200,000 "
    "tiny files renamed in), closes (C: open+close of 16 files in a loop), rewrite (4 x "
    "200 MB rewritten in a loop), shrink (truncate + rewrite in a loop), swap (`~/user` "
    "replaced by a symlink and back while files are closed under it); diskwriter is no "
    "abuser but root writing 64 MB + fsync in a loop outside the home root. Each baseline "
    "(none, diskwriter) has a peer beside it (run: direct): no service; the victim's own "
    "loop copies each append durably right after its close (read, temp file, fsync, rename, "
    "fsync the directory) on the same kind of store, on the same 100 ms ticks: what one "
    "durable copy costs on that disk then, a reference rather than a bound (the disk "
    "writer's phase differs from run to run).",
]

# The issue's targets. Budget: --user-write-mb-s' default with its 16 s burst.
LINES_MAX = 10  # log lines one abuse may cause in 60 s
BUDGET_MB_S, BUDGET_BURST_S = 32.0, 16.0


@dataclass
class Result:
    store: str
    abuse: str
    mode: str  # abuse | control | direct
    seconds: float
    p50: float
    p99: float
    worst: float
    landed: str
    rss_mb: float
    abuser_mb: float
    lines: int
    overflows: int
    event_p99: float = float("nan")  # the service's own latency_ms (event -> copy), p99
    target: str = ""
    verdict: str = ""

    def row(self) -> str:
        service = (  # a direct row ran no service: it has no RSS, writes or log of its own
            "n/a | n/a | n/a | n/a | n/a"
            if self.mode == "direct"
            else f"{self.event_p99:.1f} | {self.rss_mb:.0f} | {self.abuser_mb:.0f} "
            f"| {self.lines} | {self.overflows}"
        )
        return (
            f"| {self.store} | {self.abuse} | {self.mode} | {self.p50:.1f} / {self.p99:.1f} / "
            f"{self.worst:.1f} | {self.landed} | {service} | {self.target} | {self.verdict} |"
        )


HEADER = (
    "| store | abuse | run | victim close → copy ms, p50 / p99 / max | appends landed "
    "| service's latency_ms p99 | peak RSS MB | MB written for the abuser "
    "| log lines the abuser caused | overflows | target | verdict |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def judge(results: list[Result]) -> None:
    """Fill in each row's target and verdict: the baselines against fixed figures, each
    abuse row against its own control row (same store, same I/O outside the sessions
    directory)."""
    controls = {(r.store, r.abuse): r for r in results if r.mode == "control"}
    for r in results:
        if r.mode in ("control", "direct"):
            continue
        checks: list[tuple[str, bool]] = []
        if r.abuse in ("none", "diskwriter"):
            limit = 10.0 if r.abuse == "none" else 50.0
            checks.append((f"p99 ≤ {limit:.0f} ms", r.p99 <= limit))
        else:
            ctl = controls.get((r.store, r.abuse))
            if ctl is not None:
                limit = 2 * ctl.p99 + 50
                checks.append((f"p99 ≤ 2x control + 50 = {limit:.0f} ms", r.p99 <= limit))
            if r.store == "tmpfs":
                checks.append(("p99 ≤ 100 ms", r.p99 <= 100))
            budget = BUDGET_MB_S * (r.seconds + BUDGET_BURST_S)
            checks.append((f"written ≤ {budget:.0f} MB", r.abuser_mb <= budget))
            # The issue names it for the burst; every abuse is held to it, since a close
            # flood grew the service to 522 MB in 30 s on watchdog 7.1.1's own reader.
            checks.append(("RSS ≤ 150 MB", r.rss_mb <= 150))
        checks.append((f"lines ≤ {LINES_MAX}", r.lines <= LINES_MAX))
        checks.append(("all landed", r.landed.endswith("(all)")))
        r.target = "; ".join(what for what, _ in checks)
        missed = [what for what, ok in checks if not ok]
        r.verdict = "met" if not missed else "missed: " + "; ".join(missed)


def table(results: list[Result]) -> str:
    return "\n".join([HEADER, *(r.row() for r in results)])


def log(msg: str) -> None:
    print(f"[noisy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_mb(pid: int) -> float:
    try:
        for raw in Path(f"/proc/{pid}/status").read_text().splitlines():
            if raw.startswith("VmRSS:"):
                return int(raw.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))]


def mkuser(home_root: Path, name: str, uid: int) -> Path:
    home = home_root / name
    for d in (home, home / "user", home / "user" / "sessions", home / "scratch"):
        d.mkdir(mode=0o750 if d == home else 0o700)
        os.chown(d, uid, uid)
    return home


@contextlib.contextmanager
def store_on(target: Path, store: str) -> Iterator[None]:
    """The store directory `target`: a tmpfs mounted on it for the tmpfs store, unmounted
    after; the disk store is the directory itself, on the trees' file system."""
    if store != "tmpfs":
        yield
        return
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6g,mode=0755", "tmpfs", str(target)], check=True
    )
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def start_diskwriter(out: Path, seconds: float, **popen: Any) -> subprocess.Popen[bytes]:
    """Root writing 64 MB + fsync to `out` in a loop for `seconds` (+2): a busy disk."""
    argv = [sys.executable, "-c", DISKWRITER, str(out), str(seconds + 2)]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, **popen)


def run_one(
    abuse: str,
    mode: str,
    seconds: float,
    scale: float,
    store: str,
    work: Path,
    closer: Path | None,
    group: str,
    keep: Path | None = None,
) -> Result:
    base = Path(tempfile.mkdtemp(prefix=f"noisy-{abuse}-{mode}-", dir=work))
    base.chmod(0o755)
    home_root = base / "home"
    home_root.mkdir(mode=0o755)
    target = base / "store"
    target.mkdir()
    try:
        with store_on(target, store):
            victim = mkuser(home_root, "victim", VICTIM_UID)
            abuser = mkuser(home_root, "abuser", ABUSER_UID)
            log_path = base / "service.log"
            with log_path.open("wb") as log_file:
                svc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "session_watcher",
                        "run",
                        "--home-root",
                        str(home_root),
                        "--target",
                        str(target),
                        "--settle",
                        "0",
                        "--reconcile-interval",
                        "0",
                        "--group",
                        group,
                        "--log-format",
                        "json",
                        "--state-file",
                        str(base / "state.json"),
                        # Every copy's latency (at INFO a user's copies are one line a minute).
                        "--log-level",
                        "DEBUG",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    env={
                        k: v for k, v in os.environ.items() if not k.startswith("SESSION_WATCHER_")
                    },
                )
                try:
                    r = _measure(
                        abuse, mode, seconds, scale, svc, log_path, victim, abuser, target, closer
                    )
                    r.store = store
                    return r
                finally:
                    if svc.poll() is None:
                        svc.send_signal(signal.SIGTERM)
                        try:
                            svc.wait(30)
                        except subprocess.TimeoutExpired:
                            svc.kill()
                            svc.wait()
    finally:
        if keep is not None and (base / "service.log").exists():
            shutil.copy(base / "service.log", keep / f"{store}-{abuse}-{mode}.log")
        shutil.rmtree(base, ignore_errors=True)


def run_direct(abuse: str, seconds: float, store: str, work: Path) -> Result:
    """A baseline's peer: DIRECT on the same kind of store, under the same disk writer."""
    base = Path(tempfile.mkdtemp(prefix=f"noisy-{abuse}-direct-", dir=work))
    target = base / "store"
    target.mkdir()
    writer = None
    try:
        with store_on(target, store):
            if abuse == "diskwriter":
                writer = start_diskwriter(base / "diskwriter.out", seconds)
                time.sleep(0.5)  # the writer is under way, as in run_one
            src = base / "victim.jsonl"
            done = subprocess.run(
                [sys.executable, "-c", DIRECT, str(src), str(target), str(seconds)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=True,
            )
            out = json.loads(done.stdout)
            lat = [float(v) for v in out["latency_ms"]]
            landed = (target / "victim.jsonl").stat().st_size == src.stat().st_size
            return Result(
                store,
                abuse,
                "direct",
                seconds,
                pct(lat, 0.5),
                pct(lat, 0.99),
                max(lat) if lat else float("nan"),
                f"{out['appends']} ({'all' if landed else 'not all'})",
                0.0,
                0.0,
                0,
                0,
            )
    finally:
        if writer is not None:
            writer.wait()
        shutil.rmtree(base, ignore_errors=True)


def close_to_copy(closes: list[tuple[float, int]], copies: list[dict[str, Any]]) -> list[float]:
    """Milliseconds from each close (wall time, the file's size after it) to the first copy
    logged with at least that many bytes. A log line's time stamp is truncated to the
    millisecond: 1 ms is added, so that no figure is low by the truncation. A copy holding
    the bytes may be logged before the victim took its close time (descheduled between
    close and clock): that append counts 0 ms, not the wait for the next copy. Appends no
    copy holds (the service stopped first) are left out; `landed` counts those."""
    done = sorted((_when(d["ts"]) + 0.001, int(d["bytes"])) for d in copies)
    out, j = [], 0
    for closed, size in sorted(closes):
        while j < len(done) and done[j][1] < size:
            j += 1
        if j == len(done):
            break
        out.append(max(0.0, done[j][0] - closed) * 1000)
    return out


def _when(ts: str) -> float:
    """The JSON log's `ts` ("2026-12-05T20:08:04.650Z", UTC) as a Unix time."""
    when = datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ")
    return when.replace(tzinfo=datetime.UTC).timestamp()


def _docs(log_path: Path) -> list[dict[str, Any]]:
    out = []
    for raw in log_path.read_bytes().decode("utf-8", "replace").splitlines():
        if raw.startswith("{"):
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
    return out


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return False


def _measure(
    abuse: str,
    mode: str,
    seconds: float,
    scale: float,
    svc: subprocess.Popen[bytes],
    log_path: Path,
    victim: Path,
    abuser: Path,
    target: Path,
    closer: Path | None,
) -> Result:
    if not _wait(lambda: any(d["msg"].startswith("ready") for d in _docs(log_path)), 60):
        raise RuntimeError(f"service not ready: {log_path.read_text()[-2000:]}")
    where = abuser / ("user/sessions" if mode == "abuse" else "scratch")
    bad: subprocess.Popen[bytes] | None = None
    if abuse == "diskwriter":  # root, outside the home root: the disk is busy, nobody abuses
        out = abuser.parent.parent / "diskwriter.out"
        bad = start_diskwriter(out, seconds, stderr=subprocess.PIPE)
    elif abuse != "none":
        extra = ["wait"] if abuse == "burst" else []
        bad = abuse_mod.start(
            abuse, ABUSER_UID, where, seconds, scale, closer, *extra, stderr=subprocess.PIPE
        )
    stage = where.parent / f"stage-{where.name}"
    if abuse == "burst":  # its files are made first (minutes at 200,000), then renamed in
        if not _wait(lambda: Path(f"{stage}.staged").exists(), 600):
            raise RuntimeError("burst: staging did not finish")
    else:
        time.sleep(0.5)  # the abuse is under way
    vpath = victim / "user" / "sessions" / "victim.jsonl"
    vic = abuse_mod.as_uid(
        VICTIM_UID,
        [sys.executable, "-c", VICTIM, str(vpath), str(seconds)],
        stdout=subprocess.PIPE,
    )
    if abuse == "burst":
        time.sleep(1.0)
        Path(f"{stage}.go").touch()
    peak = rss_mb(svc.pid)
    while vic.poll() is None:
        peak = max(peak, rss_mb(svc.pid))
        time.sleep(0.25)
    said = json.loads(vic.communicate()[0] or b'{"appends": 0, "closes": []}')
    appends = int(said["appends"])
    if bad is not None:
        try:
            _, err = bad.communicate(timeout=max(5.0, seconds))
            if err:
                log(err.decode(errors="replace").strip()[-300:])
        except subprocess.TimeoutExpired:
            bad.kill()
            bad.wait()
    stored = target / "victim" / "victim.jsonl"
    want = vpath.stat().st_size
    _wait(lambda: stored.exists() and stored.stat().st_size == want, 60)
    got = stored.stat().st_size if stored.exists() else 0
    peak = max(peak, rss_mb(svc.pid))
    docs = _docs(log_path)
    copies = [d for d in docs if d.get("user") == "victim" and "latency_ms" in d and "bytes" in d]
    lat = close_to_copy([(float(t), int(n)) for t, n in said["closes"]], copies)
    own = [float(d["latency_ms"]) for d in copies]
    written = sum(
        int(d["bytes"])
        for d in docs
        if d.get("user") == "abuser" and d["msg"].startswith("copied") and "bytes" in d
    )
    # Lines the journal gets because of the abuser: theirs at INFO and above (copies
    # included), and the service's own WARNINGs and ERRORs (an overflow names no user).
    lines = [
        d
        for d in docs
        if (d.get("user") == "abuser" and d["level"] != "DEBUG")
        or (not d.get("user") and d["level"] in ("WARNING", "ERROR"))
    ]
    overflows = sum(1 for d in docs if "overflow" in d["msg"])
    return Result(
        "",
        abuse,
        mode,
        seconds,
        pct(lat, 0.5),
        pct(lat, 0.99),
        max(lat) if lat else float("nan"),
        f"{appends} ({'all' if got == want else f'{got}/{want} B'})",
        peak,
        written / MB,
        len(lines),
        overflows,
        pct(own, 0.99),
    )


def scenario(
    stores: list[str],
    abuses: list[str],
    seconds: float,
    scale: float,
    work: Path,
    say: Callable[[str], None] = log,
    group: str = "users",
    keep: Path | None = None,
) -> list[Result]:
    """Every abuse on every store, each followed by its control; judged."""
    results: list[Result] = []
    bindir = Path(tempfile.mkdtemp(prefix="noisy-bin-", dir=work))
    bindir.chmod(0o755)
    try:
        closer = abuse_mod.build_closer(bindir)
        if closer is None:
            say("noisy: no C compiler: the close flood runs in Python (fewer closes)")
        for store in stores:
            for abuse in abuses:
                if abuse == "diskwriter" and store != "disk":
                    continue  # a background disk writer is the disk store's baseline
                baseline = abuse in ("none", "diskwriter")
                for mode in ("abuse", "direct") if baseline else ("abuse", "control"):
                    say(f"noisy: {store} store, {abuse} / {mode}")
                    if mode == "direct":
                        results.append(run_direct(abuse, seconds, store, work))
                        continue
                    results.append(
                        run_one(abuse, mode, seconds, scale, store, work, closer, group, keep)
                    )
    finally:
        shutil.rmtree(bindir, ignore_errors=True)
    judge(results)
    return results


def bench(quick: bool, work: Path, say: Callable[[str], None]) -> list[Result]:
    """`python -m bench --only noisy`: the whole table on a tmpfs and a disk store (about
    30 min on 2 cores); --quick: a few abuses, small and short, on tmpfs (a smoke test)."""
    if quick:
        return scenario(["tmpfs"], ["none", "closes", "burst", "swap"], 4.0, 0.02, work, say)
    return scenario(["tmpfs", "disk"], ABUSES, 30.0, 1.0, work, say)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.noisy", description=__doc__)
    ap.add_argument("--seconds", type=float, default=30.0, help="per run (default 30)")
    ap.add_argument("--scale", type=float, default=1.0, help="sizes and counts x this")
    ap.add_argument("--store", nargs="+", choices=["tmpfs", "disk"], default=["tmpfs", "disk"])
    ap.add_argument("--work", default="/var/tmp", help="where the temp trees go")
    ap.add_argument("--only", nargs="+", choices=ABUSES, help="abuses to run")
    ap.add_argument("--group", default="users", help="the store's group (must exist)")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy each run's service log here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("python -m bench.noisy: run as root (other uids, tmpfs)", file=sys.stderr)
        return 2
    results = scenario(
        args.store,
        args.only or ABUSES,
        args.seconds,
        args.scale,
        Path(args.work),
        log,
        args.group,
        Path(args.keep_logs) if args.keep_logs else None,
    )
    print(table(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
