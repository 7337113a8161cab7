"""One user must never hold up, fill up or drown out the others (issue 14), tried the way
an unprivileged user would: a FUSE file system that hangs root's calls, quotas, hard links,
log floods, a `touch` loop on a big transcript and a flood of tiny files, each next to a
victim whose appends must keep landing. Real `session-watcher run` processes with JSON logs;
assertions are on JSON fields and the state file, never on message wording or timings
beyond generous bounds (two shared cores).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import APPENDER, START_TIMEOUT, Service, line, wait_stored
from helpers import IS_ROOT, Tree, User, run_as, wait_for

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="needs root (other uids, mounts)")

STOP_BUDGET = 15.0  # SIGTERM -> exit, stuck threads or not (STOP_SECONDS is 10 s)
VICTIM_PAD = 150  # ~200-byte lines, like the victim

# --- the service, with JSON logs and a state file -------------------------------------------


@dataclass
class Watched:
    svc: Service
    state_path: Path

    @property
    def pid(self) -> int:
        return self.svc.proc.pid

    def docs(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.svc.log().splitlines():
            if raw.startswith("{"):
                try:
                    out.append(json.loads(raw))
                except ValueError:  # a line still being written
                    continue
        return out

    def lines_of(self, user: str, *levels: str) -> list[dict[str, Any]]:
        return [d for d in self.docs() if d.get("user") == user and d["level"] in levels]

    def copies(self, user: str) -> list[dict[str, Any]]:
        return [
            d
            for d in self.docs()
            if d.get("user") == user and "bytes" in d and d["msg"].startswith("copied")
        ]

    def wait_doc(
        self, pred: Callable[[dict[str, Any]], bool], *, count: int = 1, timeout: float = 15.0
    ) -> list[dict[str, Any]]:
        def found() -> list[dict[str, Any]] | None:
            self.svc._check_alive()
            got = [d for d in self.docs() if pred(d)]
            return got if len(got) >= count else None

        try:
            return wait_for(found, timeout=timeout, what="log line(s)")
        except AssertionError as e:
            raise AssertionError(f"{e}; log:\n{self.svc.log()[-4000:]}") from None

    def state(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.state_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        assert isinstance(doc, dict)
        return doc

    def rss_mb(self) -> float:
        for raw in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if raw.startswith("VmRSS:"):
                return int(raw.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def stop_seconds(self, timeout: float = 30.0) -> tuple[int, float]:
        t0 = time.monotonic()
        try:
            code = self.svc.stop(signal.SIGTERM, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"no exit {timeout} s after SIGTERM; log:\n{self.svc.log()[-6000:]}"
            ) from None
        return code, time.monotonic() - t0


StartFn = Callable[..., Watched]


@pytest.fixture
def service(tree: Tree) -> Iterator[StartFn]:
    """`service(*flags, ready=True)`: `session-watcher run --log-format json` on `tree`
    with a state file; killed in teardown."""
    started: list[Watched] = []

    def _start(*extra: str, ready: bool = True) -> Watched:
        state_path = tree.base / f"state-{len(started)}.json"
        argv = [
            sys.executable,
            "-m",
            "session_watcher",
            "run",
            *tree.cli_args(
                "--settle",
                "0",
                "--reconcile-interval",
                "0",
                "--log-format",
                "json",
                "--state-file",
                str(state_path),
                # Every copy's line (at INFO a user gets one a minute, the rest at DEBUG).
                "--log-level",
                "DEBUG",
                *extra,
            ),
        ]
        log_path = tree.base / f"service-{len(started)}.log"
        log_file = log_path.open("wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_WATCHER_")}
        env.pop("NOTIFY_SOCKET", None)
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env
        )
        w = Watched(Service(proc, log_path, log_file), state_path)
        started.append(w)
        if ready:
            w.wait_doc(lambda d: d["msg"].startswith("ready: watching"), timeout=START_TIMEOUT)
        return w

    yield _start
    for w in started:
        w.svc.close()


# --- a victim appending like Claude Code, as their own uid ------------------------------------


@dataclass
class Victim:
    user: User
    path: Path
    proc: subprocess.Popen[bytes]
    count: int

    def expected(self) -> bytes:
        return b"".join(line(i, VICTIM_PAD) for i in range(self.count))

    def finish(self, tree: Tree, timeout: float = 30.0) -> None:
        """The appender has ended and everything it wrote is in the store."""
        assert self.proc.wait(timeout) == 0, self.proc.stderr
        wait_stored(tree, self.user, self.path.name, self.expected(), timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def start_victim(u: User, count: int, name: str = "victim.jsonl") -> Victim:
    """Append `count` ~200-byte lines every 100 ms (open, write, close), in the background."""
    path = u.sessions / name
    proc = subprocess.Popen(
        [
            "setpriv",
            f"--reuid={u.uid}",
            f"--regid={u.gid}",
            "--clear-groups",
            sys.executable,
            "-c",
            APPENDER,
            str(path),
            str(count),
            str(VICTIM_PAD),
            "0.1",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return Victim(u, path, proc, count)


@pytest.fixture
def victims() -> Iterator[Callable[[User, int], Victim]]:
    started: list[Victim] = []

    def _start(u: User, count: int) -> Victim:
        v = start_victim(u, count)
        started.append(v)
        return v

    yield _start
    for v in started:
        v.kill()


def as_user(u: User, code: str, *args: str) -> subprocess.Popen[bytes]:
    """A Python snippet run as `u` in the background (sys.argv[1:] = args)."""
    return subprocess.Popen(
        [
            "setpriv",
            f"--reuid={u.uid}",
            f"--regid={u.gid}",
            "--clear-groups",
            sys.executable,
            "-c",
            code,
            *args,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode(errors="replace")


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))]


# --- a FUSE file system that hangs root --------------------------------------------------------

FUSE_SOURCE = Path(__file__).with_name("fuse_block.c")


@pytest.fixture(scope="module")
def fuse_daemon() -> Iterator[Path]:
    """tests/fuse_block.c compiled into a temp dir; skipped when it cannot be."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    cc = shutil.which("cc")
    if cc is None or shutil.which("pkg-config") is None or shutil.which("fusermount3") is None:
        pytest.skip("needs cc, pkg-config and fuse3 (apt-get install fuse3 libfuse3-dev)")
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True
    )
    if flags.returncode != 0:
        pytest.skip("no fuse3 development files (apt-get install libfuse3-dev)")
    out = Path(tempfile.mkdtemp(prefix="sw-fuse-"))
    try:
        binary = out / "fuse_block"
        r = subprocess.run(
            [cc, "-O1", "-o", str(binary), str(FUSE_SOURCE), *flags.stdout.split()],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            pytest.skip(f"cannot compile fuse_block.c: {r.stderr[-500:]}")
        yield binary
    finally:
        shutil.rmtree(out, ignore_errors=True)


def mounted(where: Path) -> bool:
    """From /proc/self/mountinfo: never a stat, which would hang on our own file system."""
    target = os.fsencode(str(where)).replace(b" ", b"\\040")
    with open("/proc/self/mountinfo", "rb") as f:
        return any(raw.split()[4] == target for raw in f)


@contextmanager
def blocking_fuse(
    daemon: Path, backing: Path, mountpoint: Path, control: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`daemon` mounted on `mountpoint`, passing through to `backing`; root's calls hang
    while control/arm exists. Always killed and unmounted, on failure too."""
    proc = subprocess.Popen(
        [
            str(daemon),
            str(backing),
            str(control),
            str(mountpoint),
            "-f",
            # No caching: every lookup and getattr of root's goes to the daemon.
            "-o",
            "allow_other,default_permissions,entry_timeout=0,attr_timeout=0,negative_timeout=0",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: mounted(mountpoint) or proc.poll() is not None, timeout=10.0)
        assert proc.poll() is None, "fuse_block exited"
        yield proc
    finally:
        # Killing the daemon aborts the connection: every call blocked in it gets ENOTCONN.
        proc.kill()  # also when stopped (SIGSTOP)
        proc.wait(10)
        for cmd in (["fusermount3", "-u", "-z"], ["umount", "-l"]):
            if not mounted(mountpoint):
                break
            subprocess.run([*cmd, str(mountpoint)], capture_output=True, check=False)
        assert not mounted(mountpoint)


def fuse_backing(tree: Tree, u: User, under: Path) -> tuple[Path, Path]:
    """A backing directory for a FUSE mount on `under` (the abuser's, holding what `under`
    held: user/sessions below it when `under` is the home) and the control directory."""
    backing = tree.base / f"backing-{u.name}"
    control = tree.base / f"control-{u.name}"
    shutil.copytree(under, backing, symlinks=True)
    for dirpath, dirnames, filenames in os.walk(backing):
        for n in [dirpath, *(os.path.join(dirpath, x) for x in dirnames + filenames)]:
            os.lchown(n, u.uid, u.gid)
    control.mkdir()
    return backing, control


# --- a stuck user ----------------------------------------------------------------------------


def main_thread_exited(pid: int) -> bool:
    """The process called exit: its main thread is a zombie (threads of it may still be
    held in the kernel by a FUSE request its daemon has read and never answers)."""
    try:
        return Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in (
            "Z",
            "X",
        )
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("where", "hang"),
    [
        ("user/sessions", "daemon-stopped"),
        ("user", "daemon-stopped"),
        ("user", "daemon-blocks"),
        ("", "daemon-blocks-files"),  # the whole home: one device, so it is served
    ],
)
def test_stuck_user_holds_only_themselves(
    tree: Tree,
    service: StartFn,
    victims: Callable[[User, int], Victim],
    fuse_daemon: Path,
    where: str,
    hang: str,
) -> None:
    """A FUSE file system over the abuser's sessions directory (or their whole ~/user)
    that hangs every call of root's from the start: the abuser is reported stuck once and
    listed in the state file; the victim's appends land, a SIGHUP pass completes, and
    SIGTERM ends the service within its stop budget with threads blocked in the kernel.

    "daemon-stopped": the daemon is SIGSTOPped, so requests wait unread in the kernel and
    a dying process can leave them: the service must exit in full. "daemon-blocks": the
    daemon has read root's request and never answers; no process can leave that wait
    (the kernel waits uninterruptibly for an answer that was already read) until the
    daemon dies or the connection is aborted. The service must still call exit within the
    budget, and be gone as soon as the daemon is. "daemon-blocks-files": directories
    answer, opening a file hangs: the thread held is a pass's copy thread, which the
    interpreter's exit would join for ever."""
    victim = tree.add_user("victim")
    abuser = tree.add_user("abuser")
    tree.write(abuser, "old.jsonl", line(1))
    mountpoint = abuser.home / where
    backing, control = fuse_backing(tree, abuser, mountpoint)
    if hang.startswith("daemon-blocks"):
        (control / "arm").touch()
    if hang == "daemon-blocks-files":  # the pass lists the directory, its copy hangs
        (control / "files-only").touch()
    with blocking_fuse(fuse_daemon, backing, mountpoint, control) as daemon:
        if hang == "daemon-stopped":
            daemon.send_signal(signal.SIGSTOP)
        w = service("--stuck-after", "1")
        stuck = w.wait_doc(lambda d: d.get("reason") == "stuck")
        assert [d["user"] for d in stuck] == ["abuser"] and stuck[0]["level"] == "WARNING"
        wait_for(lambda: w.state().get("stuck") == ["abuser"], what="state file: stuck")
        v = victims(victim, 30)
        v.finish(tree)
        lat = [d["latency_ms"] for d in w.copies("victim") if "latency_ms" in d]
        assert lat, "no live copies of the victim's"
        passes = len([d for d in w.docs() if d["msg"].startswith("pass done")])
        w.svc.send(signal.SIGHUP)
        w.wait_doc(lambda d: d["msg"].startswith("pass done"), count=passes + 1)
        tree.write(victim, "after.jsonl", line(2))
        wait_for(
            lambda: (
                tree.stored(victim, "after.jsonl").exists()
                and tree.stored(victim, "after.jsonl").read_bytes() == line(2)
            ),
            what="a copy after the SIGHUP pass",
        )
        assert w.state().get("stuck") == ["abuser"]  # still hanging: still listed
        bad = w.lines_of("abuser", "WARNING", "ERROR")
        assert [d.get("reason") for d in bad] == ["stuck"], bad
        t0 = time.monotonic()
        w.svc.send(signal.SIGTERM)
        if hang == "daemon-stopped":
            code = w.svc.proc.wait(STOP_BUDGET)
        else:
            wait_for(lambda: main_thread_exited(w.pid), timeout=STOP_BUDGET, what="exit")
        took = time.monotonic() - t0
    if hang.startswith("daemon-blocks"):  # the daemon is dead: the process is gone at once
        code = w.svc.proc.wait(10)
    assert code == 0
    print(f"\n{where}, {hang}: exit {took:.1f} s after SIGTERM")
    assert not tree.stored(abuser, "old.jsonl").exists()


@pytest.mark.timeout(90)
def test_file_system_that_hangs_later_holds_only_its_user(
    tree: Tree,
    service: StartFn,
    victims: Callable[[User, int], Victim],
    fuse_daemon: Path,
) -> None:
    """The abuser's whole home is their FUSE mount (same device all the way down, so it is
    watched): it answers until the service watches it, then hangs root while the abuser
    keeps creating and closing files through it. Each event must be handled by name only:
    an `lstat` on watchdog's dispatcher thread would stop every user's events."""
    victim = tree.add_user("victim")
    abuser = tree.add_user("abuser")
    backing, control = fuse_backing(tree, abuser, abuser.home)
    with blocking_fuse(fuse_daemon, backing, abuser.home, control):
        w = service("--stuck-after", "1")
        w.wait_doc(lambda d: d["msg"].startswith("watching") and "abuser" in d["msg"])
        tree.write(abuser, "first.jsonl", line(1))
        wait_stored(tree, abuser, "first.jsonl", line(1))  # served while it answers
        (control / "arm").touch()
        churn = as_user(
            abuser,
            "import os, sys, time\n"
            "for i in range(40):\n"
            "    p = os.path.join(sys.argv[1], 'c%d.jsonl' % i)\n"
            "    os.close(os.open(p, os.O_WRONLY | os.O_CREAT, 0o600))\n"  # IN_CREATE, empty
            "    time.sleep(0.05)\n",
            str(abuser.sessions),
        )
        try:
            v = victims(victim, 30)
            v.finish(tree)
            finish(churn)
            w.wait_doc(lambda d: d.get("reason") == "stuck" and d.get("user") == "abuser")
            wait_for(lambda: w.state().get("stuck") == ["abuser"], what="state file: stuck")
        finally:
            churn.kill()
        t0 = time.monotonic()
        w.svc.send(signal.SIGTERM)
        wait_for(lambda: main_thread_exited(w.pid), timeout=STOP_BUDGET, what="exit")
        took = time.monotonic() - t0
    assert w.svc.proc.wait(10) == 0  # gone with the daemon
    print(f"\nhangs later: exit {took:.1f} s after SIGTERM")


# --- store limits and hard links ---------------------------------------------------------------


EDGE_LOOP = r"""
import os, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
end = time.monotonic() + seconds
while time.monotonic() < end:
    for size in (10, 20, 250_000):
        with open(path, "wb") as f:
            f.write(b"x" * (size - 1) + b"\n")
        time.sleep(0.12)
"""


@pytest.mark.timeout(60)
def test_quota_refuses_one_user_once_per_episode(
    tree: Tree, service: StartFn, victims: Callable[[User, int], Victim]
) -> None:
    victim = tree.add_user("victim")
    many = tree.add_user("many")  # over --max-user-files
    big = tree.add_user("big")  # over --max-user-bytes
    w = service("--max-user-files", "5", "--max-user-bytes", "300000")
    v = victims(victim, 20)
    for i in range(12):
        tree.write(many, f"m{i:02d}.jsonl", line(i))
    for i in range(4):  # as the user: a file made by root then chowned is "owner" a moment
        tree.write(big, f"b{i}.jsonl", b"x" * 99_999 + b"\n")
    # The store follows the limits; what is over them is refused, not copied.
    wait_for(
        lambda: len([d for d in w.docs() if d.get("reason") == "quota"]) >= 2,
        what="quota refusals of both users",
    )
    v.finish(tree)
    # A full pass (SIGHUP) looks again at every refused file: the episode goes on.
    passes = len([d for d in w.docs() if d["msg"].startswith("pass done")])
    w.svc.send(signal.SIGHUP)
    w.wait_doc(lambda d: d["msg"].startswith("pass done"), count=passes + 1)
    tree.write(many, "later.jsonl", line(99))
    wait_for(lambda: sorted(w.state().get("over_quota", [])) == ["big", "many"], what="state")
    # At the edge: shrink a file (fits), grow it by a line (fits: the episode ends), make
    # it too big (refused: a new episode), over and over. Still one line per user a minute.
    finish(as_user(big, EDGE_LOOP, str(big.sessions / "b0.jsonl"), "4"), timeout=30)
    wait_for(lambda: w.state().get("over_quota") is not None, what="state")
    stored_many = list((tree.target / "many").iterdir())
    assert len(stored_many) == 5
    assert sum(p.stat().st_size for p in (tree.target / "big").iterdir()) <= 300_000
    for user in ("many", "big"):
        reasons = [d.get("reason") for d in w.lines_of(user, "WARNING", "ERROR")]
        assert reasons.count("quota") == 1, reasons
        assert set(reasons) <= {"quota", "shrank"} and len(reasons) <= 2, reasons
    assert w.lines_of("victim", "WARNING", "ERROR") == []


@pytest.mark.timeout(60)
def test_hard_links_cost_at_most_one_copy(
    tree: Tree, service: StartFn, victims: Callable[[User, int], Victim]
) -> None:
    victim = tree.add_user("victim")
    abuser = tree.add_user("abuser")
    w = service()
    v = victims(victim, 20)
    data = line(1, pad=200_000)
    src = tree.write(abuser, "one.jsonl", data)
    links: list[str | bytes] = ["sh", "-c", 'for i in $(seq 1 30); do ln "$1" "$2/l$i.jsonl"; done']
    run_as(abuser.uid, abuser.gid, [*links, "sh", str(src), str(abuser.sessions)])
    assert os.stat(src).st_nlink == 31
    w.wait_doc(lambda d: d.get("reason") == "hardlink" and d.get("user") == "abuser")
    v.finish(tree)
    passes = len([d for d in w.docs() if d["msg"].startswith("pass done")])
    w.svc.send(signal.SIGHUP)  # a pass over 31 names of one inode
    w.wait_doc(lambda d: d["msg"].startswith("pass done"), count=passes + 1)
    store = tree.target / "abuser"
    held = list(store.iterdir()) if store.exists() else []
    assert len(held) <= 1 and sum(p.stat().st_size for p in held) <= len(data)
    warnings = w.lines_of("abuser", "WARNING", "ERROR")
    assert [d.get("reason") for d in warnings] == ["hardlink"], warnings


# --- log floods --------------------------------------------------------------------------------

SWAP_LOOP = r"""
import os, sys, time
home, seconds = sys.argv[1], float(sys.argv[2])
user, aside = os.path.join(home, "user"), os.path.join(home, "user.real")
os.rename(user, aside)
os.symlink(aside, user)
end = time.monotonic() + seconds
i = 0
while time.monotonic() < end:
    fd = os.open(os.path.join(aside, "sessions", "s%d.jsonl" % (i % 16)),
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.write(fd, b"{}\n")
    os.close(fd)
    i += 1
    if i % 64 == 0:
        time.sleep(0.001)
"""

SHRINK_LOOP = r"""
import os, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
end = time.monotonic() + seconds
i = 0
while time.monotonic() < end:
    with open(path, "wb") as f:  # truncate...
        f.write(b"{}\n" * (1 + i % 2))
    with open(path, "ab") as f:  # ...and rewrite, smaller every other time
        f.write(b"{}\n" * (50 * (1 + (i + 1) % 2)))
    i += 1
    time.sleep(0.005)
"""


@pytest.mark.timeout(60)
def test_log_floods_are_limited_per_user(
    tree: Tree, service: StartFn, victims: Callable[[User, int], Victim]
) -> None:
    """The `~/user` symlink swap with closes in the still-watched real directory, and a
    truncate/rewrite loop, each for 10 s: a handful of WARNING/ERROR lines per user."""
    victim = tree.add_user("victim")
    swapper = tree.add_user("swapper")
    shrinker = tree.add_user("shrinker")
    tree.write(shrinker, "s.jsonl", line(0) * 50)
    w = service()
    wait_stored(tree, shrinker, "s.jsonl", line(0) * 50)
    v = victims(victim, 100)
    seconds = "10"
    loops = [
        as_user(swapper, SWAP_LOOP, str(swapper.home), seconds),
        as_user(shrinker, SHRINK_LOOP, str(shrinker.sessions / "s.jsonl"), seconds),
    ]
    for p in loops:
        finish(p, timeout=40)
    v.finish(tree)
    for user in ("swapper", "shrinker"):
        bad = w.lines_of(user, "WARNING", "ERROR")
        assert 1 <= len(bad) <= 5, [(d["level"], d.get("reason"), d["msg"][:80]) for d in bad]
    assert w.lines_of("victim", "WARNING", "ERROR") == []


# --- byte budget --------------------------------------------------------------------------------

TOUCH_LOOP = r"""
import os, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
end = time.monotonic() + seconds
while time.monotonic() < end:
    os.utime(path)
    time.sleep(0.05)
"""


@pytest.mark.timeout(60)
def test_touch_loop_is_held_to_the_byte_budget(
    tree: Tree, service: StartFn, victims: Callable[[User, int], Victim]
) -> None:
    """`touch` 20 times a second on a 20 MB transcript for 8 s with a budget of 1 MB/s
    (burst 16 MB): without the budget that is ~16 copies (320 MB), with it one or two."""
    victim = tree.add_user("victim")
    abuser = tree.add_user("abuser")
    size = 20_000_000
    w = service("--user-write-mb-s", "1")
    t0 = time.monotonic()
    big = tree.write_fast(abuser, "big.jsonl", b"x" * (size - 1) + b"\n")
    os.utime(big)
    wait_stored(tree, abuser, "big.jsonl", big.read_bytes(), timeout=20)
    v = victims(victim, 80)
    finish(as_user(abuser, TOUCH_LOOP, str(big), "8"), timeout=30)
    v.finish(tree)
    elapsed = time.monotonic() - t0
    written = sum(d["bytes"] for d in w.copies("abuser"))
    bound = 1e6 * elapsed + 16e6 + size  # rate x time + burst, + the one copy in debt
    assert written <= bound, f"{written / 1e6:.0f} MB in {elapsed:.1f} s (bound {bound / 1e6:.0f})"
    lat = [d["latency_ms"] for d in w.copies("victim") if "latency_ms" in d]
    assert len(lat) >= 10 and percentile(lat, 0.5) < 1000, sorted(lat)[-5:]


# --- a flood of tiny files -------------------------------------------------------------------

FLOOD = r"""
import os, sys
stage, sessions, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.mkdir(stage, 0o700)
for i in range(n):
    fd = os.open(os.path.join(stage, "t%06d.jsonl" % i), os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"{}\n")
    os.close(fd)
for i in range(n):
    name = "t%06d.jsonl" % i
    os.rename(os.path.join(stage, name), os.path.join(sessions, name))
"""


@pytest.mark.timeout(120)
def test_flood_of_tiny_files_waits_behind_its_own_user(
    tree: Tree,
    service: StartFn,
    victims: Callable[[User, int], Victim],
    tmpfs: Callable[[Path, str], Path],
) -> None:
    """20,000 tiny files renamed into one sessions directory (more than the kernel queue
    holds): the victim's appends keep landing quickly, RSS stays bounded, every file of the
    abuser's lands in the end (zero loss)."""
    n = 20_000
    victim = tree.add_user("victim")
    abuser = tree.add_user("abuser")
    tmpfs(tree.target, "512m")
    # Fairness and memory are what this test is about: the abuser's copies are not held
    # to the default 100 a second here (20,000 would take over three minutes; the pacing
    # has a test of its own).
    w = service("--user-copies-s", "5000")
    rss = [w.rss_mb()]
    v = victims(victim, 100)  # 10 s
    flood = as_user(
        abuser, FLOOD, str(abuser.home / "user" / "stage"), str(abuser.sessions), str(n)
    )
    while v.proc.poll() is None:
        rss.append(w.rss_mb())
        time.sleep(0.2)
    finish(flood)
    v.finish(tree)
    lat = [d["latency_ms"] for d in w.copies("victim") if "latency_ms" in d]

    landed = [0]

    def all_landed() -> bool:
        rss.append(w.rss_mb())
        d = tree.target / "abuser"
        landed[0] = sum(1 for _ in os.scandir(d)) if d.exists() else 0
        return landed[0] >= n

    try:
        wait_for(all_landed, timeout=90, interval=0.5, what=f"{n} files of the abuser's")
    except AssertionError:
        notes = [d["msg"] for d in w.docs() if "bytes" not in d]
        raise AssertionError(f"{landed[0]} of {n} landed; {notes[-30:]}") from None
    rss.append(w.rss_mb())
    print(
        f"\nflood {n}: victim p50 {percentile(lat, 0.5):.1f} ms, p99 {percentile(lat, 0.99):.1f}"
        f" ms, max {max(lat):.1f} ms over {len(lat)} copies; RSS max {max(rss):.0f} MB,"
        f" end {rss[-1]:.0f} MB"
    )
    assert len(lat) >= 20
    assert percentile(lat, 0.5) < 500 and max(lat) < 5000, sorted(lat)[-5:]
    assert max(rss) < 150, rss


# --- a close flood ---------------------------------------------------------------------------

CLOSER_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char p[4096];
    time_t end = time(NULL) + 6;
    for (unsigned long n = 0; (n & 4095) || time(NULL) < end; n++) {
        snprintf(p, sizeof p, "%s/f%lu.jsonl", argv[1], n % 16);
        int fd = open(p, O_WRONLY | O_CREAT, 0600);
        if (fd >= 0)
            close(fd);
    }
    return 0;
}
"""


@pytest.mark.timeout(60)
def test_close_flood_overflows_are_logged_once_a_minute(
    tree: Tree, service: StartFn, victims: Callable[[User, int], Victim]
) -> None:
    """A C loop opening and closing 16 files for 6 s overflows the kernel queue again and
    again: each overflow is repaired (the victim's appends all land) but logged once a
    minute, not once each (watchdog's own line is not passed on)."""
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("needs cc")
    victim = tree.add_user("victim")
    abuser = tree.add_user("abuser")
    closer = tree.base / "closer"
    (tree.base / "closer.c").write_text(CLOSER_C)
    subprocess.run([cc, "-O2", "-o", str(closer), str(tree.base / "closer.c")], check=True)
    w = service()
    v = victims(victim, 60)
    run_as(abuser.uid, abuser.gid, [str(closer), str(abuser.sessions)])
    v.finish(tree)
    totals = w.state().get("totals", {})
    assert totals.get("overflows", 0) >= 1, totals  # the loop outruns the reader
    warned = [d for d in w.docs() if d["level"] in ("WARNING", "ERROR")]
    overflows = [d for d in warned if "overflow" in d["msg"].lower()]
    assert len(overflows) <= 1, [d["msg"] for d in overflows]
    assert len(warned) <= 3, [d["msg"][:80] for d in warned]
    print(f"\nclose flood: {len(warned)} WARNING/ERROR lines; totals {totals}")


@pytest.mark.timeout(90)
def test_a_big_home_is_slow_not_stuck(tree: Tree, service: StartFn) -> None:
    """A pass over a home of many files takes longer than --stuck-after, one quick system
    call after another: that user is not reported stuck (nor the walker replaced, nor
    their live copies put off), since no single call is slow."""
    big = tree.add_user("big")
    n = 3000
    for i in range(n):
        p = big.sessions / f"s{i:05d}.jsonl"
        p.write_bytes(line(i))
        os.chown(p, big.uid, big.gid)
    t0 = time.monotonic()
    # Unlimited copies a second: the pass must copy all 3,000 itself, one quick call after
    # another, for longer than --stuck-after (with the default budget it would hand 2,000
    # of them to the live queue and be over in a moment).
    w = service("--stuck-after", "1", "--user-copies-s", "0", ready=False)
    w.wait_doc(lambda d: d["msg"].startswith("ready: watching"), timeout=60)
    took = time.monotonic() - t0
    assert sum(1 for _ in os.scandir(tree.target / "big")) == n
    print(f"\nfirst pass over {n} files: {took:.1f} s")
    assert [d for d in w.docs() if d.get("reason") == "stuck" or "stuck" in d["msg"]] == []
    assert w.state().get("stuck") == []
