"""The abuses of issue 14, as programs an unprivileged user runs: shared by the noisy-
neighbour benchmark (`bench/noisy.py`) and the soak's attack mix (`tests/soak/soak.py`).

Each is Python run as the abuser with argv = [dir, seconds, scale]: `dir` is the abuser's
sessions directory (the abuse) or a directory outside any sessions directory (the control:
the same I/O, which the service must not see). `scale` multiplies the issue's sizes and
counts (1.0 is the issue's: 1 GB files, 200,000 names). The close flood is C (Python cannot
close fast enough to overflow an inotify queue): build it with `build_closer`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

# One 200 MB file and 30 hard links to it: the store once held 31 copies.
HARDLINK = r"""
import os, sys, time
d, seconds, scale = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
src = os.path.join(d, "big.jsonl")
with open(src, "wb") as f:  # dense: a sparse file is refused on its own
    for _ in range(int(200 * scale) or 1):
        f.write(b"x" * 1_000_000)
for i in range(30):
    try:
        os.link(src, os.path.join(d, "link%02d.jsonl" % i))
    except FileExistsError:
        pass
time.sleep(seconds)
"""

# Distinct dense files until 3 x 1 GB (scale 1): a user filling the store without links.
FILL = r"""
import os, sys, time
d, seconds, scale = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
end = time.monotonic() + seconds
block = b"x" * 1_000_000
for i in range(30):
    if time.monotonic() >= end:
        break
    with open(os.path.join(d, "fill%02d.jsonl" % i), "wb") as f:
        for _ in range(int(100 * scale) or 1):
            f.write(block)
time.sleep(max(0.0, end - time.monotonic()))
"""

# Create 50,000 names, delete them, repeat: the store once kept every name it had seen.
CHURN = r"""
import os, sys, time
d, seconds, scale = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
n = int(50_000 * scale) or 1
end = time.monotonic() + seconds
r = int(time.time() * 1000) % 1_000_000
while time.monotonic() < end:
    for i in range(n):
        fd = os.open(os.path.join(d, "c%d_%d.jsonl" % (r, i)), os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"{}\n")
        os.close(fd)
    for i in range(n):
        os.unlink(os.path.join(d, "c%d_%d.jsonl" % (r, i)))
    r += 1
"""

# Two 1 GB transcripts and `touch` 20 times a second: no byte changes, every copy whole.
TOUCH = r"""
import os, sys, time
d, seconds, scale = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
paths = [os.path.join(d, "t%d.jsonl" % i) for i in range(2)]
for p in paths:
    if not os.path.exists(p):
        with open(p, "wb") as f:  # dense: a sparse file is refused on its own
            for _ in range(int(1000 * scale) or 1):
                f.write(b"x" * 1_000_000)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for p in paths:
        os.utime(p)
    time.sleep(0.05)
"""

# 200,000 tiny files made in a directory beside `dir`, then renamed in as fast as it goes.
# With argv[4] == "wait": say "staged" and wait for "go" (files beside the stage directory)
# so the benchmark can start its victim between the two.
BURST = r"""
import os, sys, time
d, seconds, scale = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
wait = len(sys.argv) > 4 and sys.argv[4] == "wait"
n = int(200_000 * scale) or 1
stage = os.path.join(os.path.dirname(d), "stage-" + os.path.basename(d))
os.makedirs(stage, 0o700, exist_ok=True)
r = int(time.time() * 1000) % 1_000_000
for i in range(n):
    fd = os.open(os.path.join(stage, "b%d_%06d.jsonl" % (r, i)), os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"{}\n")
    os.close(fd)
if wait:
    open(stage + ".staged", "w").close()
    while not os.path.exists(stage + ".go"):
        time.sleep(0.01)
t0 = time.monotonic()
for i in range(n):
    name = "b%d_%06d.jsonl" % (r, i)
    os.rename(os.path.join(stage, name), os.path.join(d, name))
print("renamed %d in %.1f s" % (n, time.monotonic() - t0), file=sys.stderr)
time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
"""

# Four 200 MB transcripts rewritten from the start in a loop, at disk speed.
REWRITE = r"""
import os, sys, time
d, seconds, scale = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
size = int(200e6 * scale) or 1
block = b"x" * (1 << 20)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for i in range(4):
        with open(os.path.join(d, "r%d.jsonl" % i), "wb") as f:
            left = size
            while left > 0:
                left -= f.write(block[: min(left, len(block))])
"""

# A file truncated and written again, over and over: once one "shrank" WARNING each time.
SHRINK = r"""
import os, sys, time
d, seconds, scale = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
p = os.path.join(d, "shrink.jsonl")
end = time.monotonic() + seconds
i = 0
while time.monotonic() < end:
    with open(p, "wb") as f:
        f.write(b'{"i":%d}\n' % i * (1 + i % 50))
    i += 1
    time.sleep(0.002)
"""

# ~/user moved aside and a symlink put in its place, again and again, while files are
# closed in the real (still watched) sessions directory: once one WARNING per close.
SWAP = r"""
import os, sys, time
d, seconds, scale = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
if os.path.basename(d) != "sessions":  # the control: the same tree outside any home's
    d = os.path.join(d, "user", "sessions")
    os.makedirs(d, 0o700, exist_ok=True)
top = os.path.dirname(d)  # ~/user
aside = top + ".aside"
moved = os.path.join(aside, os.path.basename(d))
end = time.monotonic() + seconds
i = 0
while time.monotonic() < end:
    os.rename(top, aside)
    os.symlink(aside, top)
    for k in range(200):
        name = os.path.join(moved, "s%d.jsonl" % (k % 8))
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.write(fd, b'{"k":%d}\n' % k)
        os.close(fd)
    os.unlink(top)
    os.rename(aside, top)
    i += 1
    time.sleep(0.01)
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

# When no C compiler is at hand: far fewer closes per second, still a flood.
CLOSE_FLOOD_PY = r"""
import os, sys, time
d, seconds = sys.argv[1], float(sys.argv[2])
end = time.monotonic() + seconds
n = 0
while time.monotonic() < end:
    for k in range(1024):
        p = os.path.join(d, "f%d.jsonl" % (k % 16))
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT, 0o600))
"""

PROGRAMS: dict[str, str] = {
    "hardlink": HARDLINK,
    "fill": FILL,
    "churn": CHURN,
    "touch": TOUCH,
    "burst": BURST,
    "closes": "",  # the C close flood (build_closer)
    "rewrite": REWRITE,
    "shrink": SHRINK,
    "swap": SWAP,
}


def build_closer(where: Path) -> Path | None:
    """Compile the close flood into `where` (world-executable); None without a compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = where / "closer.c"
    out = where / "closer"
    src.write_text(CLOSE_FLOOD_C)
    subprocess.run([cc, "-O2", "-o", str(out), str(src)], check=True)
    out.chmod(0o755)
    return out


def as_uid(uid: int, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    """Run argv as uid:uid with no supplementary groups (setpriv: no fork of a threaded
    parent before the drop)."""
    prefix = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    return subprocess.Popen([*prefix, *argv], stdin=subprocess.DEVNULL, **kw)


def start(
    kind: str,
    uid: int,
    where: Path,
    seconds: float,
    scale: float,
    closer: Path | None,
    *extra: str,
    **kw: Any,
) -> subprocess.Popen[bytes]:
    """Start one abuse as `uid` on `where` for `seconds`."""
    if kind == "closes":
        if closer is not None:
            return as_uid(uid, [str(closer), str(where), str(seconds)], **kw)
        argv = [sys.executable, "-c", CLOSE_FLOOD_PY, str(where), str(seconds)]
        return as_uid(uid, argv, **kw)
    code = PROGRAMS[kind]
    argv = [sys.executable, "-c", code, str(where), str(seconds), str(scale), *extra]
    return as_uid(uid, argv, **kw)


__all__ = ["PROGRAMS", "as_uid", "build_closer", "start"]
