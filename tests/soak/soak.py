# ruff: noqa: S311  (the schedule is random.Random(seed), to be replayable; nothing secret)
"""`make soak`: the real `session-watcher run` under load, crashes, overflow, a full disk,
churn and attacks, all at once; then every invariant of the promise is checked.

    SOAK_SECONDS (180)  SOAK_USERS (40)  SOAK_SEED (random, printed)  SOAK_RATE (250 chunks/s)
    SOAK_TARGET (dir; s3: the store on a real Ceph RGW, see soak_s3.py)

Run as root (writers run as the users' uids, the store is a tmpfs, hostile entries are
owned by root or by other users). Not collected by pytest (the file name does not match
`test_*.py`): `make soak` / `make soak-quick` run it.

Parts:
- writers: one forked child per user that drops to the user's uid/gid (before any thread
  exists) and executes what the harness asks: append a chunk the way Claude Code does
  (open O_APPEND 0600, 512 KB write() calls that cut lines, one close), deliver a file by
  temp + rename (rsync style), or a burst of tiny appends. The harness appends to its own
  copy of every file *before* asking, so "written so far" is always a superset of what
  the file holds, and readers can check the store against it at any time.
- supervisor: starts the service, restarts it 0.5 s after it dies (systemd Restart=).
- chaos: kill -9 (some right after a multi-MB file closed, so mid-copy), SIGSTOP + a burst
  of > 20,000 events + SIGCONT, ENOSPC on the tmpfs store, new homes, a sessions directory
  deleted and recreated, a home renamed.
- planter: hostile entries (symlinks to a root-only secret and to other users' files and
  directories, FIFOs, sockets, hard links, foreign-owned files, sparse huge files,
  directories, users whose sessions directory is a symlink), at start and live.
- abusers (issue 14): one extra user per abuse of bench/abuse.py (name churn, touch loop,
  tiny-file burst, close flood, rewrite loop, hard-link fill, quota fill, shrink loop,
  `~/user` symlink swap), each running it in episodes of a few seconds, scaled to the
  tmpfs store, under small per-user limits (--max-user-bytes/--max-user-files). At the
  end: each abuser holds at most its limits in the store, no hard link was copied, and no
  incarnation logged more than 10 WARNING/ERROR lines per abuser per started minute.
- readers: threads that read every store file again and again and check that it is a
  line-complete prefix of what its writer has written so far, and holds no secret.
- notify: a test NOTIFY_SOCKET that records READY=1 / WATCHDOG=1 / STOPPING=1 per pid.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import multiprocessing.connection as mpc
import os
import random
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing import Pipe
from pathlib import Path
from typing import Any

from session_watcher.store import ORPHAN_TEMP_SECONDS, TEMP_PREFIX
from session_watcher.watch import reader_index

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from bench import abuse, noisy  # noqa: E402  (issue 14's abuses and RSS probe, as make bench's)

UID_BASE = 21000
NODE_WRITE = 512 * 1024  # Node splits a large appendFile into write() calls of this size
MAX_FILE_BYTES = 64 << 20
SESSION_CAP = 12 << 20  # a session this big goes idle
RSYNC_CAP = 1 << 20
WATCHDOG_USEC = 5_000_000
RESTART_SEC = 0.5
SETTLE = 3.0
STORE_SIZE = "2g"
# Per-user limits, small enough for the abusers to reach in a soak and far above what a
# soak user writes (sessions go idle at SESSION_CAP).
USER_BYTES = 256 << 20
USER_FILES = 3000
ABUSE_UID = UID_BASE + 8000
# Each abuse's scale in the soak (bench/abuse.py; 1.0 is the size): the files fit
# the tmpfs store, and fill goes past USER_BYTES (30 x 20 MB).
ABUSE_SCALE = {
    "churn": 0.02,  # 1,000 names a round
    "touch": 0.04,  # two 40 MB files
    "burst": 0.05,  # 10,000 files renamed in
    "closes": 1.0,
    "rewrite": 0.05,  # 4 x 10 MB
    "hardlink": 0.1,  # 20 MB + 30 links
    "fill": 0.2,  # 30 x 20 MB
    "shrink": 1.0,
    "swap": 1.0,
}
LINES_PER_MINUTE = 10  # WARNING/ERROR lines one abuser may cause per started minute


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    return int(raw) if raw.strip() else default


def say(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def burst_line(i: int) -> bytes:
    """The i-th line of a burst; the writer and the harness compute it the same way."""
    return b'{"type":"progress","burst":%d,"pad":"%s"}\n' % (i, b"b" * (i % 40))


# --- writers: forked children running as the user -------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    """Like Node: one write() per 512 KB piece (cutting lines), retrying short writes."""
    view = memoryview(data)
    while view:
        piece = view[:NODE_WRITE]
        n = os.write(fd, piece)
        view = view[n:]


def writer_main(conn: mpc.Connection, uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    os.umask(0o077)
    flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        op = msg[0]
        try:
            if op == "append":
                _, path, data = msg
                fd = os.open(path, flags | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    _write_all(fd, data)
                finally:
                    os.close(fd)
            elif op == "replace":
                _, path, tmp, data = msg
                fd = os.open(tmp, flags | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    _write_all(fd, data)
                finally:
                    os.close(fd)
                os.rename(tmp, path)
            elif op == "burst":
                _, paths, count = msg
                for i in range(count):
                    fd = os.open(paths[i % len(paths)], flags | os.O_APPEND | os.O_CREAT, 0o600)
                    try:
                        os.write(fd, burst_line(i))
                    finally:
                        os.close(fd)
            conn.send(("ok",))
        except OSError as e:
            conn.send(("err", f"{op}: {e}"))


# --- the model of what was written ------------------------------------------------------


@dataclass(eq=False)
class Session:
    user: User
    name: str
    rsync: bool
    data: bytearray = field(default_factory=bytearray)
    lock: threading.Lock = field(default_factory=threading.Lock)
    deleted: bool = False  # its sessions directory was deleted: the store keeps a prefix
    seq: int = 0


@dataclass(eq=False)
class User:
    index: int
    name: str  # current home directory name (changes when the home is renamed)
    uid: int
    conn: mpc.Connection | None = None
    pid: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)  # one command at a time
    exists: threading.Event = field(default_factory=threading.Event)
    late: bool = False
    sessions: list[Session] = field(default_factory=list)
    active: list[Session] = field(default_factory=list)
    rng: random.Random = field(default_factory=random.Random)


class Soak:
    def __init__(self) -> None:
        self.seconds = env_int("SOAK_SECONDS", 180)
        self.nusers = env_int("SOAK_USERS", 40)
        self.rate = env_int("SOAK_RATE", 250)
        self.seed = env_int("SOAK_SEED", random.SystemRandom().randrange(1 << 32))
        self.rng = random.Random(self.seed)
        self.base = Path(tempfile.mkdtemp(prefix="sw-soak-"))
        self.base.chmod(0o755)
        self.logdir = Path(tempfile.mkdtemp(prefix=f"sw-soak-logs-{self.seed}-"))
        self.home_root = self.base / "home"
        self.store = self.base / "store"
        self.secret_path = self.base / "secret.jsonl"
        self.secret = b"SOAK-SECRET-%016x" % self.rng.getrandbits(64)
        self.stop = threading.Event()  # load and chaos
        self.readers_stop = threading.Event()
        self.users: list[User] = []
        self.attackers: set[str] = set()
        self.abusers: dict[str, tuple[str, int]] = {}  # name -> (abuse, uid)
        self.abuse_scale = dict(ABUSE_SCALE)
        self.abuse_procs: set[subprocess.Popen[bytes]] = set()
        self.abuse_episodes = 0
        self.closer: Path | None = None
        self.peak_rss_mb = 0.0
        self.by_store: dict[tuple[str, str], Session] = {}
        self.map_lock = threading.Lock()
        self.hostile_names: set[str] = set()
        self.counter = 0
        self.counter_lock = threading.Lock()
        self.mounted = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.proc_lock = threading.Lock()
        self.incarnations: list[dict[str, Any]] = []
        self.stopped: list[tuple[float, float]] = []  # SIGSTOP .. SIGCONT (+ catch-up)
        self.notes: list[tuple[float, int, str]] = []
        self.notify_sock: socket.socket | None = None
        self.big_closed = threading.Event()
        self.big_user: User | None = None
        # figures
        self.appends = 0
        self.kills = 0
        self.overflow_episodes = 0
        self.enospc = 0
        self.hostile = 0
        self.churn = 0
        self.torn: list[str] = []
        self.leaked: list[str] = []
        self.lost: list[str] = []
        self.problems: list[str] = []
        self.fig_lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.filler: Path | None = None
        self.t0 = time.time()
        self.last_kill = 0.0
        self.behind = 0
        self.pad = "".join(
            self.rng.choice("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ0123456789.,")
            for _ in range(1 << 16)
        )

    # --- small helpers ------------------------------------------------------------------

    def next_id(self) -> int:
        with self.counter_lock:
            self.counter += 1
            return self.counter

    def problem(self, what: str) -> None:
        with self.fig_lock:
            self.problems.append(what)
        say("PROBLEM: " + what)

    def sessions_dir(self, u: User) -> Path:
        return self.home_root / u.name / "user" / "sessions"

    def chunk(self, s: Session, rng: random.Random, big: bool) -> bytes:
        lines = []
        target = rng.randint(1_500_000, 5_000_000) if big else 0
        n = 1 + int(rng.expovariate(0.7)) if not big else 10**9
        total = 0
        while n > 0 and (not big or total < target):
            s.seq += 1
            width = rng.randint(2000, 40000) if big else rng.randint(40, 1500)
            start = rng.randrange(len(self.pad) - width) if width < len(self.pad) else 0
            text = self.pad[start : start + width]
            line = json.dumps({"type": "assistant", "seq": s.seq, "text": text}).encode() + b"\n"
            lines.append(line)
            total += len(line)
            n -= 1
        return b"".join(lines)

    def call(self, u: User, msg: tuple[Any, ...]) -> bool:
        assert u.conn is not None
        u.conn.send(msg)
        reply = u.conn.recv()
        if reply[0] != "ok":
            self.problem(f"writer of {u.name}: {reply[1]}")
            return False
        return True

    # --- setup --------------------------------------------------------------------------

    def setup(self) -> None:
        self.home_root.mkdir(mode=0o755)
        self.store.mkdir(mode=0o755)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={STORE_SIZE},mode=0755", "soak", self.store],
            check=True,
        )
        self.mounted = True
        fd = os.open(self.secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b'{"secret":"' + self.secret + b'"}\n')
        os.close(fd)
        late = max(2, self.nusers // 10)
        for i in range(self.nusers):
            u = User(i, f"u{i:03d}", UID_BASE + i, late=i >= self.nusers - late)
            u.rng = random.Random(self.seed * 1000 + i)
            self.users.append(u)
        # Fork the writers now, before any thread exists.
        conns: list[mpc.Connection] = []
        for u in self.users:
            parent, child = Pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 0
                try:
                    for c in conns:
                        c.close()
                    parent.close()
                    writer_main(child, u.uid, u.uid)
                except BaseException:
                    code = 1
                os._exit(code)
            child.close()
            u.conn, u.pid = parent, pid
            conns.append(parent)
        for u in self.users:
            if not u.late:
                self.make_home(u)
        # Attacks planted before the service starts.
        for u in self.users:
            if not u.late and u.rng.random() < 0.3:
                self.plant(u, u.rng.choice(HOSTILE_KINDS))
        self.plant_attacker("link-sessions")
        self.plant_attacker("link-user")
        self.closer = abuse.build_closer(self.base)
        for k, kind in enumerate(self.abuse_scale):
            name, uid = f"abuser-{kind}", ABUSE_UID + k
            home = self.home_root / name
            for p in (home, home / "user", home / "user" / "sessions"):
                p.mkdir(mode=0o750 if p == home else 0o700)
                os.chown(p, uid, uid)
            self.abusers[name] = (kind, uid)

    def make_home(self, u: User, *, sessions_later: float = 0.0) -> None:
        home = self.home_root / u.name
        home.mkdir(mode=0o750)
        os.chown(home, u.uid, u.uid)
        if sessions_later:
            time.sleep(sessions_later)
        for p in (home / "user", home / "user" / "sessions"):
            p.mkdir(mode=0o700)
            os.chown(p, u.uid, u.uid)
        u.exists.set()

    # --- hostile entries ----------------------------------------------------------------

    def plant(self, u: User, kind: str) -> None:
        sessions = self.sessions_dir(u)
        name = f"hostile-{self.next_id()}-{kind}.jsonl"
        path = sessions / name
        others = [v for v in self.users if v is not u and v.exists.is_set()]
        other = self.rng.choice(others) if others else u
        try:
            if kind == "secret-link":
                os.symlink(self.secret_path, path)
            elif kind == "other-file-link":
                victims = [s for s in other.sessions if not s.deleted]
                target = self.sessions_dir(other) / (victims[0].name if victims else "x.jsonl")
                os.symlink(target, path)
            elif kind == "other-dir-link":
                os.symlink(self.sessions_dir(other), path)
            elif kind == "fifo":
                os.mkfifo(path, 0o600)
            elif kind == "socket":
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sk:
                    sk.bind(os.fsencode(path))
            elif kind == "secret-hardlink":
                os.link(self.secret_path, path)
            elif kind == "foreign-owned":
                path.write_bytes(b'{"foreign":"' + self.secret + b'"}\n')
                os.chown(path, other.uid if other is not u else 0, 0)
            elif kind == "sparse-huge":
                with open(path, "wb") as f:
                    f.write(b'{"sparse":"' + self.secret + b'"}\n')
                    f.truncate(MAX_FILE_BYTES * 64)
            elif kind == "directory":
                path.mkdir()
            else:
                raise AssertionError(kind)
            if kind not in ("secret-hardlink", "foreign-owned"):
                os.lchown(path, u.uid, u.uid)
        except FileNotFoundError:
            return  # its sessions directory is being recreated right now
        with self.fig_lock:
            self.hostile += 1
            self.hostile_names.add(name)

    def plant_attacker(self, how: str) -> None:
        """A user whose `user/sessions` (or `user`) is a symlink into a victim's home."""
        victims = [v for v in self.users if v.exists.is_set()]
        if not victims:
            return
        victim = self.rng.choice(victims)
        name = f"attacker{self.next_id()}"
        uid = UID_BASE + 5000 + self.next_id()
        home = self.home_root / name
        home.mkdir(mode=0o750)
        os.chown(home, uid, uid)
        if how == "link-sessions":
            (home / "user").mkdir(mode=0o700)
            os.chown(home / "user", uid, uid)
            os.symlink(self.sessions_dir(victim), home / "user" / "sessions")
            os.lchown(home / "user" / "sessions", uid, uid)
        else:
            os.symlink(self.home_root / victim.name / "user", home / "user")
            os.lchown(home / "user", uid, uid)
        with self.fig_lock:
            self.attackers.add(name)
            self.hostile += 1

    def abuser(self, name: str) -> None:
        """Run one abuse in episodes (a few seconds on, a few off) until the load stops."""
        kind, uid = self.abusers[name]
        rng = random.Random(self.seed + uid)
        where = self.home_root / name / "user" / "sessions"
        if self.stop.wait(rng.uniform(0, 5)):
            return
        while not self.stop.is_set():
            seconds = rng.uniform(3, 10)
            proc = abuse.start(
                kind,
                uid,
                where,
                seconds,
                self.abuse_scale[kind],
                self.closer,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            self.abuse_procs.add(proc)
            try:
                _, err = proc.communicate(timeout=seconds + 120)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
                self.problem(f"abuser {name}: its episode did not end")
            self.abuse_procs.discard(proc)
            with self.fig_lock:
                self.abuse_episodes += 1
            if proc.returncode not in (0, -signal.SIGKILL) and not self.stop.is_set():
                self.problem(f"abuser {name} exited {proc.returncode}: {err.decode()[-300:]}")
            if self.stop.wait(rng.uniform(2, 8)):
                return

    def rss_sampler(self) -> None:
        while not self.readers_stop.wait(0.5):
            proc = self.current()
            if proc is None:
                continue
            self.peak_rss_mb = max(self.peak_rss_mb, noisy.rss_mb(proc.pid))

    def planter(self) -> None:
        rng = random.Random(self.seed + 1)
        interval = 0.4
        while not self.stop.wait(rng.uniform(0.5, 1.5) * interval):
            live = [u for u in self.users if u.exists.is_set()]
            if rng.random() < 0.03:
                self.plant_attacker(rng.choice(["link-sessions", "link-user"]))
            elif live:
                u = rng.choice(live)
                with u.lock:  # not while its home is renamed or its directory recreated
                    if rng.random() < 0.1:
                        self.swap(u, rng)
                    else:
                        self.plant(u, rng.choice(HOSTILE_KINDS))

    def swap(self, u: User, rng: random.Random) -> None:
        """A race for the name: a real session file, a symlink to the secret and a hard
        link to it renamed over one name again and again. The store must end with the
        real file's bytes and never see the secret's."""
        d = self.sessions_dir(u)
        k = self.next_id()
        s = Session(u, f"swap-{k}.jsonl", rsync=False)
        s.data += b'{"type":"user","swap":%d}\n' % k
        u.sessions.append(s)
        with self.map_lock:
            self.by_store[(u.name, s.name)] = s
        end = time.monotonic() + rng.uniform(0.3, 1.5)
        planted = 0
        while True:
            reg = d / f".swap-{k}-reg"
            reg.write_bytes(bytes(s.data))
            os.chown(reg, u.uid, u.uid)
            os.chmod(reg, 0o600)
            os.rename(reg, d / s.name)
            if time.monotonic() >= end:
                break
            if rng.random() < 0.5:
                os.symlink(self.secret_path, d / f".swap-{k}-lnk")
                os.lchown(d / f".swap-{k}-lnk", u.uid, u.uid)
                os.rename(d / f".swap-{k}-lnk", d / s.name)
            else:
                os.link(self.secret_path, d / f".swap-{k}-hl")
                os.rename(d / f".swap-{k}-hl", d / s.name)
            planted += 1
            time.sleep(rng.uniform(0, 0.01))
        with self.fig_lock:
            self.hostile += planted

    # --- load ---------------------------------------------------------------------------

    def new_session(self, u: User) -> Session:
        k = self.next_id()
        r = u.rng.random()
        if r < 0.06:
            name = u.rng.choice(
                [
                    f"odd\nnewline-{k}.jsonl",
                    f"-leading-dash-{k}.jsonl",
                    os.fsdecode(b"non-utf8-\xff\xfe-%d.jsonl" % k),
                    f"sp ace 'quote\"-{k}.jsonl",
                    f"\u00e9t\u00e9-{k}.jsonl",
                ]
            )
        else:
            name = f"{u.rng.getrandbits(64):016x}-{k}.jsonl"
        s = Session(u, name, rsync=u.rng.random() < 0.1)
        u.sessions.append(s)
        u.active.append(s)
        with self.map_lock:
            self.by_store[(u.name, name)] = s
        return s

    def append(self, u: User, s: Session, rng: random.Random) -> None:
        """Caller holds u.lock."""
        big = not s.rsync and rng.random() < 0.0015
        data = self.chunk(s, rng, big)
        path = os.fsencode(self.sessions_dir(u) / s.name)
        with s.lock:
            s.data += data
            whole = bytes(s.data) if s.rsync else b""
        if s.rsync:
            tmp = os.fsencode(self.sessions_dir(u) / f".{s.name}.{rng.getrandbits(32):08x}")
            ok = self.call(u, ("replace", path, tmp, whole))
        else:
            ok = self.call(u, ("append", path, data))
        if ok:
            with self.fig_lock:
                self.appends += 1
            if len(s.data) > 4 << 20:
                self.big_user = u
                self.big_closed.set()
        if len(s.data) > (RSYNC_CAP if s.rsync else SESSION_CAP) and s in u.active:
            u.active.remove(s)  # goes idle

    def drive(self, u: User) -> None:
        rng = u.rng
        while not u.exists.is_set():
            if self.stop.wait(0.2):
                return
        # chunk probability per active session per 100 ms tick, for ~`rate` chunks/s
        p = min(1.0, self.rate / (self.nusers * 2 * 10))
        next_tick = time.monotonic()
        while not self.stop.is_set():
            with u.lock:
                if len(u.active) < 2 and rng.random() < 0.1:
                    self.new_session(u)
                for s in list(u.active):
                    if rng.random() < 1 / 300:
                        u.active.remove(s)  # the session goes idle
                    elif rng.random() < p:
                        self.append(u, s, rng)
            next_tick += 0.1
            delay = next_tick - time.monotonic()
            if delay < 0:
                next_tick = time.monotonic()
            elif self.stop.wait(delay):
                return

    # --- the service and its supervisor ---------------------------------------------------

    def service_argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "session_watcher",
            "run",
            "--home-root",
            str(self.home_root),
            "--target",
            str(self.store),
            "--min-uid",
            str(UID_BASE),
            "--max-uid",
            str(UID_BASE + 9999),
            "--group",
            "users",
            "--settle",
            str(SETTLE),
            "--workers",
            "4",
            "--max-file-bytes",
            str(MAX_FILE_BYTES),
            "--max-user-bytes",
            str(USER_BYTES),
            "--max-user-files",
            str(USER_FILES),
            "--log-level",
            "INFO",
            "--log-format",
            "json",
            "--state-file",
            str(self.base / "state.json"),
        ]

    def supervise(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_WATCHER_")}
        env["NOTIFY_SOCKET"] = str(self.base / "notify.sock")
        env["WATCHDOG_USEC"] = str(WATCHDOG_USEC)
        n = 0
        while True:
            n += 1
            log = open(self.logdir / f"service-{n:03d}.log", "wb")  # noqa: SIM115
            with self.proc_lock:
                if self.readers_stop.is_set():
                    log.close()
                    return
                proc = subprocess.Popen(
                    self.service_argv(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=env,
                    cwd=REPO,
                )
                inc: dict[str, Any] = {"pid": proc.pid, "start": time.time(), "log": log.name}
                inc["killed"] = False
                self.incarnations.append(inc)
                self.proc = proc
            code = proc.wait()
            log.close()
            with self.proc_lock:
                inc["end"] = time.time()
                inc["code"] = code
                self.proc = None
                if not inc["killed"] and code != 0:
                    self.problem(f"service pid {proc.pid} exited by itself with {code}")
                if inc.get("final"):
                    return
            time.sleep(RESTART_SEC)

    def current(self) -> subprocess.Popen[bytes] | None:
        with self.proc_lock:
            return self.proc

    def signal_service(self, sig: int) -> int | None:
        with self.proc_lock:
            proc = self.proc
            if proc is None or proc.poll() is not None:
                return None
            if sig == signal.SIGKILL:
                self.incarnations[-1]["killed"] = True
            proc.send_signal(sig)
            return proc.pid

    # --- notify socket --------------------------------------------------------------------

    def notify_loop(self) -> None:
        sock = self.notify_sock
        assert sock is not None
        creds = struct.calcsize("3i")
        while True:
            try:
                data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(creds))
            except OSError:
                return
            if not data and not anc:
                return
            now = time.time()
            pid = 0
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:creds])[0]
            for line in data.decode(errors="replace").splitlines():
                if line in ("READY=1", "WATCHDOG=1", "STOPPING=1"):
                    self.notes.append((now, pid, line))

    # --- chaos ------------------------------------------------------------------------------

    def chaos(self) -> None:
        rng = random.Random(self.seed + 2)
        must = ["kill", "kill-mid-copy", "overflow", "enospc", "new-home", "recreate", "rename"]
        must.append("kill-then-rename")
        rng.shuffle(must)
        weights = {
            "kill": 4,
            "kill-mid-copy": 3,
            "overflow": 2,
            "enospc": 2,
            "new-home": 1,
            "recreate": 1,
            "rename": 1,
            "kill-then-rename": 1,
        }
        gap = (2.0, 6.0) if self.seconds >= 90 else (1.0, 3.0)
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

    def do_kill(self, rng: random.Random) -> None:
        if self.signal_service(signal.SIGKILL) is not None:
            self.kills += 1
            self.last_kill = time.time()

    def do_kill_mid_copy(self, rng: random.Random) -> None:
        self.big_closed.clear()
        self.big_closed.wait(3.0)  # a multi-MB file just closed: its copy is starting
        time.sleep(rng.uniform(0, 0.01))
        self.do_kill(rng)

    def do_overflow(self, rng: random.Random) -> None:
        live = [u for u in self.users if u.exists.is_set()]
        if not live:
            return
        # Users sharing one inotify instance: each has its own kernel queue, so a burst
        # spread over all of them would fill none.
        queue = reader_index(rng.choice(live).name)
        live = [u for u in live if reader_index(u.name) == queue]
        seen = self.count_log("inotify queue overflowed")
        pid = self.signal_service(signal.SIGSTOP)
        if pid is None:
            return
        t0 = time.time()
        try:
            chosen = rng.sample(live, min(5, len(live)))
            per_user = 21_000 // len(chosen) + 1000
            for u in chosen:
                u.lock.acquire()
            try:
                for u in chosen:
                    group = [self.new_session(u) for _ in range(10)]
                    for s in group:
                        u.active.remove(s)  # only the burst writes them
                    for i in range(per_user):
                        s = group[i % len(group)]
                        s.data += burst_line(i)
                    paths = [os.fsencode(self.sessions_dir(u) / s.name) for s in group]
                    assert u.conn is not None
                    u.conn.send(("burst", paths, per_user))
                for u in chosen:
                    assert u.conn is not None
                    reply = u.conn.recv()
                    if reply[0] != "ok":
                        self.problem(f"burst writer of {u.name}: {reply[1]}")
                    else:
                        with self.fig_lock:
                            self.appends += per_user
            finally:
                for u in chosen:
                    u.lock.release()
            time.sleep(rng.uniform(0.5, 2.0))
        finally:
            self.signal_service(signal.SIGCONT)
            # A stopped process also misses pings for a moment after SIGCONT.
            self.stopped.append((t0, time.time() + WATCHDOG_USEC / 1e6 / 2))
            self.overflow_episodes += 1
        # Let the service read its queue before the next chaos step: a kill -9 in the
        # instant after SIGCONT would end it before it saw the overflow (its successor's
        # first pass repairs all the same, but then no incarnation ever logs one).
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and self.count_log("inotify queue overflowed") <= seen:
            time.sleep(0.05)

    def do_enospc(self, rng: random.Random) -> None:
        filler = self.store / f".soak-filler-{self.next_id()}"
        self.filler = filler
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            st = os.statvfs(self.store)
            free = st.f_bavail * st.f_frsize
            with contextlib.suppress(OSError):
                os.posix_fallocate(fd, 0, max(1, free - (64 << 10)))
            block = b"\0" * (64 << 10)
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, block)
        finally:
            os.close(fd)
        self.enospc += 1
        try:
            self.stop.wait(rng.uniform(1.5, 4.0))
        finally:
            filler.unlink()
            self.filler = None

    def do_new_home(self, rng: random.Random) -> None:
        pending = [u for u in self.users if u.late and not u.exists.is_set()]
        if not pending:
            self.do_rename(rng)
            return
        u = rng.choice(pending)
        with u.lock:
            self.make_home(u, sessions_later=rng.choice([0.0, rng.uniform(0.2, 2.0)]))
        self.churn += 1

    def do_recreate(self, rng: random.Random) -> None:
        live = [u for u in self.users if u.exists.is_set()]
        if not live:
            return
        u = rng.choice(live)
        with u.lock:
            d = self.sessions_dir(u)
            for s in u.sessions:
                s.deleted = True
            u.active.clear()
            shutil.rmtree(d)
            time.sleep(rng.uniform(0.05, 1.0))
            d.mkdir(mode=0o700)
            os.chown(d, u.uid, u.uid)
        self.churn += 1

    def do_kill_then_rename(self, rng: random.Random) -> None:
        """The service dies copying a user's big file, whose home is renamed before it is
        back (its store directory under the old name keeps what the crash left there)."""
        self.do_kill_mid_copy(rng)
        self.do_rename(rng, self.big_user)

    def do_rename(self, rng: random.Random, who: User | None = None) -> None:
        live = [u for u in self.users if u.exists.is_set()]
        if not live:
            return
        u = who if who is not None and who.exists.is_set() else rng.choice(live)
        with u.lock:
            new = f"u{u.index:03d}r{self.next_id()}"
            os.rename(self.home_root / u.name, self.home_root / new)
            u.name = new
            with self.map_lock:
                for s in u.sessions:
                    if not s.deleted:
                        self.by_store[(new, s.name)] = s
        self.churn += 1

    # --- readers and checks ---------------------------------------------------------------

    def check_file(self, user: str, name: str, data: bytes, where: str) -> None:
        label = f"{user}/{name!r}"
        if self.secret in data:
            with self.fig_lock:
                self.leaked.append(f"{where}: secret bytes in {label}")
        if user in self.abusers:
            return  # an abuse's file: abuse_problems checks their share
        with self.map_lock:
            s = self.by_store.get((user, name))
        if s is None:
            with self.fig_lock:
                kind = "refused entry" if name in self.hostile_names else "unknown file"
                self.leaked.append(f"{where}: {kind} {label} in the store")
            return
        with s.lock:
            ok = s.data.startswith(data)
            have = len(s.data)
        if not ok or (data and not data.endswith(b"\n")):
            with self.fig_lock:
                self.torn.append(
                    f"{where}: {label} ({len(data)} bytes) is not a line-complete prefix "
                    f"of what was written ({have} bytes)"
                )

    def store_files(self) -> Iterator[tuple[str, str, str]]:
        """(user dir, name, path) of every non-temp entry in the store."""
        with os.scandir(self.store) as top:
            dirs = [(e.name, e.path) for e in top if e.is_dir(follow_symlinks=False)]
        for user, path in dirs:
            if user in self.abusers:
                continue  # their files are the abuse's, checked by abuse_problems
            try:
                with os.scandir(path) as it:
                    entries = [(e.name, e.path) for e in it]
            except FileNotFoundError:
                continue
            for name, p in entries:
                if not name.startswith(TEMP_PREFIX):
                    yield user, name, p

    def read(self, path: str) -> tuple[bytes, tuple[int, int, int]] | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                return b"<symlink in the store>", (0, 0, 0)
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return b"<not a regular file>", (0, 0, 0)
            chunks = []
            while True:
                b = os.read(fd, 1 << 20)
                if not b:
                    break
                chunks.append(b)
            return b"".join(chunks), (st.st_ino, st.st_ctime_ns, st.st_size)
        finally:
            os.close(fd)

    def reader(self, reverse: bool) -> None:
        seen: dict[str, tuple[int, int, int]] = {}
        while not self.readers_stop.is_set():
            try:
                files = list(self.store_files())
            except OSError as e:
                self.problem(f"reader: {e}")
                return
            if reverse:
                files.reverse()
            for user, name, path in files:
                try:
                    st = os.stat(path, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                ident = (st.st_ino, st.st_ctime_ns, st.st_size)
                if seen.get(path) == ident:
                    continue  # this very inode, unchanged, was checked already
                got = self.read(path)
                if got is None:
                    continue
                data, ident = got
                seen[path] = ident
                self.check_file(user, name, data, "reader")
            self.readers_stop.wait(0.02)

    def watchdog_gaps(self) -> list[str]:
        out: list[str] = []
        limit = WATCHDOG_USEC / 1e6
        for inc in self.incarnations:
            pid = inc["pid"]
            notes = [(t, m) for t, p, m in self.notes if p == pid]
            ready = [t for t, m in notes if m == "READY=1"]
            end = inc.get("end", time.time())
            if not ready:
                if end - inc["start"] > 90:
                    out.append(f"pid {pid}: no READY=1 within {end - inc['start']:.0f} s")
                continue
            pings = [ready[0]] + [t for t, m in notes if m == "WATCHDOG=1"] + [end]
            for a, b in itertools.pairwise(pings):
                if b - a <= limit:
                    continue
                if any(s <= b and a <= e for s, e in self.stopped):
                    continue  # stopped with SIGSTOP: systemd would not see it either
                out.append(f"pid {pid}: no WATCHDOG=1 for {b - a:.1f} s at +{a - self.t0:.0f} s")
            if inc.get("final") and not any(m == "STOPPING=1" for _, m in notes):
                out.append(f"pid {pid}: no STOPPING=1 on SIGTERM")
        return out

    def count_log(self, needle: str) -> int:
        n = 0
        for inc in self.incarnations:
            with open(inc["log"], "rb") as f:
                n += f.read().count(needle.encode())
        return n

    def wait_pass_done(self, log: str, before: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(log, "rb") as f:
                if f.read().count(b"pass done") > before:
                    return True
            time.sleep(0.2)
        return False

    def final_mismatches(self) -> list[str]:
        out = []
        for u in self.users:
            for s in u.sessions:
                if s.deleted:
                    continue
                src = self.sessions_dir(u) / s.name
                try:
                    on_disk = src.read_bytes()
                except FileNotFoundError:
                    if not s.data:
                        continue  # went idle before its first chunk: never created
                    out.append(f"source {src!r} missing")
                    continue
                except OSError as e:
                    out.append(f"source {src!r} unreadable: {e}")
                    continue
                if on_disk != s.data:
                    self.problem(f"harness: source {src!r} differs from what was written")
                dst = self.store / u.name / s.name
                try:
                    stored = dst.read_bytes()
                except FileNotFoundError:
                    out.append(f"{u.name}/{s.name!r} ({len(s.data)} bytes) missing in the store")
                    continue
                if stored != s.data:
                    out.append(
                        f"{u.name}/{s.name!r}: store has {len(stored)} bytes, source {len(s.data)}"
                    )
        return out

    # --- the run ------------------------------------------------------------------------------

    def run(self) -> int:
        say(
            f"seed {self.seed} (replay: SOAK_SEED={self.seed}), {self.seconds} s, "
            f"{self.nusers} users, base {self.base}, logs {self.logdir}"
        )
        self.setup()
        self.notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.notify_sock.bind(str(self.base / "notify.sock"))
        self.t0 = time.time()
        start: list[tuple[Callable[..., None], tuple[Any, ...]]] = [
            (self.notify_loop, ()),
            (self.supervise, ()),
            (self.reader, (False,)),
            (self.reader, (True,)),
            (self.planter, ()),
            (self.chaos, ()),
        ]
        start += [(self.drive, (u,)) for u in self.users]
        start += [(self.abuser, (name,)) for name in self.abusers]
        start.append((self.rss_sampler, ()))
        for fn, args in start:
            t = threading.Thread(target=fn, args=args, daemon=True, name=fn.__name__)
            t.start()
            self.threads.append(t)
        end = time.monotonic() + self.seconds
        while time.monotonic() < end:
            time.sleep(min(10.0, max(0.0, end - time.monotonic())))
            with self.fig_lock:
                say(
                    f"+{time.time() - self.t0:.0f} s: {self.appends} appends, {self.kills} kills, "
                    f"{self.overflow_episodes} stops, {self.enospc} ENOSPC, "
                    f"{self.hostile} hostile, {len(self.torn)} torn, {len(self.leaked)} leaked"
                )
        say("load and chaos stop; letting the service settle")
        self.stop.set()
        for t in self.threads:
            if t.name in ("drive", "chaos", "planter", "abuser"):
                t.join(60)
        if self.current() is None:  # restarting after a kill
            time.sleep(RESTART_SEC + 1)
        time.sleep(SETTLE + 2)
        # A temp file of a copy killed mid-way goes with the restart's pass if it holds data;
        # an empty one (killed between its create and its flock, or the copy of an empty
        # file) once ORPHAN_TEMP_SECONDS old: a pass cannot tell it from a live copy's.
        time.sleep(max(0.0, self.last_kill + ORPHAN_TEMP_SECONDS + 1 - time.time()))
        # Every transcript must land without the final pass's help: a failed copy is
        # retried, an overflow repaired, a held-back tail copied after --settle.
        deadline = time.monotonic() + 20
        while (behind := self.final_mismatches()) and time.monotonic() < deadline:
            time.sleep(1)
        self.behind = len(behind)
        for item in behind[:10]:
            self.problem(f"still behind 20 s after the load stopped: {item}")
        proc = self.current()
        if proc is None:
            self.problem("the service is not running at the end")
        else:
            log = self.incarnations[-1]["log"]
            with open(log, "rb") as f:
                before = f.read().count(b"pass done")
            self.signal_service(signal.SIGHUP)
            if not self.wait_pass_done(log, before, 180):
                self.problem("the final pass did not finish within 180 s")
        # The pass's held-back tails and the queue drain within a few seconds.
        deadline = time.monotonic() + 30
        while self.final_mismatches() and time.monotonic() < deadline:
            time.sleep(1)
        self.lost = self.final_mismatches()
        self.readers_stop.set()
        with self.proc_lock:
            if self.incarnations:
                self.incarnations[-1]["final"] = True
        if self.signal_service(signal.SIGTERM) is not None:
            assert proc is not None
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                self.problem("the service did not stop within 30 s of SIGTERM")
                proc.kill()
            else:
                if code != 0:
                    self.problem(f"SIGTERM: the service exited with {code}, not 0")
        for t in self.threads:
            if t.name in ("reader", "supervise", "rss_sampler"):
                t.join(30)
        return self.verdict()

    def verdict(self) -> int:
        # One last sweep of the whole store, as the readers do.
        for user, name, path in self.store_files():
            got = self.read(path)
            if got is not None:
                self.check_file(user, name, got[0], "final")
        temps = [
            f"{d}/{n}"
            for d in os.listdir(self.store)
            if os.path.isdir(self.store / d)
            for n in os.listdir(self.store / d)
            if n.startswith(TEMP_PREFIX)
        ]
        for d in os.listdir(self.store):
            if d in self.attackers:
                self.leaked.append(f"store directory for attacker {d}")
        for t in temps:
            self.problem(f"temp file left in the store: {t}")
        for gap in self.watchdog_gaps():
            self.problem("watchdog: " + gap)
        detected = self.count_log("inotify queue overflowed")
        if self.overflow_episodes and not detected:
            self.problem("no overflow was ever detected by the service")
        for item in self.abuse_problems(self.store_usage()):
            self.problem(item)
        for what, items in (("LOST", self.lost), ("TORN", self.torn), ("LEAKED", self.leaked)):
            for item in items[:20]:
                say(f"{what}: {item}")
            if len(items) > 20:
                say(f"{what}: ... and {len(items) - 20} more")
        ok = not (self.lost or self.torn or self.leaked or self.problems)
        say(
            f"{len(self.incarnations)} service starts, {detected} overflows detected, "
            f"{self.count_log('No space left')} ENOSPC copy failures logged, "
            f"{self.churn} churn events, {self.behind} files behind before the final pass, "
            f"{len(self.abusers)} abusers in {self.abuse_episodes} episodes, "
            f"peak RSS {self.peak_rss_mb:.0f} MB, "
            f"{len(self.problems)} other problems"
        )
        print(
            f"soak: {self.seconds} s, {self.nusers} users, {self.appends:,} appends, "
            f"{self.kills} kill -9, {detected} overflows, {self.enospc} ENOSPC episodes, "
            f"{self.hostile} hostile entries, {len(self.lost)} lost, {len(self.torn)} torn, "
            f"{len(self.leaked)} leaked, {len(self.abusers)} abusers "
            f"({self.abuse_episodes} episodes, peak RSS {self.peak_rss_mb:.0f} MB)",
            flush=True,
        )
        if not ok:
            say(f"FAILED (seed {self.seed}); service logs kept in {self.logdir}")
        return 0 if ok else 1

    def store_usage(self) -> dict[str, list[tuple[str, int]]]:
        """(name, size) of each file each abuser holds in the store."""
        out: dict[str, list[tuple[str, int]]] = {}
        for name in self.abusers:
            d = self.store / name
            for entry in os.scandir(d) if d.is_dir() else ():
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and not entry.name.startswith(TEMP_PREFIX):
                    out.setdefault(name, []).append((entry.name, st.st_size))
        return out

    def abuse_problems(self, usage: dict[str, list[tuple[str, int]]]) -> list[str]:
        """Issue 14's invariants: the abusers' shares of the store within the per-user
        limits, no hard link copied, and the log lines each abuser caused limited."""
        out: list[str] = []
        for name, held in usage.items():
            if self.abusers[name][0] == "hardlink" and held:
                out.append(f"{name}: a hard-linked file reached the store: {held[0][0]!r}")
            nbytes = sum(size for _, size in held)
            if nbytes > USER_BYTES or len(held) > USER_FILES:
                out.append(f"{name}: holds {nbytes:,} bytes in {len(held):,} files, over limits")
        for inc in self.incarnations:
            minutes = max(1, -(-int(inc.get("end", time.time()) - inc["start"]) // 60))
            counts: dict[str, int] = {}
            with open(inc["log"], "rb") as f:
                for raw in f:
                    try:
                        doc = json.loads(raw)
                    except ValueError:
                        continue
                    if doc.get("user") in self.abusers and doc.get("level") in (
                        "WARNING",
                        "ERROR",
                    ):
                        counts[doc["user"]] = counts.get(doc["user"], 0) + 1
            for user, n in counts.items():
                if n > LINES_PER_MINUTE * minutes:
                    out.append(
                        f"pid {inc['pid']}: {n} WARNING/ERROR lines for {user} in {minutes} min"
                    )
        if self.peak_rss_mb > 300:
            out.append(f"the service's RSS reached {self.peak_rss_mb:.0f} MB")
        return out

    def cleanup(self, ok: bool) -> None:
        self.stop.set()
        self.readers_stop.set()
        for p in list(self.abuse_procs):
            with contextlib.suppress(OSError):
                p.kill()
        with self.proc_lock:
            if self.incarnations:
                self.incarnations[-1]["final"] = True
                self.incarnations[-1]["killed"] = True
            proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait()
        for u in self.users:
            if u.conn is not None:
                with contextlib.suppress(OSError):
                    u.conn.send(None)
                u.conn.close()
        for u in self.users:
            if u.pid:
                try:
                    os.waitpid(u.pid, 0)
                except ChildProcessError:
                    pass
        if self.notify_sock is not None:
            self.notify_sock.close()
        umount = ["umount", str(self.store)]
        if self.mounted and subprocess.run(umount, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(self.store)], check=False)
        shutil.rmtree(self.base, ignore_errors=True)
        if ok:
            shutil.rmtree(self.logdir, ignore_errors=True)


HOSTILE_KINDS = [
    "secret-link",
    "other-file-link",
    "other-dir-link",
    "fifo",
    "socket",
    "secret-hardlink",
    "foreign-owned",
    "sparse-huge",
    "directory",
]


def main() -> int:
    target = os.environ.get("SOAK_TARGET", "dir").strip() or "dir"
    if target == "s3":  # the store on a real Ceph RGW (soak_s3.py)
        import soak_s3

        return soak_s3.main()
    if target != "dir":
        print(f"soak: SOAK_TARGET={target!r}: use dir (the default) or s3", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("soak: needs root (writers run as other uids, the store is a tmpfs)", file=sys.stderr)
        return 2
    soak = Soak()

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


if __name__ == "__main__":
    sys.exit(main())
