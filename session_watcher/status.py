"""`session-watcher status`: is every transcript in the store, and if not, how far behind?

A read-only comparison of the sources with the store under the copy engine's own rules:
the same walk to each sessions directory (O_NOFOLLOW, owner checks), the same
qualification of files (`copy.refusal`) and the same up-to-date test (`copy.is_up_to_date`),
the store walked without following symlinks. It never opens a source file (an lstat of
each entry is all it needs), never creates or changes anything, and copies nothing.

The decisions are pure functions over stats and `now` (`classify`, `lagging`); `scan` is
the thin I/O shell and `render_text`/`render_json` the output.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config
from .copy import SourceDir, is_up_to_date, refusal
from .homes import HomeRefused, Walk, list_homes, open_sessions_dir
from .logfmt import utf8_text
from .objstore import ObjectStore, store_for_target
from .ratelimit import LogLimiter
from .safefs import Refused, close_quietly, escape, open_root_dir
from .state import age, read_state
from .store import UserStore

__all__ = [
    "STALE_STATE_SECONDS",
    "Report",
    "Unsynced",
    "UserStatus",
    "check",
    "classify",
    "lagging",
    "pid_alive",
    "render_json",
    "render_text",
    "scan",
    "service_state",
]

# The service rewrites its state file at least every 15 s while it runs.
STALE_STATE_SECONDS = 60.0
# /proc/stat's btime is whole seconds, and the service records started_at a moment after
# its process started: a process that started more than this after started_at is another
# one that got the pid.
PID_REUSE_SLACK_SECONDS = 2.0


# --- pure decisions ---------------------------------------------------------------------


def classify(
    src: os.stat_result, tgt: os.stat_result | None, owner_uid: int, max_bytes: int
) -> str:
    """in_sync, missing, stale (target older or different) or refused (the copy engine
    would not copy it: symlink, FIFO, foreign owner, too large, ...)."""
    if refusal(src, owner_uid, max_bytes) is not None:
        return "refused"
    if is_up_to_date(src, tgt):
        return "in_sync"
    if tgt is None:
        return "missing"
    return "stale"


@dataclass(frozen=True)
class Unsynced:
    user: str
    file: str
    state: str  # missing or stale
    changed_at: float  # the source's mtime (epoch seconds)


def lagging(unsynced: list[Unsynced], now: float, grace: float) -> list[tuple[Unsynced, float]]:
    """The unsynced files whose source changed more than `grace` seconds ago, with their
    lag (seconds since that change), most behind first. A file changed within the grace
    may simply be on its way (or held back while its last line is unfinished)."""
    out = [(u, now - u.changed_at) for u in unsynced if now - u.changed_at > grace]
    out.sort(key=lambda p: -p[1])
    return out


def service_state(doc: dict[str, Any], alive: bool | None) -> str:
    """The service as its state file and the process table tell it: stopped (it wrote
    "running": false on its way out), gone (the file says running, but its process is not
    there: killed, crashed), starting (initial pass) or running. `alive` is None when the
    process could not be checked (no pid in the file)."""
    if not doc.get("running"):
        return "stopped"
    if alive is False:
        return "gone"
    return "running" if doc.get("ready") else "starting"


# --- the scan (I/O) ---------------------------------------------------------------------


@dataclass
class UserStatus:
    user: str
    in_sync: int = 0
    missing: int = 0
    stale: int = 0
    refused: int = 0
    oldest_unsynced: float | None = None  # source mtime of the oldest unsynced file
    problem: str | None = None  # the user is refused, or its store directory is unusable

    def add(self, state: str, mtime: float) -> None:
        setattr(self, state, getattr(self, state) + 1)
        if state in ("missing", "stale") and (
            self.oldest_unsynced is None or mtime < self.oldest_unsynced
        ):
            self.oldest_unsynced = mtime


@dataclass
class Report:
    checked_at: float
    grace: float
    users: list[UserStatus] = field(default_factory=list)
    unsynced: list[Unsynced] = field(default_factory=list)
    store_problem: str | None = None
    state_file: str = ""
    service: dict[str, Any] | None = None
    service_error: str | None = None
    service_state: str | None = None  # `service_state()`; None without a readable state file

    def lagging(self) -> list[tuple[Unsynced, float]]:
        return lagging(self.unsynced, self.checked_at, self.grace)

    @property
    def ok(self) -> bool:
        return not self.lagging()


def scan(config: Config, *, grace: float, now: float | None = None) -> Report:
    """Compare every qualifying source file with its store copy. Raises OSError only when
    the home root cannot be opened."""
    report = Report(checked_at=time.time() if now is None else now, grace=grace)
    # Dry run: never creates or re-modes anything; an object store is LISTed (and HEADed
    # where the index does not know an object), its index opened read-only.
    store = store_for_target(config, None, dry_run=True)
    home_fd = open_root_dir(config.home_root)
    store_fd: int | None = None
    try:
        try:
            store_fd = store.open_root(create=False)
        except Refused as e:
            report.store_problem = f"store root {escape(config.target_text)} is {e.reason}"
        except OSError as e:
            report.store_problem = f"store root {escape(config.target_text)}: {e.strerror or e}"
        if isinstance(store, ObjectStore):
            try:
                store.ensure_listed()
            except OSError as e:
                report.store_problem = f"store {escape(config.target_text)}: {e.strerror or e}"
        for home in list_homes(home_fd, config):
            try:
                source = open_sessions_dir(home_fd, home, config)
            except (HomeRefused, OSError) as e:
                report.users.append(UserStatus(home.name, problem=str(e)))
                continue
            if source is None:
                continue
            us = UserStatus(home.name)
            user_store = store.user_store(store_fd, home.name)
            try:
                _scan_user(config, source.fd, source.uid, user_store, us, report)
            finally:
                user_store.close()
                os.close(source.fd)
            report.users.append(us)
    finally:
        close_quietly(store_fd)
        os.close(home_fd)
        store.close()
    report.users.sort(key=lambda u: u.user)
    return report


def _scan_user(
    config: Config, dir_fd: int, uid: int, user_store: UserStore, us: UserStatus, report: Report
) -> None:
    store_ok = True
    try:
        user_store.fd(create=False)
    except OSError as e:  # a symlink planted in the store: never followed
        us.problem = f"store directory: {e.strerror or e}"
        store_ok = False
    source = SourceDir(us.user, uid, dir_fd)
    try:
        # The pass's walk, at every level down to --depth, with its checks; a refused
        # directory is logged (WARNING) by the walk and not looked into.
        for visit in Walk(config, LogLimiter()).visits(source):
            if visit.kind != "file" or visit.st is None or visit.entry is None:
                continue
            st = visit.st  # lstat: the file is never opened
            key = visit.source.key(visit.entry.name)
            try:
                tgt = user_store.lstat(key) if store_ok else None
            except OSError:
                tgt = None  # a symlink planted in the store: never followed, so missing
            state = classify(st, tgt, uid, config.max_file_bytes)
            us.add(state, st.st_mtime)
            if state in ("missing", "stale"):
                report.unsynced.append(Unsynced(us.user, key, state, st.st_mtime))
    except OSError as e:
        us.problem = f"cannot list the sessions directory: {e.strerror or e}"


def _process_started_at(pid: int) -> float | None:
    """When process `pid` started (epoch seconds), from /proc; None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        # Field 22 (starttime, clock ticks after boot); `fields` starts at field 3.
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def pid_alive(pid: object, started_at: object) -> bool | None:
    """Is the process that wrote the state file still there? False when no process has the
    pid, or the one that has it started after the service did (the pid was reused); None
    when the file names no pid."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another uid
    except OSError:
        return None
    began = _process_started_at(pid)
    if began is not None and isinstance(started_at, int | float):
        return began <= started_at + PID_REUSE_SLACK_SECONDS
    return True


def attach_service(report: Report, state_file: str) -> None:
    """Add the service's own view from its state file, when there is one, and whether the
    process that wrote it is still there."""
    report.state_file = state_file
    try:
        report.service = read_state(Path(state_file))
    except (OSError, ValueError) as e:
        report.service_error = f"unreadable: {e}"
        return
    doc = report.service
    if doc is not None:
        alive = pid_alive(doc.get("pid"), doc.get("started_at")) if doc.get("running") else None
        report.service_state = service_state(doc, alive)


def check(config: Config, *, grace: float, now: float | None = None) -> Report:
    """The whole status check: the scan plus the service's view."""
    report = scan(config, grace=grace, now=now)
    attach_service(report, str(config.state_file))
    return report


# --- output -------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if seconds < 10:
        return f"{max(0.0, seconds):.1f} s"
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 172800:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _when(epoch: float, now: float) -> str:
    return (
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(epoch))} ({duration(now - epoch)} ago)"
    )


def render_text(report: Report, limit: int = 50) -> str:
    now = report.checked_at
    lines: list[str] = []
    width = max([len(escape(u.user)) for u in report.users] + [len("TOTAL")])

    def row(name: str, a: object, b: object, c: object, d: object, oldest: str = "") -> str:
        return f"{name:<{width}}  {a:>7}  {b:>7}  {c:>5}  {d:>7}  {oldest}".rstrip()

    lines.append(row("USER", "IN SYNC", "MISSING", "STALE", "REFUSED", "OLDEST UNSYNCED"))
    tot = UserStatus("TOTAL")
    for u in report.users:
        name = escape(u.user)
        if u.problem is not None and not (u.in_sync or u.missing or u.stale or u.refused):
            lines.append(f"{name:<{width}}  skipped: {u.problem}")
            continue
        oldest = "-" if u.oldest_unsynced is None else duration(now - u.oldest_unsynced)
        lines.append(row(name, u.in_sync, u.missing, u.stale, u.refused, oldest))
        if u.problem is not None:
            lines.append(f"{'':<{width}}  ({u.problem})")
        tot.in_sync += u.in_sync
        tot.missing += u.missing
        tot.stale += u.stale
        tot.refused += u.refused
    lines.append(row("TOTAL", tot.in_sync, tot.missing, tot.stale, tot.refused))
    if report.store_problem:
        lines.append(f"store: {report.store_problem}")
    lines.append("")
    lag = report.lagging()
    recent = len(report.unsynced) - len(lag)
    if lag:
        lines.append(
            f"LAGGING: {len(lag)} file(s) changed more than {report.grace:g} s ago "
            "and not in the store:"
        )
        for f, behind in lag[:limit]:
            lines.append(f"  {escape(f.user + '/' + f.file)}  {f.state}, {duration(behind)} behind")
        if len(lag) > limit:
            lines.append(f"  ... and {len(lag) - limit} more (--json lists them all)")
    else:
        lines.append(
            f"OK: every file changed more than {report.grace:g} s ago is in the store"
            + (f" ({recent} changed within the grace, on their way)" if recent else "")
        )
    lines.extend(_service_text(report, now))
    return "\n".join(lines) + "\n"


def _service_text(report: Report, now: float) -> list[str]:
    out = [""]
    if report.service_error is not None:
        out.append(f"service: state file {escape(report.state_file)} {report.service_error}")
        return out
    doc = report.service
    if doc is None:
        # Under the unit the file outlives a stop (RuntimeDirectoryPreserve=yes) but not a
        # reboot.
        out.append(
            f"service: no state file at {escape(report.state_file)}: not run since boot "
            "(or it writes another --state-file)"
        )
        return out
    written = age(doc, now)
    state = report.service_state or service_state(doc, None)
    label = {
        "starting": "starting (initial pass)",
        "stopped": "stopped",
        "gone": "not running: its process is gone without a clean stop (killed or crashed)",
    }.get(state, state)
    out.append(f"service: {label}, pid {doc.get('pid')}, version {doc.get('version')}")
    if written is not None and state == "stopped":
        out.append(f"  stopped {duration(written)} ago (its last write of the state file)")
    elif written is not None:
        note = ""
        if state != "gone" and written > STALE_STATE_SECONDS:
            note = "  <- not updated lately: the service may be hung or gone"
        out.append(f"  state written {duration(written)} ago{note}")
    if isinstance(doc.get("started_at"), int | float):
        out.append(f"  started {_when(doc['started_at'], now)}")
    degraded = doc.get("degraded") or []
    out.append(
        f"  watching {doc.get('users_watched')} users; "
        + (
            f"degraded (scanned every 30 s): {', '.join(map(escape, degraded))}"
            if degraded
            else "no degraded directories"
        )
    )
    p = doc.get("last_pass")
    if isinstance(p, dict):
        at = p.get("at")
        when = _when(at, now) if isinstance(at, int | float) else "?"
        out.append(
            f"  last full pass {when}: {p.get('files_copied')} copied, "
            f"{p.get('files_skipped')} skipped, {p.get('files_refused')} refused, "
            f"{p.get('files_failed')} failed in {p.get('duration_s')} s"
        )
    t = doc.get("totals")
    if isinstance(t, dict):
        out.append(
            f"  since start: {t.get('copies')} copies ({t.get('bytes')} bytes), "
            f"{t.get('refusals')} refusals, {t.get('failures')} failures, "
            f"{t.get('overflows')} overflows, {t.get('passes')} passes"
        )
    err = doc.get("last_error")
    if isinstance(err, dict):
        at = err.get("at")
        when = _when(at, now) if isinstance(at, int | float) else "?"
        out.append(f"  last error {when}: {err.get('msg')}")
    else:
        out.append("  last error: none")
    return out


def render_json(report: Report) -> str:
    now = report.checked_at
    users = [
        {
            "user": utf8_text(u.user),
            "in_sync": u.in_sync,
            "missing": u.missing,
            "stale": u.stale,
            "refused": u.refused,
            "oldest_unsynced_age_s": None
            if u.oldest_unsynced is None
            else round(now - u.oldest_unsynced, 3),
            "problem": u.problem,
        }
        for u in report.users
    ]
    lag = report.lagging()
    doc: dict[str, Any] = {
        "ok": not lag,
        "checked_at": round(now, 3),
        "grace_s": report.grace,
        "totals": {
            k: sum(getattr(u, k) for u in report.users)
            for k in ("in_sync", "missing", "stale", "refused")
        },
        "users": users,
        "lagging": [
            {
                "user": utf8_text(u.user),
                "file": utf8_text(u.file),
                "state": u.state,
                "lag_s": round(behind, 3),
            }
            for u, behind in lag
        ],
        "unsynced_within_grace": len(report.unsynced) - len(lag),
        "store_problem": report.store_problem,
        "state_file": report.state_file,
        "service": report.service,
        "service_error": report.service_error,
        "service_state": report.service_state,
    }
    if report.service is not None:
        doc["service_state_age_s"] = (
            None if (a := age(report.service, now)) is None else round(a, 3)
        )
    return json.dumps(doc, ensure_ascii=False)
