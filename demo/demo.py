"""`make demo`: the whole product in a sandbox, in well under a minute, without root.

Builds a temporary home root with two users (owned by whoever runs this), starts
`session-watcher run` on it with a private NOTIFY_SOCKET (so we know when it is READY, as
systemd would), then plays a Claude Code session (a few JSON lines appended every 100 ms:
open with O_APPEND, write, close) and one rsync-style temp file + rename, printing each
copy as it lands with the latency the service measured. Then SIGTERM, a check that every
source equals its copy, and the sandbox is removed.

Then the same for Claude Code's own layout (`--layout claude-code`): transcripts under
`~/.claude/projects/<project>/<session>.jsonl` and `<session>/subagents/agent-*.jsonl`,
a new project and a new subagent directory appearing while it runs, a planted symlink
refused, and the store mirroring the tree.

Only the standard library; the service runs as `python -m session_watcher`.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SESSION_SECONDS = 3.0
FLUSH_EVERY = 0.1
READY_TIMEOUT = 30.0
LAND_TIMEOUT = 15.0

COPIED = re.compile(r"copied '([^']*)' \((\d+) bytes(?:, ([\d.]+) ms after the event)?\)")


def say(text: str = "") -> None:
    print(text, flush=True)


class LogTail:
    """Reads the service's log file as it grows; prints copies, warnings and errors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0
        self.partial = b""
        self.lines: list[str] = []

    def poll(self) -> None:
        with self.path.open("rb") as f:
            f.seek(self.pos)
            data = f.read()
        self.pos += len(data)
        data = self.partial + data
        *complete, self.partial = data.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "backslashreplace")
            self.lines.append(line)
            m = COPIED.search(line)
            if m:
                name, size, ms = m.group(1), int(m.group(2)), m.group(3)
                when = f"{float(ms):7.1f} ms after the event" if ms else "  (a pass or a walk)"
                say(f"    landed {name:<34} {size:>7,} bytes {when}")
            elif " WARNING " in line or " ERROR " in line:
                say(f"    service: {line.split(': ', 1)[-1]}")


def wait_ready(sock: socket.socket, proc: subprocess.Popen[bytes], tail: LogTail) -> float:
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT:
        if proc.poll() is not None:
            tail.poll()
            raise SystemExit(
                f"the service exited with {proc.returncode}:\n" + "\n".join(tail.lines)
            )
        sock.settimeout(0.2)
        try:
            msg = sock.recv(4096).decode()
        except TimeoutError:
            continue
        if "READY=1" in msg.splitlines():
            return time.monotonic() - started
    raise SystemExit("the service did not say READY=1 in time")


def session_writer(path: Path, stop_at: float, done: threading.Event) -> None:
    """Claude Code's pattern: every 100 ms, append what is queued and close the file."""
    turn = 0
    try:
        while time.monotonic() < stop_at:
            lines = [
                json.dumps(
                    {
                        "type": "assistant" if (turn + k) % 2 else "user",
                        "turn": turn + k,
                        "message": f"line {turn + k} of a simulated session " + "." * 60,
                    }
                )
                + "\n"
                for k in range(1 + turn % 3)
            ]
            turn += len(lines)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, "".join(lines).encode())
            finally:
                os.close(fd)
            time.sleep(FLUSH_EVERY)  # the writer's own pace
    finally:
        done.set()


def main() -> int:
    uid, gid = os.getuid(), os.getgid()
    group = grp.getgrgid(gid).gr_name
    try:
        who = pwd.getpwuid(uid).pw_name
    except KeyError:
        who = str(uid)
    base = Path(tempfile.mkdtemp(prefix="session-watcher-demo-"))
    proc: subprocess.Popen[bytes] | None = None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        home_root, store = base / "home", base / "store"
        users = {}
        for user in ("alice", "bob"):
            sessions = home_root / user / "user" / "sessions"
            sessions.mkdir(parents=True)
            users[user] = sessions
        # Something already there before the service starts: the initial pass takes it.
        (users["bob"] / "yesterday.jsonl").write_text('{"type":"user","turn":0}\n')

        notify = base / "notify.sock"
        sock.bind(str(notify))
        log_path = base / "service.log"
        argv = [
            sys.executable,
            "-m",
            "session_watcher",
            "run",
            "--home-root",
            str(home_root),
            "--target",
            str(store),
            "--min-uid",
            "0",
            "--max-uid",
            str(2**31),
            "--group",
            group,
            "--settle",
            "1",
            "--reconcile-interval",
            "0",
            "--state-file",
            str(base / "state.json"),
            # Every copy's line (at INFO a user gets one a minute, the rest at DEBUG).
            "--log-level",
            "DEBUG",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_WATCHER_")}
        env["NOTIFY_SOCKET"] = str(notify)
        say(f"session-watcher demo, as {who} (uid {uid}), group {group}")
        say(f"  sandbox   {base}")
        say(f"  homes     {home_root}/{{alice,bob}}/user/sessions")
        say(f"  store     {store}")
        say("  $ session-watcher run --home-root ... --target ... --min-uid 0 --settle 1")
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env
            )
        tail = LogTail(log_path)
        took = wait_ready(sock, proc, tail)
        say(f"READY=1 after {took:.2f} s (initial pass done, watches set)")
        tail.poll()

        session = users["alice"] / "0195f3c2-demo-session.jsonl"
        say(
            f"\nalice: a session appends lines every {FLUSH_EVERY * 1000:.0f} ms for "
            f"{SESSION_SECONDS:.0f} s (O_APPEND, write, close)"
        )
        done = threading.Event()
        writer = threading.Thread(
            target=session_writer,
            args=(session, time.monotonic() + SESSION_SECONDS, done),
            daemon=True,
        )
        writer.start()
        while not done.wait(0.05):
            tail.poll()
        writer.join()

        say("\nbob: an rsync-style import (temp file, then rename into place)")
        tmp = users["bob"] / ".imported.jsonl.Xa9Qz2"
        tmp.write_text("".join(json.dumps({"imported": i}) + "\n" for i in range(500)))
        os.rename(tmp, users["bob"] / "imported.jsonl")

        expected = {
            f"{u}/{p.name}": p
            for u, d in users.items()
            for p in d.iterdir()
            if p.suffix == ".jsonl"
        }
        deadline = time.monotonic() + LAND_TIMEOUT
        while True:
            tail.poll()
            pending = [k for k, p in expected.items() if _read(store / k) != p.read_bytes()]
            if not pending:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"not in the store after {LAND_TIMEOUT:.0f} s: {pending}")
            time.sleep(0.05)  # polling the store for the final content, with a deadline
        say(f"\nevery source equals its copy in the store ({len(expected)} files)")

        copies = [m for m in map(COPIED.search, tail.lines) if m and m.group(3)]
        if copies:
            ms = sorted(float(m.group(3)) for m in copies)
            say(
                f"  {len(copies)} live copies, latency after the close or rename: "
                f"median {ms[len(ms) // 2]:.1f} ms, max {ms[-1]:.1f} ms"
            )
        st = (store / "alice").stat()
        fst = (store / "alice" / session.name).stat()
        say(f"  store dir mode {st.st_mode & 0o7777:04o}, file mode {fst.st_mode & 0o7777:04o}")

        say("\nSIGTERM (what `systemctl stop` sends)")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
        tail.poll()
        sock.settimeout(2.0)
        stopping = False
        try:
            while not stopping:
                stopping = "STOPPING=1" in sock.recv(4096).decode().splitlines()
        except TimeoutError:
            pass
        leftovers = list(store.rglob(".session-watcher.*.tmp"))
        say(
            f"  exit {rc}, STOPPING=1 {'received' if stopping else 'missing'}, "
            f"{len(leftovers)} temp files left"
        )
        if rc != 0 or not stopping or leftovers:
            return 1
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
        shutil.rmtree(base, ignore_errors=True)
    rc = claude_layout(group)
    if rc == 0:
        say("demo done")
    return rc


def start_service(
    base: Path, group: str, *extra: str
) -> tuple[subprocess.Popen[bytes], socket.socket, LogTail]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify = base / "notify.sock"
    sock.bind(str(notify))
    log_path = base / "service.log"
    argv = [
        sys.executable,
        "-m",
        "session_watcher",
        "run",
        "--home-root",
        str(base / "home"),
        "--target",
        str(base / "store"),
        "--min-uid",
        "0",
        "--max-uid",
        str(2**31),
        "--group",
        group,
        "--settle",
        "1",
        "--reconcile-interval",
        "0",
        "--state-file",
        str(base / "state.json"),
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_WATCHER_")}
    env["NOTIFY_SOCKET"] = str(notify)
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env
        )
    return proc, sock, LogTail(log_path)


def claude_layout(group: str) -> int:
    """The second part: Claude Code's own layout, nested, with --layout claude-code."""
    base = Path(tempfile.mkdtemp(prefix="session-watcher-demo-claude-"))
    proc: subprocess.Popen[bytes] | None = None
    sock: socket.socket | None = None
    try:
        projects = base / "home" / "carol" / ".claude" / "projects"
        old = projects / "-home-carol-repo"
        (old / "0195f3c2-old" / "subagents").mkdir(parents=True)
        (old / "0195f3c2-old.jsonl").write_text('{"type":"user","turn":0}\n')
        (old / "0195f3c2-old" / "subagents" / "agent-a1.jsonl").write_text('{"agent":1}\n')
        say("\n--- Claude Code's own layout ---")
        say(f"  sandbox   {base}")
        say(f"  sources   {base}/home/carol/.claude/projects/<project>/<session>.jsonl")
        say("            .../<project>/<session>/subagents/agent-<id>.jsonl")
        say(f"  store     {base}/store/carol/<project>/<session>.jsonl (the same relative path)")
        say("  $ session-watcher run --layout claude-code ...")
        say("    (= --sessions-subdir .claude/projects --depth 4)")
        proc, sock, tail = start_service(base, group, "--layout", "claude-code")
        took = wait_ready(sock, proc, tail)
        say(f"READY=1 after {took:.2f} s")
        tail.poll()

        say("\ncarol starts Claude Code in a new repository: a new project directory")
        new = projects / "-home-carol-new"
        new.mkdir()
        session = new / "0195f3d9-new.jsonl"
        done = threading.Event()
        session_writer(session, time.monotonic() + 1.0, done)
        say("carol's session runs a subagent: <session>/subagents/agent-b2.jsonl")
        (new / "0195f3d9-new" / "subagents").mkdir(parents=True)
        session_writer(
            new / "0195f3d9-new" / "subagents" / "agent-b2.jsonl", time.monotonic() + 0.5, done
        )
        say("a symlink planted as a project directory (never followed; a pass refuses it)")
        (projects / "-etc").symlink_to("/etc")
        expected = {
            f"carol/{p.relative_to(projects)}": p
            for p in projects.rglob("*.jsonl")
            if not p.is_symlink() and "-etc" not in p.parts
        }
        deadline = time.monotonic() + LAND_TIMEOUT
        while True:
            tail.poll()
            store = base / "store"
            pending = [k for k, p in expected.items() if _read(store / k) != p.read_bytes()]
            if not pending:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"not in the store after {LAND_TIMEOUT:.0f} s: {pending}")
            time.sleep(0.05)  # polling the store for the final content, with a deadline
        proc.send_signal(signal.SIGHUP)  # a full pass: it meets the symlink
        deadline = time.monotonic() + LAND_TIMEOUT
        while not any("-etc" in line and "symlink" in line for line in tail.lines):
            if time.monotonic() > deadline:
                raise SystemExit("the planted symlink was not refused")
            tail.poll()
            time.sleep(0.05)
        say(f"\nevery source equals its copy in the store ({len(expected)} files):")
        for p in sorted(store.rglob("*")):
            kind = "/" if p.is_dir() else ""
            say(f"    {p.relative_to(store)}{kind}  {p.stat().st_mode & 0o7777:04o}")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
        tail.poll()
        say(f"  exit {rc}")
        return 0 if rc == 0 else 1
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if sock is not None:
            sock.close()
        shutil.rmtree(base, ignore_errors=True)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
