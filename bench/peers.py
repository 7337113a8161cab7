"""The tools under test, started and stopped the same way.

Live peers (session-watcher run, lsyncd, an inotifywait+cp loop) run in their own process
group, against their own fresh store, and `start` returns only once they are ready to
see events. One-shot passes (rsync -a, cp -a + sync, the legacy algorithm,
session-watcher reconcile) are timed with wait4(), which also gives their peak RSS.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .tree import Tree

__all__ = [
    "PROJECT",
    "InotifyCp",
    "LivePeer",
    "Lsyncd",
    "SessionWatcher",
    "group_cpu_seconds",
    "sw_command",
    "timed",
]

PROJECT = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int) -> float:
    """utime+stime of every live process in the group, plus what each has reaped
    (cutime+cstime): rsync or cp children that came and went are counted through the
    lsyncd or shell process that waited for them."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rfind(b")") + 2 :].split()
        if int(fields[2]) != pgid:
            continue
        total += sum(int(x) for x in fields[11:15])
    return total / _TICK


def proc_status(pid: int, key: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            if ln.startswith(key + ":"):
                return ln.split(":", 1)[1].strip()
    raise KeyError(key)


_PR_SET_CHILD_SUBREAPER = 36
_subreaper = False


def _become_subreaper() -> None:
    global _subreaper
    if not _subreaper:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
        _subreaper = True


def timed(cmd: list[str], *, cwd: Path | None = None) -> tuple[float, int]:
    """Run to completion; (wall seconds, peak RSS in KiB of the largest process).

    Why the detour through `sh ... &`: a child forked from this (large) Python process
    keeps its RSS as the floor of ru_maxrss even after exec, so every tool would report
    at least the harness's own size. The command is started in the background by a small
    shell that exits at once; as a child subreaper we inherit the command and wait4() it,
    and its ru_maxrss starts from the shell's ~1 MB."""
    _become_subreaper()
    with tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        sh = subprocess.run(
            ["sh", "-c", '"$@" </dev/null >/dev/null & echo $!', "sh", *cmd],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=err,
            check=True,
        )
        pid = int(sh.stdout)
        _, status, usage = os.wait4(pid, 0)
        wall = time.monotonic() - t0
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            err.seek(0)
            msg = err.read()[-500:].decode(errors="replace")
            raise RuntimeError(f"{cmd[0]} exited {code}: {msg}")
    return wall, int(usage.ru_maxrss)


def _wait_for(cond: object, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: exited {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(0.05)  # start-up only: arrivals are never detected by polling


class LivePeer:
    key = "peer"
    label = "peer"
    tool = ""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def unavailable(self) -> str | None:
        if self.tool and shutil.which(self.tool) is None:
            return f"{self.tool} not installed"
        return None

    def start(self, tree: Tree, store: Path, work: Path) -> None:
        raise NotImplementedError

    def _spawn(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: CPU sums and stop() cover children
                env=env,
                cwd=PROJECT,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return group_cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait()
        # Stragglers of the group (a cp mid-copy): only our own group, by its id.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None


def sw_command(subcommand: str, home: Path, store: Path) -> list[str]:
    """`session-watcher SUBCOMMAND` on a bench tree: every home counts (the trees are
    root's) and the store's group is root's, so no group lookup warning skews a run."""
    return [
        sys.executable,
        "-m",
        "session_watcher",
        subcommand,
        "--home-root",
        str(home),
        "--target",
        str(store),
        "--min-uid",
        "0",
        "--group",
        "root",
    ]


class SessionWatcher(LivePeer):
    """The real service: `python -m session_watcher run`, READY=1 read from a NOTIFY_SOCKET
    we bind, so start-up time is what systemd would see."""

    key = "sw"
    label = "session-watcher"

    def __init__(self, extra: list[str] | None = None, *, ready_timeout: float = 180) -> None:
        super().__init__()
        self.extra = extra or []
        self.ready_timeout = ready_timeout
        self.ready_seconds = 0.0
        self._sock: socket.socket | None = None

    def start(self, tree: Tree, store: Path, work: Path) -> None:
        path = work / f"notify-{os.getpid()}-{time.monotonic_ns()}.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        self._sock = sock
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
        env["NOTIFY_SOCKET"] = str(path)
        cmd = [*sw_command("run", tree.root, store), *self.extra]
        t0 = time.monotonic()
        self._spawn(cmd, work / "session-watcher.log", env)
        sock.settimeout(0.5)
        deadline = t0 + self.ready_timeout
        while True:
            try:
                msg = sock.recv(4096)
            except TimeoutError:
                assert self.proc is not None
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("session-watcher did not send READY=1") from None
                continue
            if b"READY=1" in msg.split(b"\n"):
                self.ready_seconds = time.monotonic() - t0
                return

    def threads(self) -> int:
        return int(proc_status(self.pid, "Threads"))

    def vmhwm_kib(self) -> int:
        return int(proc_status(self.pid, "VmHWM").split()[0])

    def own_cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat", "rb") as f:
            raw = f.read()
        fields = raw[raw.rfind(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _TICK

    def stop(self) -> None:
        super().stop()
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Lsyncd(LivePeer):
    """lsyncd with one sync{} per user (sessions dir -> store/<user>), as an operator
    mapping homes onto the store would write it; only `source`/`target` are set, so
    `delay` and the rest are lsyncd's defaults."""

    tool = "lsyncd"

    def __init__(self, direct: bool) -> None:
        super().__init__()
        self.direct = direct
        self.key = "lsyncd-direct" if direct else "lsyncd"
        self.label = "lsyncd default.direct" if direct else "lsyncd default (rsync)"

    def unavailable(self) -> str | None:
        return super().unavailable() or (
            None if shutil.which("rsync") else "rsync not installed (lsyncd needs it)"
        )

    def start(self, tree: Tree, store: Path, work: Path) -> None:
        mode = "default.direct" if self.direct else "default.rsync"
        log = work / f"{self.key}.log"
        log.unlink(missing_ok=True)
        lines = [f'settings {{ nodaemon = true, logfile = "{log}", insist = true }}']
        for user in tree.files:
            (store / user).mkdir(parents=True, exist_ok=True)
            lines.append(
                f'sync {{ {mode}, source = "{tree.sessions(user)}/", target = "{store / user}/" }}'
            )
        cfg = work / f"{self.key}.lua"
        cfg.write_text("\n".join(lines) + "\n")
        self._spawn(["lsyncd", str(cfg)], work / f"{self.key}.out")
        want = len(tree.files)

        def started() -> bool:
            # lsyncd logs one "Startup of ... finished" per sync once its initial rsync is
            # done; its inotify watches are in place before that.
            try:
                return log.read_text(errors="replace").count("finished") >= want
            except FileNotFoundError:
                return False

        assert self.proc is not None
        _wait_for(started, 120, self.label, self.proc)


INOTIFY_CP = r"""
# The loop everyone writes first: one cp per event, in place.
root=$1; store=$2; shift 2
inotifywait -m -e close_write,moved_to --format '%w%f' "$@" 2>"$INOTIFY_LOG" |
while IFS= read -r path; do
    case ${path##*/} in .*) continue;; *.jsonl) ;; *) continue;; esac
    rel=${path#"$root"/}
    cp -- "$path" "$store/${rel%%/*}/"
done
"""


class InotifyCp(LivePeer):
    key = "inotifywait"
    label = "inotifywait + cp loop"
    tool = "inotifywait"

    def start(self, tree: Tree, store: Path, work: Path) -> None:
        for user in tree.files:
            (store / user).mkdir(parents=True, exist_ok=True)
        script = work / "inotify-cp.sh"
        script.write_text(INOTIFY_CP)
        log = work / "inotifywait.log"
        log.unlink(missing_ok=True)
        env = dict(os.environ, INOTIFY_LOG=str(log))
        dirs = [str(d) for d in tree.session_dirs()]
        self._spawn(
            ["bash", str(script), str(tree.root), str(store), *dirs], log.with_suffix(".out"), env
        )

        def started() -> bool:
            try:
                return "Watches established" in log.read_text(errors="replace")
            except FileNotFoundError:
                return False

        assert self.proc is not None
        _wait_for(started, 60, self.label, self.proc)


class _Skipped(Lsyncd):
    """lsyncd's default mode in the quick run: it waits its 15 s `delay` in every run, which
    alone would break the 2-minute budget; default.direct exercises the same code."""

    def unavailable(self) -> str | None:
        return "left out of bench-quick (15 s delay per run); measured by make bench"


def live_peers(quick: bool = False) -> list[LivePeer]:
    default: LivePeer = _Skipped(direct=False) if quick else Lsyncd(direct=False)
    return [SessionWatcher(), default, Lsyncd(direct=True), InotifyCp()]
