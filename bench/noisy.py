"""Noisy neighbour (issue 14): `python -m bench.noisy [--seconds S] [--scale F] [--store
tmpfs|disk] [--only NAME ...]`, as root.

A real `session-watcher run --log-format json` on a fresh tree per run; a victim (uid 1000)
appends 200 bytes every 100 ms; an abuser (uid 1001) does one abuse of the issue's, either
in their sessions directory ("abuse") or the same I/O in ~/scratch, outside any sessions
directory ("control"). Per run: the victim's close -> copy latency (JSON `latency_ms`)
p50/p99/max and how many appends landed, the service's peak RSS, the bytes it wrote for the
abuser, and the WARNING/ERROR lines the run caused. Prints one Markdown table; writes nothing
but its temp tree (removed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VICTIM_UID, ABUSER_UID = 1000, 1001
MB = 1_000_000

VICTIM = r"""
import os, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
end = time.monotonic() + seconds
i = 0
while time.monotonic() < end:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, b'{"i":%08d,"t":"%s"}\n' % (i, b"x" * 180))
    os.close(fd)
    i += 1
    time.sleep(0.1)
print(i)
"""

# Abuses: Python run as the abuser with argv = [dir, seconds, scale]; `dir` is the sessions
# directory (abuse) or ~/scratch (control).
HARDLINK = r"""
import os, sys, time
d, seconds, scale = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
src = os.path.join(d, "big.jsonl")
with open(src, "wb") as f:  # dense: a sparse file is refused on its own
    for _ in range(int(200 * scale) or 1):
        f.write(b"x" * 1_000_000)
for i in range(30):
    os.link(src, os.path.join(d, "link%02d.jsonl" % i))
time.sleep(seconds)
"""

CHURN = r"""
import os, sys, time
d, seconds, scale = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
n = int(50_000 * scale)
end = time.monotonic() + seconds
r = 0
while time.monotonic() < end:
    for i in range(n):
        fd = os.open(os.path.join(d, "c%d_%d.jsonl" % (r, i)), os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"{}\n")
        os.close(fd)
    for i in range(n):
        os.unlink(os.path.join(d, "c%d_%d.jsonl" % (r, i)))
    r += 1
"""

TOUCH = r"""
import os, sys, time
d, seconds, scale = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
paths = [os.path.join(d, "t%d.jsonl" % i) for i in range(2)]
for p in paths:
    with open(p, "wb") as f:  # dense: a sparse file is refused on its own
        for _ in range(int(1000 * scale) or 1):
            f.write(b"x" * 1_000_000)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for p in paths:
        os.utime(p)
    time.sleep(0.05)
"""

BURST = r"""
import os, sys, time
d, seconds, scale = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
n = int(200_000 * scale)
stage = os.path.join(os.path.dirname(d), "stage-" + os.path.basename(d))
os.mkdir(stage, 0o700)
for i in range(n):
    fd = os.open(os.path.join(stage, "b%06d.jsonl" % i), os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"{}\n")
    os.close(fd)
open(stage + ".staged", "w").close()  # the bench starts the victim, then says go
while not os.path.exists(stage + ".go"):
    time.sleep(0.01)
t0 = time.monotonic()
for i in range(n):
    os.rename(os.path.join(stage, "b%06d.jsonl" % i), os.path.join(d, "b%06d.jsonl" % i))
print("renamed %d in %.1f s" % (n, time.monotonic() - t0), file=sys.stderr)
time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
"""

REWRITE = r"""
import os, sys, time
d, seconds, scale = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
size = int(200e6 * scale)
block = b"x" * (1 << 20)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for i in range(4):
        with open(os.path.join(d, "r%d.jsonl" % i), "wb") as f:
            left = size
            while left > 0:
                left -= f.write(block[: min(left, len(block))])
"""

CLOSE_FLOOD_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char p[4096];
    double seconds = atof(argv[2]);
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (unsigned long n = 0;; n++) {
        snprintf(p, sizeof p, "%s/f%lu.jsonl", argv[1], n % 16);
        int fd = open(p, O_WRONLY | O_CREAT, 0600);
        if (fd >= 0) close(fd);
        if ((n & 1023) == 0) {
            clock_gettime(CLOCK_MONOTONIC, &t);
            if (t.tv_sec - t0.tv_sec + (t.tv_nsec - t0.tv_nsec) / 1e9 > seconds) break;
        }
    }
    return 0;
}
"""

ABUSES: dict[str, str] = {
    "none": "",
    "hardlink": HARDLINK,
    "churn": CHURN,
    "touch": TOUCH,
    "burst": BURST,
    "closes": "C",
    "rewrite": REWRITE,
}


@dataclass
class Result:
    abuse: str
    mode: str  # abuse | control
    p50: float
    p99: float
    worst: float
    landed: str
    rss_mb: float
    abuser_mb: float
    lines: int
    overflows: int

    def row(self) -> str:
        return (
            f"| {self.abuse} | {self.mode} | {self.p50:.1f} | {self.p99:.1f} | {self.worst:.1f} "
            f"| {self.landed} | {self.rss_mb:.0f} | {self.abuser_mb:.0f} | {self.lines} "
            f"| {self.overflows} |"
        )


HEADER = (
    "| abuse | run | victim p50 ms | p99 ms | max ms | appends landed | peak RSS MB "
    "| MB written for abuser | WARNING/ERROR lines | overflows |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def log(msg: str) -> None:
    print(f"[noisy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def as_uid(uid: int, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    prefix = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    return subprocess.Popen([*prefix, *argv], stdin=subprocess.DEVNULL, **kw)


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


def run_one(
    abuse: str,
    mode: str,
    seconds: float,
    scale: float,
    store: str,
    work: Path,
    closer: Path,
    group: str,
    keep: Path | None = None,
) -> Result:
    base = Path(tempfile.mkdtemp(prefix=f"noisy-{abuse}-{mode}-", dir=work))
    base.chmod(0o755)
    home_root = base / "home"
    home_root.mkdir(mode=0o755)
    target = base / "store"
    target.mkdir()
    mounted = False
    try:
        if store == "tmpfs":
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=6g,mode=0755", "tmpfs", str(target)],
                check=True,
            )
            mounted = True
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
                env={k: v for k, v in os.environ.items() if not k.startswith("SESSION_WATCHER_")},
            )
            try:
                return _measure(
                    abuse, mode, seconds, scale, svc, log_path, victim, abuser, target, closer
                )
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
            shutil.copy(base / "service.log", keep / f"{abuse}-{mode}.log")
        if mounted:
            subprocess.run(["umount", "-l", str(target)], check=False)
        shutil.rmtree(base, ignore_errors=True)


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
    closer: Path,
) -> Result:
    if not _wait(lambda: any(d["msg"].startswith("ready") for d in _docs(log_path)), 60):
        raise RuntimeError(f"service not ready: {log_path.read_text()[-2000:]}")
    where = abuser / ("user/sessions" if mode == "abuse" else "scratch")
    code = ABUSES[abuse]
    bad: subprocess.Popen[bytes] | None = None
    if code == "C":
        bad = as_uid(ABUSER_UID, [str(closer), str(where), str(seconds)])
    elif code:
        bad = as_uid(
            ABUSER_UID,
            [sys.executable, "-c", code, str(where), str(seconds), str(scale)],
            stderr=subprocess.PIPE,
        )
    stage = where.parent / f"stage-{where.name}"
    if abuse == "burst":  # its files are made first (minutes at 200,000), then renamed in
        if not _wait(lambda: Path(f"{stage}.staged").exists(), 600):
            raise RuntimeError("burst: staging did not finish")
    else:
        time.sleep(0.5)  # the abuse is under way
    vpath = victim / "user" / "sessions" / "victim.jsonl"
    vic = as_uid(
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
    appends = int((vic.communicate()[0] or b"0").strip() or 0)
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
    lat = [float(d["latency_ms"]) for d in docs if d.get("user") == "victim" and "latency_ms" in d]
    written = sum(int(d["bytes"]) for d in docs if d.get("user") == "abuser" and "bytes" in d)
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
        abuse,
        mode,
        pct(lat, 0.5),
        pct(lat, 0.99),
        max(lat) if lat else float("nan"),
        f"{appends} ({'all' if got == want else f'{got}/{want} B'})",
        peak,
        written / MB,
        len(lines),
        overflows,
    )


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.noisy", description=__doc__)
    ap.add_argument("--seconds", type=float, default=30.0, help="per run (default 30)")
    ap.add_argument("--scale", type=float, default=1.0, help="sizes and counts x this")
    ap.add_argument("--store", choices=["tmpfs", "disk"], default="tmpfs")
    ap.add_argument("--work", default="/var/tmp", help="where the temp trees go")
    ap.add_argument("--only", nargs="*", choices=sorted(ABUSES), help="abuses to run")
    ap.add_argument("--group", default="users", help="the store's group (must exist)")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy each run's service log here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("python -m bench.noisy: run as root (other uids, tmpfs)", file=sys.stderr)
        return 2
    work = Path(args.work)
    closer_dir = Path(tempfile.mkdtemp(prefix="noisy-bin-", dir=work))
    closer_dir.chmod(0o755)
    try:
        closer = closer_dir / "closer"
        src = closer_dir / "closer.c"
        src.write_text(CLOSE_FLOOD_C)
        subprocess.run(["cc", "-O2", "-o", str(closer), str(src)], check=True)
        closer.chmod(0o755)
        print(HEADER, flush=True)
        for abuse in args.only or list(ABUSES):
            for mode in ("abuse", "control") if abuse != "none" else ("abuse",):
                log(f"{abuse} / {mode}")
                r = run_one(
                    abuse,
                    mode,
                    args.seconds,
                    args.scale,
                    args.store,
                    work,
                    closer,
                    args.group,
                    Path(args.keep_logs) if args.keep_logs else None,
                )
                print(r.row(), flush=True)
    finally:
        shutil.rmtree(closer_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
