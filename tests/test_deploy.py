"""The shipped systemd unit and env file.

`systemd-analyze verify` and `security` where systemd-analyze exists; the directives the
service relies on; the env file documents every setting; and, as root, the modes a pass
really produces under the unit's confinement. No systemd runs here (CI is a container), so
the confinement that decides those modes is rebuilt from the unit file itself: its
CapabilityBoundingSet (via setpriv), its SystemCallFilter (via libseccomp, as systemd does),
MemoryDenyWriteExecute (via PR_SET_MDWE) and RestrictAddressFamilies. The mount namespace
options (ProtectSystem, ProtectHome, ReadWritePaths) are not emulated.
"""

from __future__ import annotations

import argparse
import ctypes.util
import errno
import grp
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from session_watcher.cli import build_parser
from session_watcher.config import PARSERS

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
UNIT = REPO / "deploy" / "session-watcher.service"
ENV_FILE = REPO / "deploy" / "session-watcher.env"
DROP_IN = REPO / "deploy" / "object-store.conf"
ANALYZE = shutil.which("systemd-analyze")
SETPRIV = shutil.which("setpriv")

needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
needs_root_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None, reason="needs root and setpriv (util-linux)"
)


# --- reading the unit ---------------------------------------------------------------------


def unit_directives(path: Path = UNIT) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; the unit uses no line continuations."""
    section = ""
    out: list[tuple[str, str, str]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {raw!r}"
        assert not value.endswith("\\"), f"line continuation not supported here: {raw!r}"
        out.append((section, key.strip(), value.strip()))
    return out


def values(key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in unit_directives() if s == section and k == key]


def value(key: str, section: str = "Service") -> str | None:
    """A single-valued setting: the last assignment wins, as in systemd."""
    found = values(key, section)
    return found[-1] if found else None


def list_setting(key: str) -> list[str]:
    """A list setting: assignments accumulate, an empty one resets."""
    items: list[str] = []
    for v in values(key):
        items = [*items, *v.split()] if v else []
    return items


def bounding_caps() -> list[str]:
    caps = list_setting("CapabilityBoundingSet")
    assert caps, "CapabilityBoundingSet= is empty or missing"
    assert not any(c.startswith("~") for c in caps), "expected an allow list of capabilities"
    return caps


def is_yes(v: str | None) -> bool:
    return v is not None and v.lower() in ("yes", "true", "on", "1")


def seconds(v: str) -> float:
    """A systemd time span as this unit writes them: 5s, 10min, 90 (seconds)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min|h)?", v.strip())
    assert match, f"time span not understood here: {v!r}"
    unit = {"ms": 0.001, "s": 1, None: 1, "min": 60, "h": 3600}[match.group(2)]
    return float(match.group(1)) * unit


# --- systemd-analyze --------------------------------------------------------------------


@needs_analyze
def test_verify_is_clean(tmp_path: Path) -> None:
    # verify insists that ExecStart's binary exists; /opt/session-watcher is only there after
    # `make install`, so verify a copy whose ExecStart points at this checkout's console script.
    exe = Path(sys.executable).parent / "session-watcher"
    binary = exe if exe.exists() else Path(sys.executable)
    text = UNIT.read_text()
    assert "\nExecStart=/opt/session-watcher/bin/session-watcher run\n" in text
    copy = tmp_path / UNIT.name
    copy.write_text(
        text.replace("ExecStart=/opt/session-watcher/bin/session-watcher", f"ExecStart={binary}")
    )
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=30, check=False
    )
    output = proc.stdout + proc.stderr
    ours = [line for line in output.splitlines() if UNIT.name in line]
    assert proc.returncode == 0, output
    assert ours == [], output


@needs_analyze
def test_security_exposure_at_most_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, "security", "--offline=yes", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    exposure = float(match.group(1))
    with capsys.disabled():
        print(f"\nsystemd-analyze security --offline=yes {UNIT.name}: exposure {exposure}")
    assert exposure <= 2.0, proc.stdout


@needs_analyze
def test_object_store_drop_in_exposure_at_most_2_5(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A drop-in's settings apply as if appended to the unit (list settings reset by an empty
    # assignment alike): the unit followed by the drop-in is what systemd runs.
    unit = tmp_path / "session-watcher.service"
    unit.write_text(UNIT.read_text() + "\n" + DROP_IN.read_text())
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    exposure = float(match.group(1))
    with capsys.disabled():
        print(f"\nsystemd-analyze security --offline=yes with {DROP_IN.name}: {exposure}")
    assert exposure <= 2.5, proc.stdout


def test_object_store_drop_in_says_what_the_object_store_needs() -> None:
    got = [(s, k, v) for s, k, v in unit_directives(DROP_IN) if s == "Service"]
    settings = {k: v for _, k, v in got}
    assert settings["StateDirectory"] == "session-watcher"  # --state-dir's default
    assert settings["IPAddressDeny"] == ""  # resets the unit's `any`
    assert settings["PrivateNetwork"] == "no"
    assert settings["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    cred, _, path = settings["LoadCredential"].partition(":")
    assert path.startswith("/") and cred
    assert settings["Environment"] == f"AWS_SHARED_CREDENTIALS_FILE=%d/{cred}"
    # No key in the drop-in itself.
    assert "aws_secret_access_key =" not in DROP_IN.read_text().replace("#   aws_secret", "")


# --- what the unit must say ---------------------------------------------------------------


def test_unit_has_the_directives_the_service_relies_on() -> None:
    assert value("Type") == "notify"
    assert value("NotifyAccess") == "main"
    exec_start = value("ExecStart")
    assert exec_start is not None and exec_start.split()[-1] == "run"
    assert exec_start.split()[0].endswith("/bin/session-watcher")
    reload_cmd = value("ExecReload")
    assert reload_cmd is not None and "-HUP" in reload_cmd and "$MAINPID" in reload_cmd
    assert value("Restart") == "on-failure"
    # A configuration error (exit 2) fails the unit at once; any other failure that keeps
    # coming back reaches a start limit that RestartSec= cannot outrun.
    assert "2" in list_setting("RestartPreventExitStatus")
    interval = value("StartLimitIntervalSec", "Unit")
    burst = value("StartLimitBurst", "Unit")
    restart_sec = value("RestartSec")
    assert interval is not None and burst is not None and restart_sec is not None
    assert seconds(restart_sec) * (int(burst) - 1) < seconds(interval)
    watchdog = value("WatchdogSec")
    assert watchdog not in (None, "", "0", "infinity")
    assert value("TimeoutStopSec")
    assert "-/etc/default/session-watcher" in values("EnvironmentFile")
    assert value("RuntimeDirectory") == "session-watcher"
    # The state file's "running": false outlives the stop (systemd deletes it otherwise).
    assert is_yes(value("RuntimeDirectoryPreserve"))

    assert value("ProtectSystem") == "strict"
    # "-": a missing store must not fail the namespace setup (226/NAMESPACE) of the "+"
    # ExecStartPre that creates it; tests/test_systemd.py shows that under a real systemd.
    assert "-/data/user_sessions" in list_setting("ReadWritePaths")
    (mkdir,) = [v for v in values("ExecStartPre") if "mkdir" in v]
    assert mkdir.startswith("+")
    assert re.search(r"\bumask 0?022 && exec mkdir -p /data/user_sessions\b", mkdir), mkdir
    assert value("ProtectHome") == "read-only"
    for key in ("PrivateTmp", "PrivateNetwork", "PrivateDevices", "NoNewPrivileges"):
        assert is_yes(value(key)), key
    assert list_setting("RestrictAddressFamilies") == ["AF_UNIX"]
    assert values("SystemCallFilter")[0] == "@system-service"

    caps = bounding_caps()
    assert {"CAP_DAC_READ_SEARCH", "CAP_CHOWN", "CAP_FSETID"} <= set(caps)
    assert not {"CAP_SYS_ADMIN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_SETUID"} & set(caps)
    # RestrictSUIDSGID=yes turns chmod 2770 on the store directories into EPERM.
    assert not is_yes(value("RestrictSUIDSGID"))
    assert value("User") in (None, "root")
    assert value("WantedBy", "Install") == "multi-user.target"


def test_readmes_drop_in_for_another_store_keeps_the_units_form() -> None:
    # The same "-" and "+" and umask as the unit's own lines, or a store that does not exist
    # yet fails the start (226/NAMESPACE); tests/test_systemd.py runs this drop-in for real.
    readme = (REPO / "README.md").read_text()
    recipe = re.search(r"or for another store.*?\n\n((?:    .*\n)+)", readme, re.DOTALL)
    assert recipe, "the README's drop-in for another store is gone"
    lines = [line.strip() for line in recipe.group(1).splitlines()]
    assert lines[0] == "[Service]"
    assert "ExecStartPre=" in lines and "ReadWritePaths=" in lines  # resets come first
    (mkdir,) = [v for v in values("ExecStartPre") if "mkdir" in v]
    other = [line for line in lines if line.startswith("ExecStartPre=+")]
    assert other == ["ExecStartPre=" + mkdir.replace("/data/user_sessions", "/srv/store")]
    assert "ReadWritePaths=-/srv/store" in lines


def parser_options() -> set[tuple[str, str]]:
    """(subcommand, option string) for every option the CLI accepts, -h/--help aside."""
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        (command, option)
        for command, p in sub.choices.items()
        for action in p._actions
        for option in action.option_strings
        if option not in ("-h", "--help")
    }


def readme_options() -> set[tuple[str, str]]:
    """(subcommand, option string) for every row of the README's Options table. A row
    names its subcommands before its options (`run`/`status --state-file PATH`); a row
    that names none is for every subcommand."""
    section = README.read_text().split("\n## Options\n", 1)[1].split("\n## ", 1)[0]
    commands = ("reconcile", "run", "status")
    out: set[tuple[str, str]] = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue  # not a row of the table, or its header
        cell = re.split(r"(?<!\\)\|", line)[1]
        options = re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", cell)
        assert options, f"a row of the options table without an option: {line!r}"
        named = re.findall(r"\b(reconcile|run|status)\b", cell[: cell.index(options[0])])
        out |= {(c, o) for c in (named or commands) for o in options}
    return out


def test_env_file_and_readme_document_every_setting() -> None:
    text = ENV_FILE.read_text()
    documented = set(re.findall(r"^#(SESSION_WATCHER_[A-Z_]+)=", text, re.MULTILINE))
    known = {f"SESSION_WATCHER_{k.upper()}" for k in PARSERS}
    assert sorted(known - documented) == []
    assert sorted(documented - known) == [], "typo, or a setting that is gone?"
    # Installing the file must change nothing: every assignment is commented out.
    live = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert live == []
    # The README's options table: every option of every subcommand, and nothing else.
    parser, readme = parser_options(), readme_options()
    assert sorted(parser - readme) == [], "options missing from the README's table"
    assert sorted(readme - parser) == [], "options in the README's table that the CLI lacks"


# --- the modes the service really produces under the unit's confinement --------------------

# Runs between setpriv and the service: applies the unit's MemoryDenyWriteExecute and
# SystemCallFilter/RestrictAddressFamilies the way systemd does (seccomp allow list, other
# calls fail with the error number), then execs the command.
CONFINE = r"""
import ctypes, json, os, sys
cfg = json.loads(sys.argv[1])
cmd = sys.argv[2:]
libc = ctypes.CDLL(None, use_errno=True)
if cfg["mdwe"] and libc.prctl(65, 1, 0, 0, 0) != 0 and ctypes.get_errno() != 22:
    raise OSError(ctypes.get_errno(), "PR_SET_MDWE")  # 22: kernel older than 6.3, skip it
if cfg["libseccomp"]:
    class Cmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                    ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]
    lib = ctypes.CDLL(cfg["libseccomp"], use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(0x00050000 | cfg["errno"])
    for name in cfg["syscalls"]:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            continue  # not a system call of this architecture
        if name == "socket" and cfg["families"] is not None:
            for family in cfg["families"]:
                cmp = Cmp(0, 4, family, 0)  # SCMP_CMP_EQ on the address family
                assert lib.seccomp_rule_add_array(ctx, 0x7FFF0000, nr, 1, ctypes.byref(cmp)) == 0
            continue
        assert lib.seccomp_rule_add_array(ctx, 0x7FFF0000, nr, 0, None) == 0, name
    assert lib.seccomp_load(ctx) == 0
os.execv(cmd[0], cmd)
"""


def syscall_groups() -> dict[str, list[str]]:
    """`systemd-analyze syscall-filter`: group name -> members (system calls and groups)."""
    assert ANALYZE is not None
    out = subprocess.run(
        [ANALYZE, "syscall-filter"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif not line.strip() or line.startswith("#"):
            current = None if line.startswith("#") else current
        elif current is not None and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def allowed_syscalls() -> list[str]:
    """The unit's SystemCallFilter as a flat allow list (@default is always allowed)."""
    groups = syscall_groups()

    def expand(item: str) -> set[str]:
        if not item.startswith("@"):
            return {item}
        return set().union(*(expand(m) for m in groups[item]))

    filters = values("SystemCallFilter")
    assert filters and not filters[0].startswith("~"), "expected an allow list"
    allowed = expand("@default")
    for entry in filters:
        if entry.startswith("~"):
            allowed -= set().union(*(expand(i) for i in entry[1:].split()))
        else:
            allowed |= set().union(*(expand(i) for i in entry.split()))
    return sorted(allowed)


def confined(command: list[str], caps: list[str]) -> list[str]:
    """`command` under the bounding set `caps` and the unit's other process restrictions."""
    assert SETPRIV is not None
    bounding = ",".join(["-all", *("+" + c.removeprefix("CAP_").lower() for c in caps)])
    libseccomp = ctypes.util.find_library("seccomp") if ANALYZE else None
    families = list_setting("RestrictAddressFamilies")
    cfg = {
        "mdwe": is_yes(value("MemoryDenyWriteExecute")),
        "libseccomp": libseccomp,
        "syscalls": allowed_syscalls() if libseccomp else [],
        "errno": int(getattr(errno, value("SystemCallErrorNumber") or "EPERM")),
        "families": [int(getattr(socket, f)) for f in families] if families else None,
    }
    setpriv = [SETPRIV, f"--bounding-set={bounding}", "--inh-caps=-all", "--no-new-privs"]
    return [*setpriv, sys.executable, "-c", CONFINE, json.dumps(cfg), *command]


def service_command() -> list[str]:
    exe = Path(sys.executable).parent / "session-watcher"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "session_watcher"]


def store_group() -> grp.struct_group:
    """An existing group this process is not a member of: only then is CAP_FSETID needed
    to keep the setgid bit, so only then does the test prove anything about it."""
    try:
        group = grp.getgrnam("users")
    except KeyError:
        pytest.skip("no group 'users' on this machine")
    if group.gr_gid == os.getgid() or group.gr_gid in os.getgroups():
        pytest.skip("this process is a member of group 'users'")
    return group


def make_home(root: Path, uid: int = 1000) -> Path:
    """home/alice/user/sessions/s1.jsonl owned by `uid`, 0600 in 0700 directories."""
    sessions = root / "home" / "alice" / "user" / "sessions"
    sessions.mkdir(parents=True)
    src = sessions / "s1.jsonl"
    src.write_bytes(b'{"type":"user","n":1}\n{"type":"assistant","n":2}\n')
    src.chmod(0o600)
    for path in (src, sessions, sessions.parent, sessions.parent.parent):
        os.chown(path, uid, uid)
        if path.is_dir():
            path.chmod(0o700)
    return src


def reconcile_confined(tmp_path: Path, caps: list[str], group: str) -> dict[str, int]:
    command = [
        *service_command(),
        "reconcile",
        "--home-root",
        str(tmp_path / "home"),
        "--target",
        str(tmp_path / "store"),
        "--min-uid",
        "1000",
        "--group",
        group,
        "--json",
    ]
    proc = subprocess.run(
        confined(command, caps), capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    stats: dict[str, int] = json.loads(proc.stdout)
    return stats


@needs_root_setpriv
def test_store_modes_under_the_units_confinement(tmp_path: Path) -> None:
    group = store_group()
    src = make_home(tmp_path)
    stats = reconcile_confined(tmp_path, bounding_caps(), group.gr_name)
    assert (stats["files_copied"], stats["files_refused"], stats["files_failed"]) == (1, 0, 0)

    store = tmp_path / "store"
    for directory in (store, store / "alice"):
        st = directory.lstat()
        assert stat.S_ISDIR(st.st_mode)
        assert (oct(stat.S_IMODE(st.st_mode)), st.st_gid) == (oct(0o2770), group.gr_gid)
    copy = store / "alice" / "s1.jsonl"
    st = copy.lstat()
    assert stat.S_ISREG(st.st_mode)
    assert (oct(stat.S_IMODE(st.st_mode)), st.st_gid) == (oct(0o640), group.gr_gid)
    assert copy.read_bytes() == src.read_bytes()


@needs_root_setpriv
def test_without_cap_fsetid_the_setgid_bit_is_silently_lost(tmp_path: Path) -> None:
    # The trap the unit avoids, shown to be real here, so the test above can fail.
    group = store_group()
    make_home(tmp_path)
    caps = [c for c in bounding_caps() if c != "CAP_FSETID"]
    stats = reconcile_confined(tmp_path, caps, group.gr_name)
    assert stats["files_failed"] == 0
    assert stat.S_IMODE((tmp_path / "store" / "alice").lstat().st_mode) == 0o770


@needs_root_setpriv
def test_run_speaks_sd_notify_under_the_units_confinement(tmp_path: Path) -> None:
    # `run` imports watchdog (ctypes: MemoryDenyWriteExecute), adds inotify watches (seccomp)
    # and sends its notifications over AF_UNIX (RestrictAddressFamilies).
    group = store_group()
    make_home(tmp_path)
    notify_path = tmp_path / "notify.sock"
    command = [
        *service_command(),
        "run",
        "--home-root",
        str(tmp_path / "home"),
        "--target",
        str(tmp_path / "store"),
        "--group",
        group.gr_name,
        "--reconcile-interval",
        "0",
    ]
    # WatchdogSec=0.2s: the first WATCHDOG=1 is due within 0.1 s of READY=1.
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "200000"}
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(10)
        with subprocess.Popen(
            confined(command, bounding_caps()),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:
            try:
                seen: list[str] = []
                while not {"READY=1", "WATCHDOG=1"} <= set(seen):
                    seen += notify.recv(4096).decode().split("\n")
                proc.terminate()
                while "STOPPING=1" not in seen:
                    seen += notify.recv(4096).decode().split("\n")
                _, stderr = proc.communicate(timeout=15)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
    assert proc.returncode == 0, stderr
    assert stat.S_IMODE((tmp_path / "store" / "alice").lstat().st_mode) == 0o2770
