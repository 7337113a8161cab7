"""The shipped unit under a real systemd, as a new operator meets it (issue 9).

This machine's own OS is booted in a throwaway `systemd-nspawn` container: a tmpfs root,
the host's /usr read-only, /etc through an overlay whose upper layer is a temp directory,
so nothing of the host changes. No /data and no store: a fresh machine. In it, the README's
own commands: `make install` from a copy of this checkout, `systemctl enable --now
session-watcher`, then a user's write, a planted symlink, `systemctl reload`, `systemctl
stop`, the live `systemd-analyze security` score, `session-watcher status`, the README's
drop-in for another store, a bad setting, a failure that keeps coming back, and
`make uninstall`. The checks read structured output: unit properties (`systemctl show`),
JSON log lines (`SESSION_WATCHER_LOG_FORMAT=json`), the state file, `status --json`.

The container shares the host's network, but pip in it does not need any: the host builds
the wheels (`pip wheel`, with the host's pip configuration) and `make install` in the
container installs from them only (PIP_NO_INDEX, PIP_FIND_LINKS).

The tests share one container and run in file order; `make uninstall` comes last. Needs
root and systemd-nspawn (`apt-get install systemd-container`; `.ci/run` installs it).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import IS_ROOT, wait_for

from session_watcher.store import TEMP_PREFIX, TEMP_SUFFIX

REPO = Path(__file__).resolve().parent.parent
NSPAWN = shutil.which("systemd-nspawn")
NSENTER = shutil.which("nsenter")
SYSTEMD = Path("/usr/lib/systemd/systemd")

pytestmark = [
    pytest.mark.skipif(not IS_ROOT, reason="needs root (systemd-nspawn, nsenter)"),
    pytest.mark.skipif(
        NSPAWN is None,
        reason="systemd-nspawn not installed (apt-get install systemd-container; .ci/run does)",
    ),
    pytest.mark.skipif(NSENTER is None, reason="nsenter (util-linux) not installed"),
    pytest.mark.skipif(not SYSTEMD.exists(), reason="no systemd in this OS to boot"),
    # Boot, wheels and `make install` come with the first test; each step has its own
    # deadline below, this is the backstop.
    pytest.mark.timeout(600),
]

UNIT = "session-watcher"
USER = "swuser"
STORE = "/data/user_sessions"
OTHER_STORE = "/srv/store"
ENV_FILE = "/etc/default/session-watcher"
RUNTIME_DIR = "/run/session-watcher"
STATE_FILE = f"{RUNTIME_DIR}/state.json"
DROPIN_DIR = f"/etc/systemd/system/{UNIT}.service.d"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What nspawn may leave in the host's /run (it cannot remove a directory on a disk file
# system there); removed after the run when they were not there before and are empty.
NSPAWN_HOST_DIRS = (
    "/run/systemd/nspawn/propagate",
    "/run/systemd/nspawn",
    "/run/systemd/nspawn-root",
)
# What `make install` and the unit create in the container; the host must not see any of it.
INSTALLED = (
    "/opt/session-watcher",
    f"/etc/systemd/system/{UNIT}.service",
    f"/etc/systemd/system/multi-user.target.wants/{UNIT}.service",
    ENV_FILE,
    STORE,
    RUNTIME_DIR,
)


# --- the container -------------------------------------------------------------------------


def host_units_to_mask() -> list[str]:
    """Services and timers enabled on this host (postgresql, apt-daily, getty, ...): none is
    needed to run one unit, and masking them keeps the boot short and quiet."""
    names = {"console-getty.service"}
    for wants in Path("/etc/systemd/system").glob("*.wants"):
        for link in wants.iterdir():
            if link.name.endswith((".service", ".timer")):
                names.add(link.name)
    return sorted(names)


def copy_checkout(dest: Path) -> None:
    """The checkout as a fresh clone has it: no venv, caches or build output (make install
    writes build/ and *.egg-info next to the sources: in the copy, not in this checkout)."""
    shutil.copytree(
        REPO,
        dest,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv*", "__pycache__", "*.egg-info", "build", "dist", ".*_cache", "out"
        ),
    )


def build_wheels(src: Path, wheels: Path) -> None:
    """The package, its dependencies and its build backend as wheels, fetched by the host's
    pip (its index, mirrors and cache)."""
    build_requires = tomllib.loads((src / "pyproject.toml").read_text())["build-system"]["requires"]
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels)]
    proc = subprocess.run(
        # `make install` installs the object-store extra too (boto3 and what it needs).
        [*pip_wheel, f"{src}[s3]", *build_requires],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"


class Container:
    """A booted container and commands run in it with nsenter (machinectl would need
    systemd on the host)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.src = base / "src"
        self.wheels = base / "wheels"
        self.name = f"sw-test-{secrets.token_hex(4)}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.console = base / "console.log"
        self.ready_after = 0.0  # seconds from nothing to booted and installed

    def boot(self) -> None:
        for d in ("etc-upper", "home", "opt"):
            (self.base / d).mkdir()
        assert NSPAWN is not None
        command = [
            NSPAWN,
            "--quiet",
            "--volatile=yes",  # tmpfs root, only /usr from the host (read-only)
            "--directory=/",
            "--boot",
            f"--machine={self.name}",
            "--register=no",
            "--keep-unit",  # else "Failed to open system bus": the host runs no systemd
            f"--overlay=/etc:{self.base / 'etc-upper'}:/etc",
            f"--bind={self.base / 'home'}:/home",
            f"--bind={self.base / 'opt'}:/opt",
            f"--bind={self.src}",
            f"--bind-ro={self.wheels}",
            "--console=read-only",
            *(f"systemd.mask={u}" for u in host_units_to_mask()),
        ]
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        with open(self.console, "wb") as console:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=console, stderr=console, env=env
            )
        self.leader = wait_for(self._init_pid, timeout=60, what=f"the container's init\n{self}")
        # Until its init has set up the container, nsenter or systemctl fail; then the state
        # goes initializing, starting, running (degraded: some unit of the host's failed).
        seen: list[str] = []

        def booted() -> bool:
            proc = self.run("systemctl", "is-system-running", check=False, timeout=30)
            seen.append((proc.stdout.strip() or proc.stderr.strip())[-200:])
            return seen[-1] in ("running", "degraded")

        try:
            wait_for(booted, timeout=120, interval=0.5, what="the container to boot")
        except AssertionError as e:
            raise AssertionError(f"{e}; last seen: {seen[-3:]}\n{self}") from None

    def _init_pid(self) -> int | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited with {self.proc.returncode}\n{self}")
        pid = self.proc.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return None
        for child in children:
            try:
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
            except OSError:
                continue
        return None

    def run(
        self,
        *command: str,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """`command` in the container, as root, in a clean environment (an operator's
        shell, not this test's: no SESSION_WATCHER_*, no host PIP_* settings)."""
        assert NSENTER is not None
        clean = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
        argv = [NSENTER, "-t", str(self.leader), "-a", "env", "-i"]
        argv += [f"{k}={v}" for k, v in clean.items()]
        proc = subprocess.run(
            [*argv, *command],
            input=input,
            capture_output=True,
            text=True,
            errors="backslashreplace",
            timeout=timeout,
            check=False,
        )
        if check:
            assert proc.returncode == 0, (
                f"{' '.join(command)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def sh(self, script: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-euc", script, **kw)

    def as_user(self, *command: str, input: str | None = None) -> None:
        """`command` as the test user (real uid, gid and groups), like a session would."""
        self.run(
            "setpriv", f"--reuid={USER}", f"--regid={USER}", "--init-groups", *command, input=input
        )

    def show(self, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", UNIT, *(f"--property={p}" for p in props)).stdout
        pairs = (line.partition("=") for line in out.splitlines())
        return {key: value for key, sep, value in pairs if sep}

    def stat(self, path: str) -> tuple[str, str, str] | None:
        """(octal mode, group name, file type) of `path`, not following a symlink."""
        proc = self.run("stat", "-c", "%a|%G|%F", path, check=False)
        if proc.returncode != 0:
            return None
        mode, group, kind = proc.stdout.strip().split("|")
        return mode, group, kind

    def state(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.run("cat", STATE_FILE).stdout)
        return doc

    def journal(self) -> list[dict[str, Any]]:
        """The unit's journal entries, as journalctl's JSON (MESSAGE, _PID, ...)."""
        out = self.run("journalctl", "-u", UNIT, "-o", "json", "--no-pager").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def log_records(self) -> list[dict[str, Any]]:
        """The service's own JSON log lines (its text lines and systemd's are skipped)."""
        records = []
        for entry in self.journal():
            msg = entry.get("MESSAGE")
            if isinstance(msg, str) and msg.startswith("{"):
                try:
                    records.append(json.loads(msg))
                except ValueError:
                    continue
        return records

    def shutdown(self) -> None:
        """SIGTERM asks nspawn for a clean poweroff of the container; SIGKILL after 30 s
        (the container's init dies with it, and with it every process inside)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def __str__(self) -> str:
        try:
            tail = self.console.read_text(errors="replace").splitlines()[-30:]
        except OSError:
            tail = []
        return "console (last lines):\n" + "\n".join(tail)


@pytest.fixture(scope="module")
def box() -> Iterator[Container]:
    """A booted container with session-watcher installed by `make install`, a data-ops
    group, a user with a sessions directory, and JSON logs; no /data."""
    before = {d for d in NSPAWN_HOST_DIRS if os.path.lexists(d)}
    host_had = {p: os.path.lexists(p) for p in INSTALLED}
    base = Path(tempfile.mkdtemp(prefix="sw-systemd-"))
    container = Container(base)
    started = time.monotonic()
    try:
        copy_checkout(container.src)
        container.wheels.mkdir()
        build_wheels(container.src, container.wheels)
        container.boot()
        container.run(
            "make",
            "-C",
            str(container.src),
            "install",
            env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(container.wheels)},
            timeout=300,
        )
        container.sh("getent group data-ops >/dev/null || groupadd data-ops")
        container.run("useradd", "--create-home", "--user-group", USER)
        container.as_user("mkdir", "-p", f"/home/{USER}/user/sessions")
        container.sh(f"echo SESSION_WATCHER_LOG_FORMAT=json >> {ENV_FILE}")
        container.ready_after = time.monotonic() - started
        yield container
    finally:
        container.shutdown()
        shutil.rmtree(base, ignore_errors=True)
        for d in NSPAWN_HOST_DIRS:
            if d not in before:
                try:
                    os.rmdir(d)
                except OSError:
                    pass
            elif d == "/run/systemd/nspawn/propagate":
                try:
                    os.rmdir(os.path.join(d, container.name))
                except OSError:
                    pass
    assert {p: os.path.lexists(p) for p in INSTALLED} == host_had, "the host was changed"


def reset(box: Container) -> None:
    """Stopped, not failed, no drop-in, no extra setting: each test starts from there."""
    box.run("systemctl", "stop", UNIT, check=False, timeout=60)
    box.run("rm", "-rf", DROPIN_DIR)
    box.run("sed", "-i", "/^SESSION_WATCHER_\\(TARGET\\|WORKERS\\)=/d", ENV_FILE)
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "reset-failed", UNIT, check=False)


def wait_unit(box: Container, what: str, timeout: float = 60, **want: str) -> dict[str, str]:
    """Wait until the unit's properties have the wanted values; returns them all."""
    props = [*want, "ActiveState", "SubState", "Result", "NRestarts", "ExecMainStatus"]
    seen: dict[str, str] = {}

    def matches() -> bool:
        seen.update(box.show(*props))
        return all(seen.get(k) == v for k, v in want.items())

    try:
        wait_for(matches, timeout=timeout, interval=0.2, what=what)
    except AssertionError as e:
        raise AssertionError(f"{e}; last seen {seen}") from None
    return seen


def user_write(box: Container, name: str, data: str) -> None:
    box.as_user("tee", f"/home/{USER}/user/sessions/{name}", input=data)


def wait_copy(box: Container, store: str, name: str, data: str) -> None:
    path = f"{store}/{USER}/{name}"
    wait_for(
        lambda: box.run("cat", path, check=False).stdout == data,
        timeout=30,
        interval=0.2,
        what=f"{path} to hold what the user wrote",
    )


def temp_files(box: Container, store: str) -> list[str]:
    out = box.run("find", store, "-name", f"{TEMP_PREFIX}*{TEMP_SUFFIX}").stdout
    return out.split()


# --- the tests, in order -------------------------------------------------------------------


def test_fresh_machine_install_start_copy_reload_stop(
    box: Container, capsys: pytest.CaptureFixture[str]
) -> None:
    with capsys.disabled():
        print(f"\n[container booted, session-watcher installed: {box.ready_after:.0f} s]")
    assert box.stat("/data") is None, "the container must start without /data"
    box.run("systemctl", "enable", "--now", UNIT, timeout=120)
    props = wait_unit(box, "running", ActiveState="active", SubState="running")
    assert props["NRestarts"] == "0"
    # READY=1 came (Type=notify: `start` returned) and STATUS= with it.
    assert box.show("StatusText")["StatusText"], "no STATUS= line"
    # The unit made the store and its parent; parents 0755 (the data-ops readers must get
    # through), the store as the service sets it.
    assert box.stat("/data") == ("755", "root", "directory")
    assert box.stat(STORE) == ("2770", "data-ops", "directory")

    data = '{"type":"user","n":1}\n{"type":"assistant","n":2}\n'
    user_write(box, "s1.jsonl", data)
    wait_copy(box, STORE, "s1.jsonl", data)
    assert box.stat(f"{STORE}/{USER}") == ("2770", "data-ops", "directory")
    assert box.stat(f"{STORE}/{USER}/s1.jsonl") == ("640", "data-ops", "regular file")

    # A link to a file the user cannot read: refused (a JSON log line says so), never copied.
    box.as_user("ln", "-s", "/etc/shadow", f"/home/{USER}/user/sessions/evil.jsonl")
    refusal = wait_for(
        lambda: [
            r
            for r in box.log_records()
            if r.get("file") == "evil.jsonl" and r.get("reason") == "symlink"
        ],
        timeout=30,
        interval=0.2,
        what="the symlink's refusal in the journal",
    )
    assert refusal[0]["level"] == "WARNING" and refusal[0]["user"] == USER
    assert box.stat(f"{STORE}/{USER}/evil.jsonl") is None

    # reload = SIGHUP = one more full pass, seen in the state file's counts.
    passes = box.state()["totals"]["passes"]
    box.run("systemctl", "reload", UNIT)
    wait_for(
        lambda: box.state()["totals"]["passes"] > passes,
        timeout=30,
        interval=0.2,
        what="the pass that reload asked for",
    )
    assert box.show("ActiveState")["ActiveState"] == "active"

    # The live score of the unit as systemd loaded it, drop-ins and all.
    out = box.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out)
    assert match, out
    exposure = float(match.group(1))
    with capsys.disabled():
        print(f"[systemd-analyze security {UNIT}, live in the container: {exposure}]")
    assert exposure <= 2.0, out

    box.run("systemctl", "stop", UNIT, timeout=60)
    props = wait_unit(box, "stopped", ActiveState="inactive")
    assert (props["Result"], props["ExecMainStatus"]) == ("success", "0"), props
    assert temp_files(box, STORE) == []
    # The state file outlives the stop, with the service's last word.
    doc = box.state()
    assert doc["running"] is False
    assert doc["totals"]["copies"] >= 1 and doc["totals"]["refusals"] >= 1
    status = box.run("/opt/session-watcher/bin/session-watcher", "status", "--json", check=False)
    assert status.returncode == 0, status.stdout + status.stderr
    report = json.loads(status.stdout)
    assert report["service_state"] == "stopped"
    assert report["totals"]["in_sync"] == 1 and report["totals"]["refused"] == 1


def test_another_store_with_the_readmes_drop_in(box: Container) -> None:
    reset(box)
    readme = (REPO / "README.md").read_text()
    recipe = re.search(r"or for another store.*?\n\n((?:    .*\n)+)", readme, re.DOTALL)
    assert recipe, "the README's drop-in for another store is gone"
    dropin = "".join(line[4:] + "\n" for line in recipe.group(1).splitlines())
    assert OTHER_STORE in dropin, dropin
    assert box.stat(OTHER_STORE) is None
    box.run("mkdir", "-p", DROPIN_DIR)
    box.run("tee", f"{DROPIN_DIR}/store.conf", input=dropin)
    box.sh(f"echo SESSION_WATCHER_TARGET={OTHER_STORE} >> {ENV_FILE}")
    box.run("systemctl", "daemon-reload")

    box.run("systemctl", "start", UNIT, timeout=120)
    wait_unit(box, "running", ActiveState="active", SubState="running")
    data = '{"n":3}\n'
    user_write(box, "s2.jsonl", data)
    wait_copy(box, OTHER_STORE, "s2.jsonl", data)
    assert box.stat(OTHER_STORE) == ("2770", "data-ops", "directory")
    assert box.stat(f"{OTHER_STORE}/{USER}/s2.jsonl") == ("640", "data-ops", "regular file")
    box.run("systemctl", "stop", UNIT, timeout=60)
    props = wait_unit(box, "stopped", ActiveState="inactive")
    assert props["Result"] == "success", props


def test_a_bad_setting_fails_the_unit_at_once(box: Container) -> None:
    reset(box)
    box.sh(f"echo SESSION_WATCHER_WORKERS=many >> {ENV_FILE}")
    since = box.run("date", "+%s").stdout.strip()
    start = box.run("systemctl", "start", UNIT, check=False, timeout=120)
    assert start.returncode != 0
    # failed, not activating/auto-restart: no restart is pending.
    props = wait_unit(box, "failed", ActiveState="failed")
    assert (props["Result"], props["ExecMainStatus"], props["NRestarts"]) == (
        "exit-code",
        "2",
        "0",
    ), props
    out = box.run("journalctl", "-u", UNIT, f"--since=@{since}", "-o", "cat").stdout
    errors = [line for line in out.splitlines() if line.startswith("session-watcher: error:")]
    assert len(errors) == 1 and "SESSION_WATCHER_WORKERS" in errors[0], out


def test_a_repeating_failure_ends_at_the_start_limit(box: Container) -> None:
    reset(box)
    # A missing ReadWritePaths= without "-" (the unit's old mistake) fails every start at
    # the namespace setup (226/NAMESPACE). The unit's own RestartSec= and start limit: with
    # systemd's default limit (5 starts in 10 s) a restart every 5 s would go on forever.
    dropin = "[Service]\nReadWritePaths=/nonexistent-session-watcher-test\n"
    box.run("mkdir", "-p", DROPIN_DIR)
    box.run("tee", f"{DROPIN_DIR}/broken.conf", input=dropin)
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "start", "--no-block", UNIT)

    def refused() -> bool:
        # systemd's own line for it; Result= keeps the last start's "exit-code" in 252.
        return any(
            e.get("MESSAGE") == f"{UNIT}.service: Start request repeated too quickly."
            for e in box.journal()
        )

    wait_for(refused, timeout=120, interval=0.5, what="the start limit to be hit")
    props = wait_unit(box, "failed", ActiveState="failed")
    assert (props["Result"], props["NRestarts"]) == ("exit-code", "5"), props
    reset(box)


def test_make_uninstall(box: Container) -> None:
    reset(box)
    store = box.run("find", "/data", "-printf", "%p %m %s\\n", check=False).stdout
    box.run("make", "-C", str(box.src), "uninstall", timeout=120)
    assert box.show("LoadState")["LoadState"] == "not-found"
    assert box.stat("/opt/session-watcher") is None
    assert box.stat(f"/etc/systemd/system/{UNIT}.service") is None
    assert box.stat(f"/etc/systemd/system/multi-user.target.wants/{UNIT}.service") is None
    assert box.stat(ENV_FILE) is not None  # kept unless PURGE=1
    assert box.stat(RUNTIME_DIR) is None  # kept at stop, not after an uninstall
    # The store is never touched.
    assert box.run("find", "/data", "-printf", "%p %m %s\\n", check=False).stdout == store
