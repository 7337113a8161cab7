"""THE copy/skip decision for one session file. Every path that copies comes through here.

The live watcher and the reconcile pass differ only in how they find work; both call
`sync_file`, which is safe to call from several threads (calls for the same target
serialise on a lock).
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import fcntl
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from .config import Config
from .logfmt import fields
from .objstore import ObjectUserStore
from .ratelimit import LogLimiter
from .safefs import FILE_FLAGS, Refused, errno_name, escape
from .store import TEMP_PREFIX, TEMP_SUFFIX, UserStore

__all__ = [
    "REFUSAL_KINDS",
    "SPARSE_MIN_BYTES",
    "Outcome",
    "Refusal",
    "Result",
    "SourceDir",
    "install_length",
    "is_hot",
    "is_up_to_date",
    "quick_skip",
    "recheck_time",
    "refusal",
    "sync_file",
]

log = logging.getLogger(__name__)

MAX_TRIES = 3
_TAIL_CHUNK = 64 * 1024
# How far back from the end a hot source is searched for its last newline. A hot file with
# no newline in its last MiB is held back like one with no whole line yet (until it is
# quiet, or the writer's next chunk ends the line): one event never reads more than this.
_TAIL_LIMIT = 1024 * 1024
# Sources larger than this must have at least half their size allocated (see `refusal`).
SPARSE_MIN_BYTES = 1024 * 1024
# A file whose holes take more data/hole transitions than this to count is refused as sparse.
_MAX_EXTENTS = 4096


@dataclass(frozen=True)
class SourceDir:
    """A qualified, opened sessions directory: its home's name, owner and descriptor, and
    the home's device (`dev`): a file on another device is refused unless the operator
    allows crossing mounts (then `dev` is None).

    With `--depth` over 1 it may be a directory below the sessions directory: `rel` is its
    path relative to the sessions directory ("" for the sessions directory itself), each
    component opened relative to its parent and checked (`homes.open_subdir`). A file
    `name` in it is `key(name)` in the store: `<store>/<user>/<rel>/<name>`."""

    user: str
    uid: int
    fd: int
    dev: int | None = None
    rel: str = ""

    def key(self, name: str) -> str:
        return f"{self.rel}/{name}" if self.rel else name

    @property
    def level(self) -> int:
        """1 for the sessions directory, 2 one below it, ...: the level of its files."""
        return self.rel.count("/") + 2 if self.rel else 1


class Outcome(enum.Enum):
    COPIED = "copied"
    SKIPPED = "skipped"  # up to date, or nothing complete to install yet
    VANISHED = "vanished"  # gone before it was opened: not a failure, counted as skipped
    REFUSED = "refused"
    FAILED = "failed"


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    nbytes: int = 0
    detail: str = ""
    # A hot source's unfinished last line was held back: look again at this time
    # (epoch seconds), when the source will count as quiet if nothing else happens.
    recheck_at: float | None = None
    errno: int | None = None
    # Seconds from the triggering event (`since`) to the copy being in place, for metrics.
    latency: float | None = None
    # REFUSED only: the refusal's kind, one of REFUSAL_KINDS (a bounded metrics label).
    kind: str | None = None
    # The source's (device, inode, ctime ns) when it was found up to date or copied: the
    # live service remembers it, so that a later event forces a copy only if the source
    # changed since.
    source_id: tuple[int, int, int] | None = dataclasses.field(default=None, compare=False)


_SKIPPED = Result(Outcome.SKIPPED)  # frozen: one instance serves every up-to-date file


# --- pure decisions ---------------------------------------------------------------------


# Every kind `refusal()` can give: a small fixed set, used as a metrics label.
REFUSAL_KINDS = (
    "symlink",
    "fifo",
    "socket",
    "directory",
    "device",
    "owner",
    "size",
    "sparse",
    "hardlink",
    "mount",
    "quota",
    "key",  # the object store cannot hold the name's key (too long, not UTF-8)
    "home",
    "hidden",  # a directory whose name starts with "." (below the sessions directory)
    "depth",  # a directory deeper than --depth allows
    "bound",  # past the entries a walk looks at per directory or per user
    "other",
)


class Refusal(NamedTuple):
    """Why an entry is not copied: `kind` (one of REFUSAL_KINDS, for metrics and structured
    logs: never a name or a number) and `reason` (the human words for the log line)."""

    kind: str
    reason: str


_NOT_REGULAR = (
    (stat.S_ISLNK, Refusal("symlink", "a symlink")),
    (stat.S_ISFIFO, Refusal("fifo", "a FIFO")),
    (stat.S_ISSOCK, Refusal("socket", "a socket")),
    (stat.S_ISDIR, Refusal("directory", "a directory")),
    (stat.S_ISCHR, Refusal("device", "a character device")),
    (stat.S_ISBLK, Refusal("device", "a block device")),
)


def refusal(
    st: os.stat_result, owner_uid: int, max_bytes: int, dev: int | None = None
) -> Refusal | None:
    """Why a source entry must not be copied, or None when it may.

    "hardlink": more than one name for the inode. Claude Code never links its transcripts,
    and N links to one 200 MB file would cost the store N copies (the store is an archive:
    deleting the links frees nothing). "mount": on another device than the home (`dev`;
    None = not checked), like `rsync -x`: whatever is mounted below a home is not a
    transcript the user wrote there, and may be a file system that blocks.

    "sparse": a file over SPARSE_MIN_BYTES with less than half its size allocated, i.e.
    mostly holes (`truncate -s 1G x.jsonl` costs its owner a few KB and would put 1 GB of
    zeros in the store, again after every rename: the store is an archive). Small files are
    exempt (inline data, a tail packed into the inode). On a file system that compresses
    (ZFS, whose st_blocks is the compressed size) or allocates late, a dense file can look
    sparse here: the engine confirms on the opened file with SEEK_DATA/SEEK_HOLE before it
    refuses, so this is a suspicion, which is enough for callers that only report."""
    mode = st.st_mode
    if not stat.S_ISREG(mode):
        for test, why in _NOT_REGULAR:
            if test(mode):
                return why
        return Refusal("other", "not a regular file")
    if st.st_uid != owner_uid:
        return Refusal("owner", f"owned by uid {st.st_uid}, not by the home's owner {owner_uid}")
    if dev is not None and st.st_dev != dev:
        return Refusal("mount", "on another file system than its home")
    if st.st_nlink > 1:
        return Refusal("hardlink", f"a file with {st.st_nlink} hard links")
    if st.st_size > max_bytes:
        return Refusal("size", f"{st.st_size} bytes, over the limit of {max_bytes}")
    blocks = st.st_blocks  # None in a stat_result built from a 10-tuple: no information
    allocated = -1 if blocks is None else blocks * 512
    if st.st_size > SPARSE_MIN_BYTES and 0 <= allocated < st.st_size / 2:
        return Refusal("sparse", f"sparse: {allocated} bytes allocated of {st.st_size}")
    return None


def is_up_to_date(src: os.stat_result, tgt: os.stat_result | None) -> bool:
    """rsync's quick check: a regular target with the source's size and mtime (ns)."""
    return (
        tgt is not None
        and stat.S_ISREG(tgt.st_mode)
        and tgt.st_size == src.st_size
        and tgt.st_mtime_ns == src.st_mtime_ns
    )


def is_hot(mtime: float, now: float, settle: float) -> bool:
    """Changed less than `settle` seconds ago, so a writer may be mid-chunk.

    An mtime up to `settle` in the future (another host's clock on a network home) counts
    as hot too; one further ahead (a user can set year 2500 with utime) cannot be a write
    that is still going on and counts as quiet, so it is never held back for long: a
    held-back file is quiet at the latest 2 x `settle` after it was first seen.
    """
    return abs(now - mtime) < settle


def install_length(size: int, line_end: int, mtime: float, now: float, settle: float) -> int:
    """How many bytes of the source to install.

    `line_end` is the offset just past the last newline within `size`. While the source is
    hot (`is_hot`) only whole lines go in: the writer may be between two write() calls of
    one chunk. A quiet source goes in whole, unfinished last line included, so a truncated
    transcript is not held back forever.
    """
    if not is_hot(mtime, now, settle):
        return size
    return line_end


def recheck_time(mtime: float, now: float, settle: float) -> float:
    """When a held-back source will count as quiet if nothing else happens: `settle` after
    its mtime, but never more than `settle` from now (an mtime in the future)."""
    return min(mtime, now) + settle


# --- I/O shell ----------------------------------------------------------------------------

_LOCKS = tuple(threading.Lock() for _ in range(256))


def _lock_for(user: str, name: str) -> threading.Lock:
    # Striped locks: bounded memory whatever the number of files; two files sharing a
    # stripe only wait for each other, they never interleave.
    return _LOCKS[hash((user, name)) % len(_LOCKS)]


def _label(source: SourceDir, name: str) -> str:
    return escape(f"{source.user}/{source.key(name)}")


def _line_end(fd: int, size: int, limit: int = _TAIL_LIMIT) -> int:
    """Offset just past the last b"\\n" in the first `size` bytes: 0 if there is none in the
    last `limit` bytes (a hot file is never read back to its start)."""
    end = size
    floor = max(0, size - limit)
    while end > floor:
        start = max(floor, end - _TAIL_CHUNK)
        chunk = os.pread(fd, end - start, start)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        if len(chunk) < end - start:
            # Shrank under us: nothing is installed now (SKIPPED, with a recheck time); the
            # recheck, or the shrink's own event, copies what is there then.
            return 0
        end = start
    return 0


def _mostly_holes(fd: int, size: int) -> bool:
    """Whether less than half of the first `size` bytes are data (SEEK_DATA/SEEK_HOLE).

    Only asked of a file that `refusal` already suspects (few blocks for its size). A file
    system without hole reporting calls the whole file data: never refused on a guess. More
    than _MAX_EXTENTS data runs before half is found is no transcript: mostly holes.
    """
    need = (size + 1) // 2
    data = 0
    offset = 0
    for _ in range(_MAX_EXTENTS):
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after `offset`
                return True
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                return False  # holes cannot be told apart here
            raise
        if start >= size:
            return True
        end = min(size, os.lseek(fd, start, os.SEEK_HOLE))
        data += end - start
        if data >= need:
            return False
        offset = end
        if size - offset + data < need:  # even all the rest as data would not be enough
            return True
    return True


# A large copy is written back in chunks of this size, each forced to disk before the
# next is written: the page cache never holds more than a chunk of one copy's dirty data.
# Unbounded, a 1 GB copy left a gigabyte for the kernel to write back, and every other
# user's small fsync on that disk (ext4 commits its journal with the ordered data of every
# file in it) waited behind it: a victim's p99 went from 11 to 207 ms while another user
# `touch`ed two 1 GB transcripts (python -m bench.noisy --only touch --store disk).
WRITEBACK_CHUNK = 8 << 20


def _copy_bytes(src: int, dst: int, length: int, chunk: int | None = None) -> int:
    """Copy the first `length` bytes in the kernel; returns how many were copied (fewer
    only if the source shrank). Past each `chunk` bytes, what is written so far goes to
    disk (fdatasync) before more is written; the caller's fsync does the last part."""
    chunk = WRITEBACK_CHUNK if chunk is None else chunk
    done = 0
    synced = 0
    use_cfr = True
    while done < length:
        want = min(length - done, chunk)
        if use_cfr:
            try:
                n = os.copy_file_range(src, dst, want, done, done)
            except OSError as e:
                if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    use_cfr = False
                    continue
                raise
        else:
            os.lseek(dst, done, os.SEEK_SET)
            n = os.sendfile(dst, src, done, want)
        if n == 0:
            break
        done += n
        if done - synced >= chunk and done < length:
            os.fdatasync(dst)
            synced = done
    return done


class _Changed(Exception):
    """The source shrank or was replaced while we copied it: discard and try again."""


def quick_skip(
    config: Config, source: SourceDir, store: UserStore, name: str, lstat: os.stat_result
) -> bool:
    """The no-op path of a pass: the scan's lstat plus one lstat of the target say the store
    is up to date. No open, no lock, no retry loop: this runs 100,000 times in a pass over
    1,000 users, and the overhead around the two stat calls was 40% of its time. May raise
    the store side's OSError (EIO, ENAMETOOLONG): `sync_file` turns that into FAILED."""
    return refusal(lstat, source.uid, config.max_file_bytes) is None and is_up_to_date(
        lstat, store.lstat(source.key(name))
    )


def sync_file(
    config: Config,
    source: SourceDir,
    store: UserStore,
    name: str,
    *,
    now: float,
    dry_run: bool = False,
    lstat: os.stat_result | None = None,
    since: float | None = None,
    limiter: LogLimiter | None = None,
    admit: Callable[[int], float] | None = None,
    force: bool = False,
    copied_id: tuple[int, int, int] | None = None,
) -> Result:
    """Bring `<store>/<user>/<key>` up to date with `<sessions>/<key>`, where `key` is
    `source.key(name)`: `name` is the file's name in the opened directory `source`, and
    the store key is its path relative to the sessions directory (`proj/sess.jsonl`).

    `lstat` may pass the entry's stat from a directory scan, so that an up-to-date file
    costs one more fstatat (of the target) and nothing else. `since` is the wall time of
    the event that asked for this copy, for the latency in the log line. `limiter` rate-
    limits the WARNING/ERROR lines per user and kind (None: every line goes out). `admit`
    is the user's byte budget: asked with the bytes a copy would write, it answers 0 (go)
    or the seconds to wait; a copy that must wait is SKIPPED with `recheck_at` then.
    `force` copies even when the store has the source's size and mtime (the quick check's
    blind spot: a rewrite in place of the same length, mtime set back); the live service
    passes it for a real event (a close after a write, a rename, an attribute change),
    with `copied_id`, the source's (device, inode, ctime) as of its last copy: then only a
    source that changed since is forced (a write, `utime` or `chmod` moves the ctime; a
    close flood that writes nothing does not, and costs no copy). The ctime is the fstat's
    before the bytes are read, so a change during a copy counts as a change. Refusals and
    the torn-line rule apply all the same.
    """
    if lstat is not None and not force:
        try:
            if quick_skip(config, source, store, name, lstat):
                return _SKIPPED
        except OSError:
            pass  # the store side (EIO, ENAMETOOLONG): met again below, and counted FAILED
    say = limiter if limiter is not None else LogLimiter(0.0)
    with _lock_for(source.user, source.key(name)):
        for attempt in range(MAX_TRIES):
            try:
                result = _sync_once(
                    config,
                    source,
                    store,
                    name,
                    now,
                    dry_run,
                    lstat,
                    say,
                    admit,
                    force,
                    copied_id,
                )
                break
            except _Changed as e:
                log.debug(
                    "%s changed during copy (%s), try %d", _label(source, name), e, attempt + 1
                )
                lstat = None
            except Refused as e:  # ours, or the store's (a symlink planted in the store)
                say.log(
                    log,
                    # The store's own line says when a user goes over their limit (once).
                    logging.DEBUG if e.kind == "quota" else logging.WARNING,
                    source.user,
                    "refused:" + e.kind,
                    "refused %s: %s",
                    _label(source, name),
                    e.reason,
                    extra=fields(source.user, source.key(name), reason=e.kind),
                )
                return Result(Outcome.REFUSED, detail=e.reason, kind=e.kind)
            except OSError as e:
                code = e.errno or 0
                say.log(
                    log,
                    logging.ERROR,
                    source.user,
                    "failed:" + errno_name(code),
                    "failed %s: %s (%s)",
                    _label(source, name),
                    (e.strerror or os.strerror(code)) if code else e,
                    errno_name(code),
                    extra=fields(source.user, source.key(name), errno=errno_name(code)),
                )
                return Result(Outcome.FAILED, detail=str(e), errno=code)
        else:
            say.log(
                log,
                logging.ERROR,
                source.user,
                "failed:changing",
                "failed %s: source kept changing during the copy (%d tries)",
                _label(source, name),
                MAX_TRIES,
                extra=fields(source.user, source.key(name), reason="changing"),
            )
            return Result(Outcome.FAILED, detail="source kept changing during the copy")
    if result.outcome is Outcome.COPIED and not dry_run:
        # One INFO line per user a minute, the rest at DEBUG and counted in the next: a
        # user creating 200,000 files, or fifty users each flushing every 100 ms, must not
        # push everyone's WARNINGs past journald's rate limit. Exact counts and latencies
        # are in the metrics (copies, event_to_landed_seconds).
        if since is None:
            say.log(
                log,
                logging.INFO,
                source.user,
                "copied",
                "copied %s (%d bytes)",
                _label(source, name),
                result.nbytes,
                extra=fields(source.user, source.key(name), nbytes=result.nbytes),
            )
        else:
            latency = time.time() - since
            say.log(
                log,
                logging.INFO,
                source.user,
                "copied",
                "copied %s (%d bytes, %.1f ms after the event)",
                _label(source, name),
                result.nbytes,
                latency * 1000,
                extra=fields(
                    source.user, source.key(name), nbytes=result.nbytes, latency_ms=latency * 1000
                ),
            )
            result = dataclasses.replace(result, latency=latency)
    return result


def _sync_once(
    config: Config,
    source: SourceDir,
    store: UserStore,
    name: str,
    now: float,
    dry_run: bool,
    pre: os.stat_result | None,
    say: LogLimiter,
    admit: Callable[[int], float] | None,
    force: bool = False,
    copied_id: tuple[int, int, int] | None = None,
) -> Result:
    if pre is None:
        try:
            pre = os.stat(name, dir_fd=source.fd, follow_symlinks=False)
        except FileNotFoundError:
            return Result(Outcome.VANISHED)
    why = refusal(pre, source.uid, config.max_file_bytes, source.dev)
    if why is not None and why.kind != "sparse":  # a sparse suspect is checked once open
        raise Refused.of(why)
    key = source.key(name)
    tgt = store.lstat(key)
    if tgt is not None and stat.S_ISDIR(tgt.st_mode):
        raise OSError(errno.EISDIR, "store entry is a directory")
    if why is None and not _forced(force, copied_id, pre) and is_up_to_date(pre, tgt):
        return Result(Outcome.SKIPPED, source_id=_ident(pre))

    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=source.fd)
    except FileNotFoundError:
        return Result(Outcome.VANISHED)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):
            if e.errno == errno.ELOOP:
                raise Refused("a symlink", "symlink") from None
            raise Refused("a socket", "socket") from None
        raise
    try:
        st = os.fstat(fd)
        # The checks that count: on what was opened, not on a name that can be swapped.
        why = refusal(st, source.uid, config.max_file_bytes, source.dev)
        if why is not None and (why.kind != "sparse" or _mostly_holes(fd, st.st_size)):
            raise Refused.of(why)
        force = _forced(force, copied_id, st)
        if not force and is_up_to_date(st, tgt):
            return Result(Outcome.SKIPPED, source_id=_ident(st))
        size = st.st_size
        # Only a hot source is searched for its last newline (a quiet one goes in whole).
        hot = size > 0 and is_hot(st.st_mtime, now, config.settle)
        length = install_length(
            size, _line_end(fd, size) if hot else size, st.st_mtime, now, config.settle
        )
        recheck = recheck_time(st.st_mtime, now, config.settle) if length < size else None
        if length == 0 and size > 0:
            return Result(Outcome.SKIPPED, recheck_at=recheck)  # not one whole line yet
        if (
            not force
            and tgt is not None
            and stat.S_ISREG(tgt.st_mode)
            and tgt.st_size == length
            and tgt.st_mtime_ns == st.st_mtime_ns
        ):
            # That prefix is in already.
            return Result(Outcome.SKIPPED, recheck_at=recheck, source_id=_ident(st))
        old_size = tgt.st_size if tgt is not None and stat.S_ISREG(tgt.st_mode) else None
        grow, new_file = length - (old_size or 0), old_size is None
        # The store's own pacing (an object store batches a growing file's versions); it
        # may also refuse a name it cannot hold (kind "key"), in a dry run too.
        later = store.due(key, st, tgt, now)
        if later is not None and not dry_run:
            return Result(Outcome.SKIPPED, recheck_at=later)
        if admit is not None and not dry_run:
            wait = admit(length)
            if wait > 0:  # over the user's byte budget: this version goes in a little later
                return Result(Outcome.SKIPPED, recheck_at=now + wait)
        if not dry_run:
            over = store.reserve(grow, new_file=new_file)
            if over is not None:
                raise Refused.of(over)
        if old_size is not None and size < old_size:
            say.log(
                log,
                logging.WARNING,
                source.user,
                "shrank",
                "source %s shrank from %d to %d bytes; mirroring it",
                _label(source, name),
                old_size,
                size,
                extra=fields(source.user, key, nbytes=size, reason="shrank"),
            )
        if tgt is not None and stat.S_ISLNK(tgt.st_mode):
            say.log(
                log,
                logging.WARNING,
                source.user,
                "store-symlink",
                "store entry %s is a symlink; replacing it, not following it",
                _label(source, name),
            )
        if dry_run:
            log.info("would copy %s (%d bytes)", _label(source, name), length)
            return Result(Outcome.COPIED, nbytes=length, recheck_at=recheck)
        try:
            if isinstance(store, ObjectUserStore):
                store.install(key, fd, st, length, lambda: _verify(source, name, fd, st, length))
            else:
                _install(config, source, store, name, fd, st, length, key)
        except BaseException:
            store.release(grow, new_file=new_file)
            raise
    finally:
        os.close(fd)
    return Result(Outcome.COPIED, nbytes=length, recheck_at=recheck, source_id=_ident(st))


def _ident(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def _forced(force: bool, copied_id: tuple[int, int, int] | None, st: os.stat_result) -> bool:
    return force and _ident(st) != copied_id


def _verify(source: SourceDir, name: str, fd: int, st: os.stat_result, length: int) -> None:
    """Raise _Changed if the source shrank below `length` or its name now points at
    another file: what was read is then not a version of this transcript."""
    if os.fstat(fd).st_size < length:
        raise _Changed("shrank")
    try:
        now_there = os.stat(name, dir_fd=source.fd, follow_symlinks=False)
    except FileNotFoundError:
        now_there = None
    if now_there is None or now_there.st_ino != st.st_ino or now_there.st_dev != st.st_dev:
        raise _Changed("replaced")


def _install(
    config: Config,
    source: SourceDir,
    store: UserStore,
    name: str,
    src_fd: int,
    st: os.stat_result,
    length: int,
    key: str | None = None,
) -> None:
    """Temp file in the same directory (same file system, so the rename is atomic), exact
    bytes, our mode and group, the source's mtime, fsync, rename, fsync the directory.

    `key` (default `name`) is the path in the user's store: its directories are made by
    `UserStore.parent` (each opened relative to its parent, never through a symlink, with
    the store's mode and group); `name` is the source's name in `source.fd`."""
    dir_fd, leaf = store.parent(name if key is None else key, create=True)
    if dir_fd is None:  # only a dry run leaves the directory absent
        raise OSError(errno.ENOENT, "store directory missing")
    tmp = f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}"
    out = os.open(
        tmp,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=dir_fd,
    )
    installed = False
    try:
        # Taken before the first byte and held until the rename: a temp file with data
        # that nobody holds a lock on is a dead process's leftover, which any pass (the
        # restarted service's first one too) removes at once (store.ORPHAN_TEMP_SECONDS).
        fcntl.flock(out, fcntl.LOCK_EX | fcntl.LOCK_NB)
        gid = store.store.gid
        if gid is not None:
            os.fchown(out, -1, gid)
        os.fchmod(out, config.file_mode)  # after chown, and never the source's mode
        if _copy_bytes(src_fd, out, length) < length:
            raise _Changed("shrank")
        _verify(source, name, src_fd, st, length)  # the check the object store makes too
        os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.fsync(out)
        os.rename(tmp, leaf, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        installed = True
        os.fsync(dir_fd)
    finally:
        os.close(out)
        if not installed:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass
