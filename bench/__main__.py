"""`python -m bench [--quick] [--out FILE] [--only NAME ...] [--tools KEY ...]`: run the
scenarios and print the report; with --out, write it there (`make bench`: bench/results.md).
The report has one section per group of scenarios (bench/report.py): a run rewrites the
sections, or with --only / --tools the rows, it measured and keeps the others with their
own `- run:` lines. E.g. session-watcher's own rows of two scenarios: `python -m bench
--only burst hot --tools sw --out bench/results.md`; the noisy-neighbour table:
`python -m bench --only noisy --out bench/results.md`."""

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

from . import noisy, objstore, report, scenarios
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


def _commit() -> str:
    def git(*args: str) -> str:
        cmd = ["git", "-C", str(PROJECT), *args]
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    # The report itself is written by every run: only a change to anything else is "dirty".
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results.md")
    return sha + ("-dirty" if dirty else "")


def run_line(work: Path, load_before: str, elapsed: float, command: str) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"- run: {now}, commit {_commit()}, {_cpu_model()}, {os.cpu_count()} cores, "
        f"{ram:.0f} GiB RAM, kernel {platform.release()}, Python {platform.python_version()}, "
        f"trees and stores on {_fs_type(work)}, load average (1/5/15 min) {load_before} before, "
        f"{_load()} after, {elapsed / 60:.1f} min: `{command}`"
    )


ABOUT = [
    "Times are CLOCK_MONOTONIC; a close is timestamped in the writer, an arrival by an "
    "inotify IN_MOVED_TO/IN_CLOSE_WRITE watch on the store (a copier's close of the file it "
    "has just renamed in is the same arrival); every tool gets its own fresh store."
]
# The report's sections (bench/report.py): key, heading, scenarios, what they measure.
SECTIONS: list[tuple[str, str, tuple[str, ...], list[str]]] = [
    (
        "peers",
        "## Against the peers (issue 4; scale: issue 13)",
        ("latency", "burst", "hot", "noop", "cold", "scale"),
        ABOUT,
    ),
    ("claude", "## Claude Code layout (issue 13)", ("claude",), ABOUT),
    ("s3", "## Object store (issue 12)", objstore.S3_SCENARIOS, objstore.ABOUT),
    ("noisy", "## Noisy neighbour (issue 14)", ("noisy",), noisy.ABOUT),
]


def table(rows: list[Row]) -> str:
    out = [
        "| scenario | tool | what is measured | result | session-watcher target | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r.scenario, r.tool, r.measure, r.result, r.target, r.verdict]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)


SCENARIOS = tuple(name for _key, _heading, names, _about in SECTIONS for name in names)
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
    work.chmod(0o755)  # the noisy-neighbour users (uid 1000, 1001) write below it
    load_before = _load()
    t0 = time.monotonic()
    rows: dict[str, list[Row]] = {key: [] for key, *_ in SECTIONS}
    section = {name: key for key, _h, names, _a in SECTIONS for name in names}
    wanted = args.only or SCENARIOS

    def peers() -> list[LivePeer]:
        return [p for p in live_peers(args.quick) if not args.tools or p.key in args.tools]

    noisy_results: list[noisy.Result] = []
    try:
        for name in wanted:
            if name in objstore.S3_SCENARIOS:
                continue
            log(f"scenario {name}")
            if name == "latency":
                rows[section[name]] += scenarios.latency(sizes, peers(), work, log)
            elif name == "burst":
                rows[section[name]] += scenarios.burst(sizes, peers(), work, log)
            elif name == "hot":
                rows[section[name]] += scenarios.hot(sizes, peers(), work, log)
            elif name == "noop":
                rows[section[name]] += scenarios.noop(sizes, work, log)
            elif name == "cold":
                rows[section[name]] += scenarios.cold(sizes, work, log)
            elif name == "scale":
                rows[section[name]] += scenarios.scale(sizes, work, log)
            elif name == "claude":
                rows[section[name]] += scenarios.claude(sizes, work, log)
            elif name == "noisy":
                noisy_results += noisy.bench(args.quick, work, log)
        # The object-store rows share one Ceph cluster, started once for them.
        rows["s3"] += objstore.run_all(list(wanted), args.quick, work, log, args.tools)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # trees and stores never outlive the run
    command = "python -m bench" + (" --quick" if args.quick else "")
    if args.only:
        command += " --only " + " ".join(args.only)
    if args.tools:
        command += " --tools " + " ".join(args.tools)
    line = run_line(work, load_before, time.monotonic() - t0, command)
    old = args.out.read_text() if args.out is not None and args.out.exists() else None
    text = old
    for key, heading, names, about in SECTIONS:
        ran = {n for n in names if n in wanted}
        if not ran:
            continue
        lines = noisy.table(noisy_results) if key == "noisy" else table(rows[key])
        if args.tools:
            ran = set()  # only some tools' rows: every older run line stays
        text = report.update(text, key, heading, line, about, lines.splitlines(), ran, set(names))
    assert text is not None
    if args.quick:
        quick = report.TITLE + " (quick smoke test: figures mean nothing)"
        text = text.replace(report.TITLE, quick, 1)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
        shown = args.out.resolve()
        log(f"wrote {shown.relative_to(PROJECT) if shown.is_relative_to(PROJECT) else shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
