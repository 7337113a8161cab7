"""The target side: the store root and its per-user directories, walked without following links.

This is the directory implementation of the store seam; objstore.py is the object-store one
(subclasses of `Store` and `UserStore`). `copy.sync_file` asks a UserStore what it holds for
a name (`lstat`), whether a version may go in now (`due`), and installs through it."""

from __future__ import annotations

import errno
import fcntl
import grp
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass

from .config import Config
from .logfmt import fields
from .ratelimit import LogLimiter
from .safefs import DIR_FLAGS, Refused, close_quietly, escape, open_dir_at, open_root_dir

__all__ = [
    "TEMP_PREFIX",
    "TEMP_SUFFIX",
    "Store",
    "UserStore",
    "is_stale_temp",
    "is_temp_name",
    "lookup_gid",
]

log = logging.getLogger(__name__)

# Temp files start with a dot and end in .tmp: no `*.jsonl` glob (shell or Python) matches
# them, and the downstream pipeline never sees a partial file.
TEMP_PREFIX = ".session-watcher."
TEMP_SUFFIX = ".tmp"
STALE_TEMP_SECONDS = 3600.0
# A copy takes an flock on its temp file right after the O_EXCL create, before it writes a
# byte, and holds it until the rename (copy._install). So a temp file that holds data and
# that nobody holds a lock on was left by a process that died (kill -9, crash, power cut):
# any pass removes it at once, the restarted service's own first pass included. An empty
# unlocked one may be a live copy in the instant between its create and its flock: it is
# removed once this old, less than the unit's RestartSec=5s.
ORPHAN_TEMP_SECONDS = 2.0


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def is_stale_temp(name: str, st: os.stat_result, now: float) -> bool:
    """A temp file of ours that a crash left behind. ctime, not mtime: the copy sets the
    temp file's mtime to the source's (possibly days old) just before the rename."""
    return (
        is_temp_name(name) and stat.S_ISREG(st.st_mode) and now - st.st_ctime > STALE_TEMP_SECONDS
    )


def lookup_gid(group: str) -> int | None:
    """The store's group id, or None when the group does not exist (the caller warns)."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return None


@dataclass
class Usage:
    """What one user holds in the store: bytes and files (regular, not our temp files)."""

    nbytes: int = 0
    files: int = 0


def over_quota(usage: Usage, grow: int, new_file: bool, config: Config) -> tuple[str, str] | None:
    """Refusal (kind, reason) when a copy that grows the user's store by `grow` bytes (and
    by one file if `new_file`) would take them over `--max-user-bytes` / `--max-user-files`.
    A copy that does not grow the user (a rewrite, a shrink) always goes."""
    if new_file and usage.files + 1 > config.max_user_files:
        return ("quota", f"over the user's limit of {config.max_user_files} files in the store")
    if grow > 0 and usage.nbytes + grow > config.max_user_bytes:
        return (
            "quota",
            f"over the user's limit of {config.max_user_bytes} bytes in the store "
            f"(holds {usage.nbytes})",
        )
    return None


def measure_usage(dir_fd: int, depth: int = 1) -> Usage:
    """One scan of a user's store directory (lstat of each entry, nothing opened but the
    directories below it, down to `depth` levels, each relative to its parent and never
    through a symlink): a nested layout's files count like flat ones.

    The scan reads through a descriptor of its own: `os.scandir(fd)` reads through a dup,
    which shares the directory offset with `dir_fd`, so two threads listing one shared
    descriptor at once (a pass's copy threads, each measuring) would each see part of it
    and count too little."""
    usage = Usage()
    own = os.open(".", DIR_FLAGS, dir_fd=dir_fd)
    try:
        _measure(own, depth, usage)
    finally:
        os.close(own)
    return usage


def _measure(dir_fd: int, depth: int, usage: Usage) -> None:
    subdirs: list[str] = []
    with os.scandir(dir_fd) as it:
        for entry in it:
            if is_temp_name(entry.name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                usage.nbytes += st.st_size
                usage.files += 1
            elif depth > 1 and stat.S_ISDIR(st.st_mode):
                subdirs.append(entry.name)
    for name in subdirs:
        try:
            fd, _ = open_dir_at(dir_fd, name)
        except (Refused, OSError):
            continue  # gone, or a symlink: never followed
        try:
            _measure(fd, depth - 1, usage)
        finally:
            os.close(fd)


class Store:
    """The store root for one pass (or the service's lifetime).

    `gid` None means "leave the group as created" (group missing). In dry-run mode nothing
    is created, so directories that do not exist yet simply read as empty.
    """

    def __init__(
        self,
        config: Config,
        gid: int | None,
        *,
        dry_run: bool = False,
        limiter: LogLimiter | None = None,
    ) -> None:
        self.config = config
        self._limiter = limiter
        self.gid = gid
        self.dry_run = dry_run
        self._mkdir_lock = threading.Lock()
        self._mode_warned = False
        # Per-user usage, measured on a user's first copy and kept up to date by each copy:
        # the service makes a new Store with every full pass, which measures again.
        self._usage: dict[str, Usage] = {}
        self._usage_lock = threading.Lock()
        self._over: set[str] = set()
        self._measure_locks = tuple(threading.Lock() for _ in range(64))

    def reserve(
        self, user: str, dir_fd: int | None, grow: int, new_file: bool
    ) -> tuple[str, str] | None:
        """Check the user's quota for a copy and count it as done (`release` undoes it when
        the copy fails): check and count under one lock, so concurrent copies of one user
        cannot both squeeze under the limit."""
        with self._usage_lock:
            usage = self._usage.get(user)
        if usage is None:
            # Measured outside the usage lock (one user's big directory holds nobody else)
            # but under the user's own, so that concurrent first copies measure once.
            with self._measure_lock(user):
                with self._usage_lock:
                    usage = self._usage.get(user)
                if usage is None:
                    measured = self._measure(user, dir_fd)
                    with self._usage_lock:
                        usage = self._usage.setdefault(user, measured)
        with self._usage_lock:
            why = over_quota(usage, grow, new_file, self.config)
            if why is None:
                usage.nbytes += grow
                usage.files += 1 if new_file else 0
                if (grow > 0 or new_file) and user in self._over:
                    self._over.discard(user)
                    log.info("user %s is under the store limits again", escape(user))
                return None
            if user not in self._over:  # one WARNING per episode, not one per copy
                self._over.add(user)
                # And episodes limited per user: one copy that fits (a shrunk file grown
                # by a byte) ends an episode, and a user can alternate that with one that
                # does not as fast as they like.
                say = self._limiter if self._limiter is not None else LogLimiter(0.0)
                say.log(
                    log,
                    logging.WARNING,
                    user,
                    "quota",
                    "user %s: %s; their new copies are refused",
                    escape(user),
                    why[1],
                    extra=fields(user, reason="quota"),
                )
            return why

    def _measure_lock(self, user: str) -> threading.Lock:
        # Striped: bounded memory whatever the number of users.
        return self._measure_locks[hash(user) % len(self._measure_locks)]

    def close(self) -> None:
        """End of the process's use of the store (an object store's connection and lock)."""

    def _measure(self, user: str, dir_fd: int | None) -> Usage:
        """What `user` holds now (the object store: from its index)."""
        return Usage() if dir_fd is None else measure_usage(dir_fd, self.config.depth)

    def user_store(self, root_fd: int | None, user: str) -> UserStore:
        """One user's part of the store (`root_fd` from `open_root`)."""
        return UserStore(self, root_fd, user)

    def inherit(self, old: Store) -> Store:
        """Carry over who is over their limit from the Store this one replaces (each full
        pass makes a new Store, which measures usage afresh), so that `status` keeps
        showing them and the episode's WARNING is not repeated."""
        with old._usage_lock:
            over = set(old._over)
            usage = {u: Usage(v.nbytes, v.files) for u, v in old._usage.items()}
        with self._usage_lock:
            self._over |= over
            if self.config.depth > 1:
                # A nested store is thousands of directories per user: measured once (by
                # the first pass, `measure`), then kept up to date by every copy, not
                # measured again by every pass (nor by a user's first live copy).
                for u, v in usage.items():
                    self._usage.setdefault(u, v)
        return self

    def measure(self, user: str, dir_fd: int | None) -> None:
        """Measure `user`'s store usage now unless known (the service's passes call it as
        they finish a user with a nested layout: a live copy then never waits for it)."""
        with self._usage_lock:
            if user in self._usage:
                return
        measured = self._measure(user, dir_fd)
        with self._usage_lock:
            self._usage.setdefault(user, measured)

    def over_quota(self) -> list[str]:
        with self._usage_lock:
            return sorted(self._over)

    def release(self, user: str, grow: int, new_file: bool) -> None:
        with self._usage_lock:
            usage = self._usage.get(user)
            if usage is not None:
                usage.nbytes -= grow
                usage.files -= 1 if new_file else 0

    def usage(self, user: str) -> Usage | None:
        with self._usage_lock:
            u = self._usage.get(user)
            return None if u is None else Usage(u.nbytes, u.files)

    def _adopt(self, fd: int, st: os.stat_result, what: str, *, created: bool = False) -> None:
        """Give a store directory our mode and group (after chown: chown may clear setgid).
        An existing directory that differs is corrected with an INFO line: the group may
        have been created after the directory was."""
        want_gid = st.st_gid if self.gid is None else self.gid
        if st.st_gid != want_gid:
            os.fchown(fd, -1, want_gid)
        if stat.S_IMODE(st.st_mode) != self.config.dir_mode or st.st_gid != want_gid:
            os.fchmod(fd, self.config.dir_mode)
            got = stat.S_IMODE(os.fstat(fd).st_mode)
            if got != self.config.dir_mode:
                # Without CAP_FSETID the kernel silently drops the setgid bit when root is
                # not in the directory's group; say so once instead of "fixing" it forever.
                if not self._mode_warned:
                    self._mode_warned = True
                    log.warning(
                        "store directory %s: asked for mode %04o, got %04o "
                        "(setting the setgid bit needs CAP_FSETID)",
                        escape(what),
                        self.config.dir_mode,
                        got,
                    )
            elif not created:
                log.info("store directory %s: set mode %04o, gid %d", escape(what), got, want_gid)

    def open_root(self, *, create: bool) -> int | None:
        """Descriptor of the store root, created (with its parents) when missing and allowed."""
        target = self.config.target
        created = False
        try:
            fd = open_root_dir(target)
        except FileNotFoundError:
            if self.dry_run or not create:
                return None
            os.makedirs(target.parent, mode=0o755, exist_ok=True)
            try:
                os.mkdir(target, 0o700)
                created = True
                log.info("created store root %s", escape(str(target)))
            except FileExistsError:
                pass
            fd = open_root_dir(target)
        except OSError as e:
            # O_NOFOLLOW|O_DIRECTORY on a symlink fails with ENOTDIR on Linux, not ELOOP.
            if e.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(target):
                raise Refused("store root is a symlink") from None
            raise
        if not self.dry_run:
            try:
                self._adopt(fd, os.fstat(fd), str(target), created=created)
            except OSError:
                os.close(fd)
                raise
        return fd

    def open_user_dir(self, root_fd: int, user: str, *, create: bool) -> int | None:
        """Descriptor of `<store>/<user>`; None when it does not exist and may not be made.

        A symlink planted in its place raises Refused: it is never followed or replaced."""
        return self.open_dir(root_fd, user, user, create=create)

    def open_dir(self, parent_fd: int, name: str, label: str, *, create: bool) -> int | None:
        """Descriptor of the store directory `name` in `parent_fd` (`label`: its path for
        the log), made with the store's mode and group when missing and `create`; None
        when it does not exist and may not be made. A symlink or a file in its place
        raises Refused: it is never followed or replaced."""
        try:
            fd, st = open_dir_at(parent_fd, name)
        except FileNotFoundError:
            if self.dry_run or not create:
                return None
            created = False
            with self._mkdir_lock:
                try:
                    os.mkdir(name, 0o700, dir_fd=parent_fd)
                    created = True
                    log.info("created store directory %s", escape(label))
                except FileExistsError:
                    pass
                fd, st = open_dir_at(parent_fd, name)
        else:
            created = False
        if not self.dry_run:
            try:
                self._adopt(fd, st, label, created=created)
            except OSError:
                os.close(fd)
                raise
        return fd

    def remove_stale_temps(self, dir_fd: int, user: str, now: float | None = None) -> int:
        """Delete temp files a crash left in one store directory; returns how many."""
        if self.dry_run:
            return 0
        now = time.time() if now is None else now
        removed = 0
        with os.scandir(dir_fd) as it:
            for entry in it:
                if not is_temp_name(entry.name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                    if is_stale_temp(entry.name, st, now) or (
                        stat.S_ISREG(st.st_mode)
                        and (st.st_size > 0 or now - st.st_ctime > ORPHAN_TEMP_SECONDS)
                        and not _temp_in_use(dir_fd, entry.name)
                    ):
                        os.unlink(entry.name, dir_fd=dir_fd)
                        removed += 1
                        log.info("removed stale temp file %s/%s", escape(user), escape(entry.name))
                except FileNotFoundError:
                    continue
        return removed


def _temp_in_use(dir_fd: int, name: str) -> bool:
    """True when a live copy holds the lock on this temp file (see copy._install)."""
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError:
        return True  # gone, or not ours to judge: leave it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # releases our probe lock
    return False


class UserStore:
    """One user's store directory, opened lazily: a no-op pass over a user whose store
    directory already exists opens it once; a dry run never creates it.

    Keys are paths relative to it: `name.jsonl` (the flat layout) or, with `--depth` over
    1, `proj/sess/subagents/agent-x.jsonl`. The directories of a key are opened (and made,
    for a copy) one component at a time relative to the one above, never through a
    symlink (`parent`); their descriptors are kept until `forget` or `close`."""

    def __init__(self, store: Store, root_fd: int | None, user: str) -> None:
        self.store = store
        self.root_fd = root_fd
        self.user = user
        self._fd: int | None = None
        self._looked = False
        self._lock = threading.Lock()  # a pass's copy threads share one UserStore
        # rel dir -> its descriptor, for the directories below the user directory.
        self._dirs: dict[str, int] = {}

    def fd(self, *, create: bool) -> int | None:
        fd = self._fd
        if fd is not None or not (create or not self._looked):
            return fd
        with self._lock:
            if self._fd is None and (create or not self._looked):
                self._looked = True
                if self.root_fd is None:  # only in a dry run: the store root is not there yet
                    return None
                try:
                    self._fd = self.store.open_user_dir(self.root_fd, self.user, create=create)
                except Refused as e:  # a planted symlink: a failure to deliver, never followed
                    raise OSError(errno.ELOOP, f"store directory is {e.reason}") from None
            return self._fd

    def parent(self, key: str, *, create: bool) -> tuple[int | None, str]:
        """(descriptor of the directory that holds `key`, the key's last component). The
        descriptor is None when a directory on the way does not exist (and `create` is
        false, or this is a dry run). A symlink (or a file) where a directory should be
        raises OSError ELOOP: never followed, never replaced."""
        rel, _, leaf = key.rpartition("/")
        fd = self.fd(create=create)
        if not rel or fd is None:
            return fd, leaf
        with self._lock:
            cached = self._dirs.get(rel)
            if cached is not None:
                return cached, leaf
            parts = rel.split("/")
            at, start = fd, 0
            for i in range(len(parts) - 1, 0, -1):  # the nearest directory above, if open
                above = self._dirs.get("/".join(parts[:i]))
                if above is not None:
                    at, start = above, i
                    break
            for i in range(start, len(parts)):
                done = "/".join(parts[: i + 1])
                try:
                    nxt = self.store.open_dir(at, parts[i], f"{self.user}/{done}", create=create)
                except Refused as e:
                    raise OSError(
                        errno.ELOOP, f"store directory {escape(done)} is {e.reason}"
                    ) from None
                if nxt is None:
                    return None, leaf  # not remembered: a copy may make it any time
                self._dirs[done] = at = nxt
            return at, leaf

    def cached(self, rel: str) -> int | None:
        """The descriptor kept for the store directory `rel`, if one was opened."""
        with self._lock:
            return self._dirs.get(rel)

    def forget(self, rel: str) -> None:
        """Close the descriptors kept for store directories other than `rel` and those
        above it: a pass walking depth first is done with them (a user's store is never
        held open whole; at most --depth descriptors stay)."""
        keep = (
            {"/".join(rel.split("/")[:i]) for i in range(1, rel.count("/") + 2)} if rel else set()
        )
        with self._lock:
            for key in [k for k in self._dirs if k not in keep]:
                close_quietly(self._dirs.pop(key))

    def lstat(self, name: str) -> os.stat_result | None:
        fd, leaf = self.parent(name, create=False)
        if fd is None:
            return None
        try:
            return os.stat(leaf, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def due(
        self, name: str, st: os.stat_result, held: os.stat_result | None, now: float
    ) -> float | None:
        """When a new version may go in: None = now. A directory takes every version at
        once (the object store paces its uploads)."""
        return None

    def reserve(self, grow: int, *, new_file: bool) -> tuple[str, str] | None:
        """The user's quota for a copy that grows their store by `grow` bytes (and a file):
        None and counted, or the refusal (kind, reason)."""
        return self.store.reserve(self.user, self.fd(create=False), grow, new_file)

    def release(self, grow: int, *, new_file: bool) -> None:
        self.store.release(self.user, grow, new_file)

    def close(self) -> None:
        with self._lock:
            for dir_fd in self._dirs.values():
                close_quietly(dir_fd)
            self._dirs.clear()
        close_quietly(self._fd)
        self._fd = None
        self._looked = False
