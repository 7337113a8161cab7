"""`session-watcher run`: the parts wired together, signals, and the control loop.

Parts (each in its own module, each given what it calls back, none importing this one):
- `Watcher` (watch.py): inotify through watchdog; events become (user, name) work items;
- `LiveCopier` (live.py): the work queue's handler, fair between users, with retries and
  each user's byte budget;
- `Walker` (passes.py): the one thread that walks homes: passes, rescans, degraded retries;
- `WatchSet` (watchset.py): which sessions directories are watched, kept in line with disk;
- `Reporter` (reporter.py): totals, STATUS=, the state file, the metrics file;
- `StuckGuard` (stuck.py): which users' file systems do not answer; their threads replaced.

Threads: the main thread is the control loop (signals, timers, WATCHDOG=1, the state file,
the stuck sweep). It never touches a user's directory, so a file system that blocks cannot
hold it, and SIGTERM always ends the service within its stop budget. All copies, from
events or passes, go through `copy.sync_file`, whose per-file lock keeps two copies of one
file from interleaving.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from types import FrameType

from . import __version__
from .config import Config
from .copy import Result, SourceDir
from .live import LiveCopier, Wiring
from .logfmt import fields
from .notify import Notifier, watchdog_interval
from .passes import Walker, WalkerJobs
from .ratelimit import LogLimiter
from .reconcile import reconcile, store_for
from .reporter import PUBLISH_SECONDS, Reporter, View
from .safefs import escape
from .store import Store
from .stuck import StuckGuard
from .watch import Watcher
from .watchset import WatchSet

__all__ = ["Service", "run_service"]

log = logging.getLogger(__name__)

POLL_SECONDS = 5.0  # new homes whose owner or sessions directory came late
DEGRADED_SECONDS = 30.0  # fallback scan of directories that could not be watched
STOP_SECONDS = 10.0  # in-flight copies may finish within this on SIGTERM
SWEEP_SECONDS = 1.0  # how often the control loop looks for stuck users


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
    def __init__(
        self,
        config: Config,
        environ: Mapping[str, str] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        env = os.environ if environ is None else environ
        self.config = config
        self._clock = clock
        self.notifier = Notifier.from_environ(env)
        self.watchdog_every = watchdog_interval(env, os.getpid())
        self.ready = False
        self.stuck_exit = False  # threads left blocked in the kernel at stop
        self._stop = _StopEvent()
        self._wake = _Wakeup()
        self._signals: deque[int] = deque()
        self._first_pass = threading.Event()
        self.limiter = LogLimiter()
        self.guard = StuckGuard(config.stuck_after, clock=clock)
        # Replaced by each full pass. An object store connects (and takes the state
        # directory's instance lock) here: a second instance exits 2 at start.
        self.store: Store = store_for(config, paced=True, limiter=self.limiter)
        self.walker = Walker(
            WalkerJobs(self.run_pass, self._rescan, self._retry_degraded),
            self._stop,
            interval=config.reconcile_interval,
            clock=clock,
        )
        nested = config.depth > 1
        self.live = LiveCopier(
            config,
            Wiring(
                store=lambda: self.store,
                count=self._count,
                watch_dir=(lambda s, st: self.watcher.add_nested(s, st)) if nested else None,
                no_dir=(lambda u, r: self.watcher.note_absent(u, r)) if nested else None,
            ),
            self.guard,
            self.limiter,
            clock=clock,
            on_shed=self._on_shed,
        )
        self.queue = self.live.queue
        self.watcher = Watcher(
            config,
            self.live.submit,
            self._on_change,
            self._on_overflow,
            on_dir=self.live.submit_dir if nested else None,
        )
        self.watchset = WatchSet(
            config, self.watcher, self.guard.io, self.limiter, self.walker.request_pass
        )
        self.reporter = Reporter(
            config,
            self.notifier,
            View(
                watched=self.watcher.count,
                degraded=self.watchset.degraded,
                stuck=self.guard.stuck,
                over_quota=lambda: self.store.over_quota(),
                running=lambda: not self._stop.is_set(),
                ready=lambda: self.ready,
            ),
        )

    # --- callbacks from other threads ----------------------------------------------------

    def _count(self, result: Result) -> None:
        self.reporter.count(result)

    def _on_change(self) -> None:
        self.walker.request_rescan(full=True)

    def _on_shed(self, user: object) -> None:
        # Called once the user's pending keys are taken after some were shed (see
        # workqueue.py): the pass starts after the last key shed, so it lists it.
        name = str(user)
        self.limiter.log(
            log,
            logging.WARNING,
            name,
            "shed",
            "user %s has too many files waiting; serving them by a pass",
            escape(name),
            extra=fields(name, reason="shed"),
        )
        self.walker.request_pass({name})

    def _on_overflow(self, users: set[str] | None) -> None:
        """A kernel queue overflowed: the events of `users` (None: the home root's queue,
        so anyone's) were lost. Their files are passed over, and their watches checked (a
        lost IN_DELETE_SELF would leave a watch on a directory that is gone)."""
        self.reporter.overflow()
        if users is None:
            # Not a user's line, but one user's flood may cause it several times a second.
            self.limiter.log(
                log,
                logging.WARNING,
                "",
                "overflow",
                "inotify queue overflowed: events were lost; starting a full pass",
            )
            self.walker.request_pass(None, overflow=True)
            return
        self.limiter.log(
            log,
            logging.WARNING,
            "",
            "overflow",
            "inotify queue overflowed: events of %d users were lost; starting a pass over them",
            len(users),
        )
        if users:
            self.walker.request_rescan(full=False, users=users)
            self.walker.request_pass(users)

    def request_pass(self, users: set[str] | None) -> None:
        """Ask the walker for a pass over `users` (None: every home)."""
        self.walker.request_pass(users)

    def _signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes of the main thread, which may hold any lock (ours, an
        # Event's, logging's), and runs inside itself when signals come fast: taking a
        # lock here deadlocks. So only record; the wakeup fd wakes the control loop.
        self._signals.append(signum)
        if signum != signal.SIGHUP:
            self._stop.ask()  # also ends a pass early

    def _take_signals(self) -> None:
        while self._signals:
            signum = self._signals.popleft()
            if signum == signal.SIGHUP:
                log.info("SIGHUP: starting a full pass")
                self.walker.request_pass(None)
            else:
                log.info("%s: stopping", signal.Signals(signum).name)
                self._stop.set()

    # --- the walker's jobs -----------------------------------------------------------------

    def _rescan(self, full: bool, users: set[str] | None) -> None:
        self.watchset.rescan(full=full, users=users)

    def _retry_degraded(self) -> None:
        self.watchset.retry_degraded()

    def run_pass(self, users: set[str] | None) -> None:
        full = users is None
        if full:
            # A full pass also re-checks which directories are watched (watches first, so
            # nothing closed during the pass is lost), and looks the group up again: it
            # may have been created since start.
            self.watchset.rescan(full=True)
            # A quota episode goes on across passes (no second WARNING); an object store
            # keeps its connection, and LISTs again.
            self.store = store_for(
                self.config, previous=self.store, paced=True, limiter=self.limiter
            )
            if self.config.depth > 1 and not self._first_pass.is_set():
                # A nested layout is ready once every project directory is watched: its
                # first pass (1,000 users x 30 projects: 1.5 million files) goes on after
                # READY=1, watching active sessions as it walks them.
                n = self.watchset.watch_first_level(self._stop.is_set)
                if not self._stop.is_set():
                    self._ready(
                        f"ready: watching {self.watcher.count()} users and {n} directories "
                        "below theirs (the first pass goes on)"
                    )
        stats = reconcile(
            self.config,
            on_result=self._on_pass_result,
            only=users,
            stop=self._stop,
            store=self.store,
            limiter=self.limiter,
            guard=self.guard.io,
            beat=self.guard.beat,
            watches=self.watcher if self.config.depth > 1 else None,
            # Within each user's byte budget, like a live copy: an overflow repair over a
            # user who renamed in 200,000 files must not make the service fsync at disk
            # speed on everyone's disk, nor (the first pass after a restart) put 3,000
            # objects of one user before anyone else's. What is over goes to the live
            # queue, up to its bound per user; there the walk of that user stops and the
            # rest is owed a pass once the queue has taken those (`WorkQueue.owe`), and the
            # queue rests a user whose copies are spent. A user with more than the burst
            # (1,000 copies) to catch up at start gets the rest at 100 copies a second.
            # Measured: python -m bench.noisy --only burst (victim p99 17.8 ms on tmpfs,
            # 20.3 ms on disk; 27 / 90 ms with passes at disk speed).
            admit=self.live.budget.admit,
            held_full=self.queue.owe,
        )
        self.reporter.pass_done(stats, full=full)
        if full and not self._first_pass.is_set() and not self._stop.is_set():
            self._ready(
                f"ready: watching {self.watcher.count()} users and "
                f"{self.watcher.nested_count()} directories below theirs "
                f"({stats.files_copied} files copied at start)"
            )

    def _ready(self, line: str) -> None:
        self.watchset.started = True
        log.info("%s", line)
        self._first_pass.set()
        self._wake.set()

    def _on_pass_result(self, source: SourceDir, name: str, result: Result) -> None:
        self.reporter.count(result)
        self.live.after_pass(source, name, result)

    # --- main loop -------------------------------------------------------------------------

    def _healthy(self) -> bool:
        return self.watcher.alive() and self.queue.alive() and self.walker.alive()

    def _sweep(self) -> None:
        """Users whose I/O has not come back: replace the threads they hold."""
        for _user, thread in self.guard.sweep():
            if thread is self.walker.thread:
                self.guard.retire(thread)
                self.walker.replace()
        blocked = self.guard.blocked_threads()
        self.queue.set_extra(sum(1 for t in blocked if t.name.startswith("copy-")))

    def run(self) -> int:
        cfg = self.config
        log.info(
            "session-watcher %s starting: %s -> %s",
            __version__,
            escape(str(cfg.home_root)),
            escape(cfg.target_text),
        )
        signal.set_wakeup_fd(self._wake.fd, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._signal)
        self.reporter.last_error.install()
        self.queue.start()
        self.watcher.start()
        try:
            self.reporter.publish(force=True)
            # The first rescan and pass run on the walker, so that a user whose file
            # system blocks at start holds the walker (which is replaced), not start-up.
            self.walker.request_pass(None)
            self.walker.start()
            self._loop()
        finally:
            self.notifier.send("STOPPING=1")
            log.info("stopping")
            self._stop.set()
            self.walker.wake()
            self.watcher.stop()
            # One budget for both: the workers' copies and the walker's current file.
            deadline = time.monotonic() + STOP_SECONDS
            blocked = self.guard.blocked_threads()  # in a stuck file system: not waited for
            clean = self.queue.stop(STOP_SECONDS, abandon=blocked)
            if self.walker.thread not in blocked:
                clean = self.walker.join(max(0.0, deadline - time.monotonic())) and clean
            signal.set_wakeup_fd(-1)
            # Not only when the joins above timed out: a walker or worker replaced while
            # stuck is no longer joined, and a pass's pool thread blocked in the kernel
            # would hold the interpreter's exit (it joins that pool) for ever.
            blocked = self.guard.blocked_threads()
            self.stuck_exit = bool(blocked) or self.guard.in_flight() > 0
            if not clean or self.stuck_exit:
                log.warning(
                    "copies still running after %.0f s (%d threads blocked in a stuck file "
                    "system); exiting anyway",
                    STOP_SECONDS if not clean else 0,
                    len(blocked),
                )
            self.reporter.publish(force=True)  # running: false, ready: 0
            if clean:
                self.store.close()
            self.notifier.close()
            self.reporter.last_error.uninstall()
        log.info("stopped")
        return 0

    def _guarded(self, what: str, step: Callable[[], None]) -> None:
        """One step of the control loop: whatever goes wrong is one line, and the loop (so
        the WATCHDOG=1 pings, signals, rescans) carries on."""
        try:
            step()
        except OSError as e:
            log.error("cannot %s: %s", what, e)
        except Exception:
            log.exception("cannot %s", what)

    def _became_ready(self) -> None:
        # Not when a SIGTERM came during the first pass: READY=1 then STOPPING=1 would
        # tell systemd a service is up that is already on its way down.
        if self._stop.is_set():
            return
        self.ready = True
        self.notifier.send("READY=1")
        self.reporter.status()
        self.reporter.publish(force=True)

    def _loop(self) -> None:
        now = self._clock()
        next_poll = now + POLL_SECONDS
        next_degraded = now + DEGRADED_SECONDS
        next_ping = now
        next_sweep = now + SWEEP_SECONDS
        while True:
            self._take_signals()
            if self._stop.is_set():
                break
            if not self.ready and self._first_pass.is_set():
                self._became_ready()
            self._guarded("publish the state", self.reporter.publish)
            now = self._clock()
            if self.watchdog_every is not None and now >= next_ping:
                if self._healthy():
                    self.notifier.send("WATCHDOG=1")
                else:
                    log.error(
                        "a thread died (an inotify reader, a copy worker or the walker); "
                        "withholding WATCHDOG=1"
                    )
                next_ping = now + self.watchdog_every
            if now >= next_sweep:
                self._guarded("look for stuck users", self._sweep)
                next_sweep = now + SWEEP_SECONDS
            if now >= next_poll:
                self.walker.request_rescan(full=False)
                next_poll = now + POLL_SECONDS
                self.queue.prune()
            if now >= next_degraded:
                self.walker.request_degraded()
                next_degraded = now + DEGRADED_SECONDS
            deadline = min(next_poll, next_degraded, next_sweep, now + PUBLISH_SECONDS)
            if self.watchdog_every is not None:
                deadline = min(deadline, next_ping)
            self._wake.wait(max(0.0, deadline - self._clock()))
            self._wake.clear()


# The GIL is handed over every 5 ms by default: a thread reading one user's flood of
# events (a close loop overflows its inotify queue several times a second) then holds
# another user's event, copy and log call up to 5 ms at each step. 1 ms keeps a victim's
# copy within a few ms of its quiet-machine time; the cost is more switches under load.
SWITCH_INTERVAL = 0.001


def run_service(config: Config) -> int:
    sys.setswitchinterval(SWITCH_INTERVAL)
    service = Service(config)
    code = service.run()
    if service.stuck_exit:
        # Threads blocked in a stuck file system can never be joined, and the interpreter's
        # exit would wait for the pass's worker pool: leave now, logs flushed.
        logging.shutdown()
        os._exit(code)
    return code
