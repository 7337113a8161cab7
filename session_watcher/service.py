"""`session-watcher run`: startup pass, live watches, periodic passes, signals, sd_notify.

Threads: the main thread is the control loop (signals, rescans of the home root, the
fallback scan of unwatchable directories, WATCHDOG=1); a pass thread runs full and
per-user passes; a few workers run the copies that events ask for; a few inotify reader
threads (watch.py: a fixed number, whatever the number of watches) hand events on. All
copies, from events or passes, go through `copy.sync_file`, whose per-file lock keeps two
copies of one file from interleaving.
"""

from __future__ import annotations

import errno as errno_mod
import functools
import json
import logging
import os
import select
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from . import __version__
from .config import Config
from .copy import Outcome, Result, SourceDir, sync_file
from .homes import Home, HomeRefused, home_qualifies, list_homes, open_sessions_dir
from .logfmt import fields
from .metrics import Metrics
from .notify import Notifier, watchdog_interval
from .reconcile import PassStats, reconcile, store_for
from .safefs import Refused, close_quietly, escape, open_root_dir
from .state import AtomicFile, LastError, render_state
from .store import Store, UserStore, lookup_gid
from .watch import Watcher
from .workqueue import WorkQueue

__all__ = ["Service", "run_service"]

log = logging.getLogger(__name__)

POLL_SECONDS = 5.0  # new homes whose owner or sessions directory came late
DEGRADED_SECONDS = 30.0  # fallback scan of directories that could not be watched
PUBLISH_SECONDS = 1.0  # state file at most this often (when it changed)
HEARTBEAT_SECONDS = 15.0  # ... and at least this often, so a reader can tell it is alive
PACE_BYTES_PER_SECOND = 40e6  # a copy of N bytes waits N / this before the next one
STOP_SECONDS = 10.0  # in-flight copies may finish within this on SIGTERM
# A failed copy (ENOSPC, EIO, ...) is tried again after 2 s, then after as long as it has
# been failing (so about 4, 8, ...), at most a minute (`retry_delay`): a session that went
# idle while the store was full still lands soon after space is back.
RETRY_FIRST_SECONDS = 2.0
RETRY_MAX_SECONDS = 60.0


@dataclass
class Totals:
    """Since start; read by STATUS= and the state file. File outcomes are tallied by the
    pass's own `PassStats.record`, so the two never disagree on what counts as what."""

    files: PassStats = field(default_factory=PassStats)
    overflows: int = 0
    passes: int = 0

    def as_dict(self) -> dict[str, int]:
        f = self.files
        return {
            "copies": f.files_copied,
            "bytes": f.bytes_copied,
            "refusals": f.files_refused,
            "failures": f.files_failed,
            "overflows": self.overflows,
            "passes": self.passes,
        }


class _StopEvent(threading.Event):
    """A stop Event a signal handler can raise without taking a lock (`ask`): `is_set`
    sees it at once; the control loop then sets it for real."""

    _asked = False

    def ask(self) -> None:
        self._asked = True

    def is_set(self) -> bool:
        return self._asked or super().is_set()


class _Wakeup:
    """What the control loop sleeps on: a self-pipe that other threads write to (`set`)
    and that the interpreter writes to from C when a signal arrives (`set_wakeup_fd`), so
    waking the loop for a signal takes no Python-level lock."""

    def __init__(self) -> None:
        self._r, self.fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def set(self) -> None:
        try:
            os.write(self.fd, b"\0")
        except BlockingIOError:  # full: the loop has plenty to wake up for
            pass

    def wait(self, timeout: float) -> None:
        select.select([self._r], [], [], timeout)

    def clear(self) -> None:
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass


class Service:
    def __init__(self, config: Config, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.config = config
        self.notifier = Notifier.from_environ(env)
        self.watchdog_every = watchdog_interval(env, os.getpid())
        self.totals = Totals()
        self.last_pass: PassStats | None = None
        self.last_pass_at: float | None = None
        self.started_at = time.time()
        self.ready = False
        self.metrics = Metrics(config.metrics_file)
        self.state_file = AtomicFile(config.state_file, "state file", PUBLISH_SECONDS)
        self.last_error = LastError()
        self._published: tuple[str, float] = ("", float("-inf"))
        self._lock = threading.Lock()
        self._stop = _StopEvent()
        self._wake = _Wakeup()
        self._signals: deque[int] = deque()
        self._rescan = threading.Event()
        self._pass_wake = threading.Event()
        self._pass_users: set[str] | None = set()  # None = a full pass is asked for
        self._pass_asked = False
        self._degraded: set[str] = set()
        self._refused: dict[str, str] = {}
        self.store = Store(config, lookup_gid(config.group))  # replaced by each full pass
        self.queue = WorkQueue(self._copy, workers=config.workers)
        self._failed: dict[Hashable, float] = {}  # key -> when its copies started failing
        self.watcher = Watcher(config, self._on_file, self._on_change, self._on_overflow)
        self._root_ident: tuple[int, int] | None = None  # the home root the poll last saw
        self._pass_thread = threading.Thread(target=self._passes, name="pass", daemon=True)

    # --- callbacks from other threads ----------------------------------------------------

    def _on_file(self, user: str, name: str, when: float | None, delay: float) -> None:
        self.queue.submit((user, name), trigger=when, delay=delay)

    def _on_change(self) -> None:
        self._rescan.set()
        self._wake.set()

    def _on_overflow(self, users: set[str] | None) -> None:
        """A kernel queue overflowed: the events of `users` (None: everyone) were lost.
        Their files are passed over, and the watches checked by a rescan (a lost
        IN_DELETE_SELF would leave a watch on a directory that is gone)."""
        with self._lock:
            self.totals.overflows += 1
        self.metrics.overflows.inc()
        if users is None:
            log.warning("inotify queue overflowed: events were lost; starting a full pass")
        else:
            log.warning(
                "inotify queue overflowed: events of %d users were lost; starting a pass over them",
                len(users),
            )
        if users is None or users:
            self.request_pass(users)
        self._on_change()

    def request_pass(self, users: set[str] | None) -> None:
        """Ask the pass thread for a pass over `users` (None: every home)."""
        with self._lock:
            if users is None or self._pass_users is None:
                self._pass_users = None
            else:
                self._pass_users |= users
            self._pass_asked = True
        self._pass_wake.set()

    def _signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes of the main thread, which may hold any lock (ours, an
        # Event's, logging's), and runs inside itself when signals come fast: taking a
        # lock here deadlocks. So only record; the wakeup fd wakes the control loop.
        self._signals.append(signum)
        if signum != signal.SIGHUP:
            self._stop.ask()  # also ends the initial pass early

    def _take_signals(self) -> None:
        while self._signals:
            signum = self._signals.popleft()
            if signum == signal.SIGHUP:
                log.info("SIGHUP: starting a full pass")
                self.request_pass(None)
            else:
                log.info("%s: stopping", signal.Signals(signum).name)
                self._stop.set()

    # --- the copy a worker runs ----------------------------------------------------------

    def _copy(self, key: Hashable, trigger: float | None) -> float | None:
        assert isinstance(key, tuple)
        user, name = key[0], key[1]
        result = self._copy_one(user, name, trigger)
        if result is None:
            self._retry_after(key, None)
            return None
        self._count(result)
        if result.outcome is Outcome.COPIED:
            # Copies of a big hot file are spaced by their size too, so a 20 MB transcript
            # closed every 100 ms is copied about twice a second, not ten times.
            self.queue.pace(key, result.nbytes / PACE_BYTES_PER_SECOND)
        retry = self._retry_after(key, result)
        if retry is not None:
            return retry
        if result.recheck_at is not None:
            return max(0.0, result.recheck_at - time.time())
        return None

    def _copy_one(self, user: str, name: str, trigger: float | None) -> Result | None:
        cfg = self.config
        home_fd: int | None = None
        source: SourceDir | None = None
        store_fd: int | None = None
        user_store: UserStore | None = None
        try:
            home_fd = open_root_dir(cfg.home_root)
            try:
                st = os.stat(user, dir_fd=home_fd, follow_symlinks=False)
            except FileNotFoundError:
                return None
            if not home_qualifies(user, st, cfg):
                return None
            try:
                source = open_sessions_dir(home_fd, Home(user, st.st_uid), cfg)
            except HomeRefused as e:
                log.warning("refused user %s: %s", escape(user), e, extra=fields(user))
                return None
            if source is None:
                return None
            try:
                store_fd = self.store.open_root(create=True)
            except Refused as e:  # the store root swapped for a symlink: never followed
                raise OSError(errno_mod.ELOOP, f"store root: {e.reason}") from None
            user_store = UserStore(self.store, store_fd, user)
            return sync_file(cfg, source, user_store, name, now=time.time(), since=trigger)
        except OSError as e:
            log.error(
                "failed %s: %s",
                escape(f"{user}/{name}"),
                e,
                extra=fields(user, name, errno=errno_name(e.errno)),
            )
            return Result(Outcome.FAILED, detail=str(e), errno=e.errno)
        finally:
            if user_store is not None:
                user_store.close()
            close_quietly(store_fd)
            if source is not None:
                os.close(source.fd)
            close_quietly(home_fd)

    def _retry_after(self, key: Hashable, result: Result | None) -> float | None:
        """Seconds until a failed copy is tried again (None: it did not fail).

        The wait grows with how long the file has been failing (2 s, then about doubling
        with each timed retry, at most a minute), not with how many times: a writer that
        closes every 100 ms while the store is full for two seconds must not push its
        file's next try a minute past the moment space comes back."""
        now = time.monotonic()
        with self._lock:
            if result is None or result.outcome is not Outcome.FAILED:
                self._failed.pop(key, None)
                return None
            since = self._failed.setdefault(key, now)
        return retry_delay(now - since)

    def _count(self, result: Result) -> None:
        self.metrics.record(result)
        self.totals.files.record(result)  # PassStats: locked on its own

    # --- passes ----------------------------------------------------------------------------

    def _on_pass_result(self, source: SourceDir, name: str, result: Result) -> None:
        self._count(result)
        key = (source.user, name)
        retry = self._retry_after(key, result)
        if retry is not None:
            self.queue.submit(key, delay=retry)
        elif result.recheck_at is not None:
            self.queue.submit(key, delay=max(0.0, result.recheck_at - time.time()))

    def run_pass(self, users: set[str] | None) -> PassStats:
        if users is None:
            self._rescan.set()  # a full pass also re-checks which directories are watched
            self._wake.set()
            # The group may have been created since start: each full pass looks again.
            self.store = store_for(self.config)
        stats = reconcile(
            self.config,
            on_result=self._on_pass_result,
            only=users,
            stop=self._stop,
            store=self.store,
        )
        self.metrics.record_pass(stats, full=users is None)
        with self._lock:
            self.totals.passes += 1
            if users is None:
                self.last_pass = stats
                self.last_pass_at = time.time()
        self._status()
        return stats

    def _passes(self) -> None:
        interval = self.config.reconcile_interval
        next_full = time.monotonic() + interval if interval else None
        while not self._stop.is_set():
            timeout = None if next_full is None else max(0.0, next_full - time.monotonic())
            self._pass_wake.wait(timeout)
            self._pass_wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                asked, users = self._pass_asked, self._pass_users
                self._pass_asked, self._pass_users = False, set()
            if not asked:
                users = None  # the periodic timer
            if users is None and next_full is not None:
                next_full = time.monotonic() + interval
            try:
                self.run_pass(users)
            except OSError as e:  # an unusable root this time; the next pass tries again
                log.error("pass failed: %s", e)
            except Exception:  # a bug: the traceback is what a developer needs
                log.exception("pass failed")

    # --- watches ---------------------------------------------------------------------------

    def rescan(self, *, full: bool) -> None:
        """Bring the set of watches in line with the homes on disk.

        Full: every qualifying home is walked (after home-root events and with every full
        pass). Not full (the 5 s poll): only homes not watched yet, so that a home whose
        owner was set after `useradd` created it, or whose sessions directory came later,
        is picked up without walking thousands of watched homes every few seconds.
        """
        cfg = self.config
        if full:
            self.watcher.drop_dead()  # a watch whose emitter ended is watched afresh
        self.watcher.reap()  # deleted or moved away: unscheduled, re-added below if back
        watched = self.watcher.users()
        found: dict[str, tuple[int, int]] = {}
        home_fd = open_root_dir(cfg.home_root)
        try:
            full = self._root_changed(home_fd) or full
            for home in list_homes(home_fd, cfg) if full else self._unwatched(home_fd, found):
                ident = self._walk(home_fd, home)
                if ident is not None:
                    found[home.name] = ident
        finally:
            os.close(home_fd)
        new_users: set[str] = set()
        for user, ident in watched.items():
            if found.get(user) != ident:
                log.info("sessions directory of %s went or changed; unwatching it", escape(user))
                self.watcher.remove(user)
        for user in list(self._degraded):
            if user not in found:
                self._degraded.discard(user)
        # One copy of the watched set, not one per home: at 5,000 homes a lookup per home
        # rebuilt the whole map each time (25 M steps every 5 s poll, 20% of a core idle).
        current = self.watcher.users()
        for user, ident in found.items():
            if user in current or user in self._degraded:
                continue
            if self.watcher.add(user, ident):
                log.info("watching %s", escape(self.watcher.sessions_path(user)))
            else:
                self._degraded.add(user)
            new_users.add(user)
        self.watcher.settle(self._degraded)
        if new_users and self._started:
            self.request_pass(new_users)  # copy what is already there

    def _root_changed(self, home_fd: int) -> bool:
        """Whether the home root just opened is not the one watched (replaced: `mv /home
        /home.old` and a new /home; or its watch went with it): then it is watched again
        and every home walked again, since the poll trusts watched homes by name."""
        st = os.fstat(home_fd)
        ident = (st.st_dev, st.st_ino)
        if ident == self.watcher.root_ident():
            self._root_ident = ident
            return False
        replaced = ident != self._root_ident
        if replaced and self._root_ident is not None:
            log.info("the home root was replaced; watching the new one, walking every home")
        self._root_ident = ident
        return self.watcher.watch_root(ident) or replaced

    def _unwatched(self, home_fd: int, found: dict[str, tuple[int, int]]) -> Iterator[Home]:
        """The poll's view: names only for the homes already watched or degraded (they
        go into `found` as they are; a full rescan re-checks their owners), an lstat only
        for the others. At 5,000 watched homes this is one directory listing every 5 s
        instead of 5,000 lstats (the bench's idle-CPU target)."""
        watched = self.watcher.users()
        with os.scandir(home_fd) as it:
            names = [e.name for e in it if not e.name.startswith(".")]
        for name in names:
            if name in watched:
                found[name] = watched[name]
            elif name in self._degraded:
                found[name] = (0, 0)
            else:
                try:
                    st = os.stat(name, dir_fd=home_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if home_qualifies(name, st, self.config):
                    yield Home(name, st.st_uid)

    def _walk(self, home_fd: int, home: Home) -> tuple[int, int] | None:
        try:
            source = open_sessions_dir(home_fd, home, self.config)
        except HomeRefused as e:
            if self._refused.get(home.name) != str(e):
                log.warning("refused user %s: %s", escape(home.name), e, extra=fields(home.name))
                self._refused[home.name] = str(e)
            return None
        except OSError as e:
            log.warning("cannot open sessions of %s: %s", escape(home.name), e)
            return None
        self._refused.pop(home.name, None)
        if source is None:
            return None
        try:
            st = os.fstat(source.fd)
            return (st.st_dev, st.st_ino)
        finally:
            os.close(source.fd)

    def _retry_degraded(self) -> None:
        """Try to watch the degraded directories again; scan the ones that still fail."""
        if not self._degraded:
            return
        users = set(self._degraded)
        home_fd = open_root_dir(self.config.home_root)
        try:
            for user in list(self._degraded):
                try:
                    st = os.stat(user, dir_fd=home_fd, follow_symlinks=False)
                except FileNotFoundError:
                    self._degraded.discard(user)
                    continue
                ident = self._walk(home_fd, Home(user, st.st_uid))
                if ident is None:
                    self._degraded.discard(user)
                elif self.watcher.add(user, ident):
                    # One INFO when the last one is back (the watcher's), not one each.
                    log.debug("watching %s again", escape(self.watcher.sessions_path(user)))
                    self._degraded.discard(user)
        finally:
            os.close(home_fd)
        self.watcher.settle(self._degraded)
        # Those now watched get one pass to catch up, those still degraded their scan.
        self.request_pass(users)

    # --- main loop -------------------------------------------------------------------------

    _started = False

    def _status(self) -> None:
        with self._lock:
            p = self.last_pass
            t = self.totals.files
            text = (
                f"watching {self.watcher.count()} users"
                + (f", {len(self._degraded)} by scan" if self._degraded else "")
                + f"; since start {t.files_copied} copied, {t.files_refused} refused, "
                f"{t.files_failed} failed"
            )
            if p is not None:
                text += (
                    f"; last pass {p.files_copied} copied, {p.files_skipped} skipped, "
                    f"{p.files_failed} failed"
                )
        self.notifier.send("STATUS=" + text)

    def state(self) -> dict[str, Any]:
        """The state file's document: what `session-watcher status` shows as our view."""
        with self._lock:
            p = self.last_pass
            last_pass = None
            if p is not None:
                last_pass = {"at": self.last_pass_at, **p.as_dict()}
            totals = self.totals.as_dict()
        return {
            "version": __version__,
            "pid": os.getpid(),
            "running": not self._stop.is_set(),
            "ready": self.ready,
            "started_at": round(self.started_at, 3),
            "home_root": str(self.config.home_root),
            "target": str(self.config.target),
            "users_watched": self.watcher.count(),
            "degraded": sorted(self.watcher.sessions_path(u) for u in self._degraded),
            "last_pass": last_pass,
            "totals": totals,
            "last_error": self.last_error.last,
        }

    def publish(self, *, force: bool = False) -> None:
        """State file when it changed (at most once a second) or every 15 s; metrics file
        every 15 s. Runs on the control thread (it owns the degraded set)."""
        now = time.monotonic()
        self.metrics.watched_users.set(self.watcher.count())
        self.metrics.degraded.set(len(self._degraded))
        self.metrics.ready.set(1 if self.ready and not self._stop.is_set() else 0)
        self.metrics.write(now=now, force=force)
        doc = self.state()
        key = json.dumps(doc, sort_keys=True)
        last_key, last_at = self._published
        if not force and key == last_key and now - last_at < HEARTBEAT_SECONDS:
            return
        doc["updated_at"] = round(time.time(), 3)
        if self.state_file.write(lambda: render_state(doc), now=now, force=force):
            self._published = (key, now)

    def _healthy(self) -> bool:
        return self.watcher.alive() and self.queue.alive() and self._pass_thread.is_alive()

    def run(self) -> int:
        cfg = self.config
        log.info(
            "session-watcher %s starting: %s -> %s",
            __version__,
            escape(str(cfg.home_root)),
            escape(str(cfg.target)),
        )
        signal.set_wakeup_fd(self._wake.fd, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._signal)
        self.last_error.install()
        self.queue.start()
        self.watcher.start()
        try:
            self.publish(force=True)
            self.rescan(full=True)  # watches first, so nothing closed during the pass is lost
            self._started = True
            first = self.run_pass(None)
            log.info(
                "ready: watching %d users (%d files copied at start)",
                self.watcher.count(),
                first.files_copied,
            )
            self._pass_thread.start()
            self.ready = True
            self.notifier.send("READY=1")
            self._status()
            self.publish(force=True)
            self._loop()
        finally:
            self.notifier.send("STOPPING=1")
            log.info("stopping")
            self._stop.set()
            self._pass_wake.set()
            self.watcher.stop()
            # One budget for both: the workers' copies and the pass's current file.
            deadline = time.monotonic() + STOP_SECONDS
            clean = self.queue.stop(STOP_SECONDS)
            if self._pass_thread.is_alive():
                self._pass_thread.join(max(0.0, deadline - time.monotonic()))
                clean = clean and not self._pass_thread.is_alive()
            signal.set_wakeup_fd(-1)
            self.notifier.close()
            if not clean:
                log.warning("copies still running after %.0f s; exiting anyway", STOP_SECONDS)
            self.publish(force=True)  # running: false, ready: 0
            self.last_error.uninstall()
        log.info("stopped")
        return 0

    def _guarded(self, what: str, step: Callable[[], None]) -> None:
        """One step of the control loop: whatever goes wrong is one line, and the loop (so
        the WATCHDOG=1 pings, signals, rescans) carries on. The home root renamed away for
        a moment, EMFILE, a bug: none of it may end the service."""
        try:
            step()
        except OSError as e:
            log.error("cannot %s: %s", what, e)
        except Exception:
            log.exception("cannot %s", what)

    def _loop(self) -> None:
        now = time.monotonic()
        next_poll = now + POLL_SECONDS
        next_degraded = now + DEGRADED_SECONDS
        next_ping = now
        while True:
            self._take_signals()
            if self._stop.is_set():
                break
            self._guarded("publish the state", self.publish)
            now = time.monotonic()
            if self.watchdog_every is not None and now >= next_ping:
                if self._healthy():
                    self.notifier.send("WATCHDOG=1")
                else:
                    log.error(
                        "a thread died (an inotify reader, a copy worker or the pass); "
                        "withholding WATCHDOG=1"
                    )
                next_ping = now + self.watchdog_every
            if self._rescan.is_set() or now >= next_poll:
                full = self._rescan.is_set()
                self._rescan.clear()
                self._guarded("scan the home root", functools.partial(self.rescan, full=full))
                next_poll = now + POLL_SECONDS
                self.queue.prune()
            if now >= next_degraded:
                self._guarded("scan the degraded directories", self._retry_degraded)
                next_degraded = now + DEGRADED_SECONDS
            deadline = min(next_poll, next_degraded, now + PUBLISH_SECONDS)
            if self.watchdog_every is not None:
                deadline = min(deadline, next_ping)
            self._wake.wait(max(0.0, deadline - time.monotonic()))
            self._wake.clear()


def retry_delay(failing_for: float) -> float:
    """Wait before the next try of a copy that has been failing for `failing_for` seconds:
    2 s at first, then as long as it has been failing (so about doubling), at most 60 s."""
    return min(RETRY_MAX_SECONDS, max(RETRY_FIRST_SECONDS, failing_for))


def errno_name(code: int | None) -> str:
    return errno_mod.errorcode.get(code or 0, "unknown")


def run_service(config: Config) -> int:
    return Service(config).run()
