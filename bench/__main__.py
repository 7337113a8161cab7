"""`python -m bench [--quick] [--out FILE] [--only NAME ...] [--tools KEY ...]`: run the
scenarios, print one Markdown table, and (full run) write it to bench/results.md with the
machine it ran on. `--only` and `--tools` rerun a subset, e.g. session-watcher's own rows
of two scenarios: `python -m bench --only burst hot --tools sw`, or of the object-store
rows: `python -m bench --only s3-hot s3-burst s3-restart s3-outage --tools sw`."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import objstore, scenarios
from .measure import Row
from .peers import PROJECT, LivePeer, live_peers

TOOLS = {
    "rsync": "rsync",
    "lsyncd": "lsyncd",
    "inotifywait": "inotify-tools",
    "rclone": "rclone",  # the object-store peers (bench/objstore.py)
    "aws": "awscli",
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_tools() -> None:
    """apt-get install the peers when root and missing; otherwise say which will be skipped."""
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        log(f"not root or no apt-get: cannot install {', '.join(missing)}; their rows are skipped")
        return
    cmd = ["apt-get", "install", "-y", "-q", *missing]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log(f"installing {' '.join(missing)}")
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        log("install failed; running apt-get update and trying once more")
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            log(f"could not install {' '.join(missing)}; their rows are skipped")


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for ln in f:
            if ln.startswith("model name"):
                return ln.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _fs_type(path: Path) -> str:
    best, kind = "", "unknown"
    with open("/proc/mounts") as f:
        for ln in f:
            _dev, mnt, fstype, *_ = ln.split()
            if str(path).startswith(mnt) and len(mnt) > len(best):
                best, kind = mnt, fstype
    return f"{kind} ({best})"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def header(work: Path, load_before: str, elapsed: float, quick: bool) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            "# session-watcher benchmark"
            + (" (quick smoke test: figures mean nothing)" if quick else ""),
            "",
            f"- machine: {_cpu_model()}, {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
            f"- kernel: {platform.release()}; Python {platform.python_version()}",
            f"- file system of the trees and stores: {_fs_type(work)}",
            f"- date: {now}; load average (1/5/15 min) before {load_before}, after {_load()}; "
            f"the whole run took {elapsed / 60:.1f} min",
            "- produced by `make bench` (`python -m bench`); times are CLOCK_MONOTONIC, a close "
            "is timestamped in the writer, an arrival by an inotify IN_MOVED_TO/IN_CLOSE_WRITE "
            "watch on the store (a copier's close of the file it has just renamed in is the "
            "same arrival); every tool gets its own fresh store.",
        ]
    )


def table(rows: list[Row]) -> str:
    out = [
        "| scenario | tool | what is measured | result | session-watcher target | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r.scenario, r.tool, r.measure, r.result, r.target, r.verdict]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)


SCENARIOS = ("latency", "burst", "hot", "noop", "cold", "scale", "claude", *objstore.S3_SCENARIOS)
LIVE_KEYS = ("sw", "lsyncd", "lsyncd-direct", "inotifywait")  # LivePeer.key


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test (< 2 min)")
    ap.add_argument("--out", type=Path, help="also write the report here")
    ap.add_argument("--only", nargs="+", choices=SCENARIOS, help="run only these scenarios")
    ap.add_argument(
        "--tools",
        nargs="+",
        choices=sorted({*LIVE_KEYS, *objstore.TOOL_KEYS}),
        help="live scenarios (latency, burst, hot) and object-store rows: only these tools",
    )
    args = ap.parse_args(argv)
    sizes = scenarios.QUICK if args.quick else scenarios.FULL
    ensure_tools()
    base = os.environ.get("BENCH_DIR") or "/var/tmp"
    Path(base).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sw-bench-", dir=base))
    load_before = _load()
    t0 = time.monotonic()
    rows: list[Row] = []
    wanted = args.only or SCENARIOS

    def peers() -> list[LivePeer]:
        return [p for p in live_peers(args.quick) if not args.tools or p.key in args.tools]

    try:
        for name in wanted:
            if name in objstore.S3_SCENARIOS:
                continue
            log(f"scenario {name}")
            if name == "latency":
                rows += scenarios.latency(sizes, peers(), work, log)
            elif name == "burst":
                rows += scenarios.burst(sizes, peers(), work, log)
            elif name == "hot":
                rows += scenarios.hot(sizes, peers(), work, log)
            elif name == "noop":
                rows += scenarios.noop(sizes, work, log)
            elif name == "cold":
                rows += scenarios.cold(sizes, work, log)
            elif name == "scale":
                rows += scenarios.scale(sizes, work, log)
            elif name == "claude":
                rows += scenarios.claude(sizes, work, log)
        # The object-store rows share one Ceph cluster, started once for them.
        rows += objstore.run_all(list(wanted), args.quick, work, log, args.tools)
        report = header(work, load_before, time.monotonic() - t0, args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # trees and stores never outlive the run
    text = f"{report}\n\n{table(rows)}\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
        shown = args.out.resolve()
        log(f"wrote {shown.relative_to(PROJECT) if shown.is_relative_to(PROJECT) else shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
