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
from dataclasses import dataclass

from .config import Config
from .logfmt import fields
from .safefs import FILE_FLAGS, Refused, escape
from .store import TEMP_PREFIX, TEMP_SUFFIX, UserStore

__all__ = [
    "Outcome",
    "Result",
    "SourceDir",
    "install_length",
    "is_up_to_date",
    "refusal",
    "refusal_kind",
    "sync_file",
]

log = logging.getLogger(__name__)

MAX_TRIES = 3
_TAIL_CHUNK = 64 * 1024


@dataclass(frozen=True)
class SourceDir:
    """A qualified, opened sessions directory: its home's name, owner and descriptor."""

    user: str
    uid: int
    fd: int


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


_SKIPPED = Result(Outcome.SKIPPED)  # frozen: one instance serves every up-to-date file


# --- pure decisions ---------------------------------------------------------------------


def refusal(st: os.stat_result, owner_uid: int, max_bytes: int) -> str | None:
    """Why a source entry must not be copied, or None when it may."""
    mode = st.st_mode
    if not stat.S_ISREG(mode):
        for test, kind in (
            (stat.S_ISLNK, "a symlink"),
            (stat.S_ISFIFO, "a FIFO"),
            (stat.S_ISSOCK, "a socket"),
            (stat.S_ISDIR, "a directory"),
            (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"),
        ):
            if test(mode):
                return kind
        return "not a regular file"
    if st.st_uid != owner_uid:
        return f"owned by uid {st.st_uid}, not by the home's owner {owner_uid}"
    if st.st_size > max_bytes:
        return f"{st.st_size} bytes, over the limit of {max_bytes}"
    return None


# A refusal reason from `refusal()` (or the open) -> a small fixed label for metrics and
# structured logs: never a user name, path or number.
_KINDS = (
    ("a symlink", "symlink"),
    ("a FIFO", "fifo"),
    ("a socket", "socket"),
    ("a directory", "directory"),
    ("a character device", "device"),
    ("a block device", "device"),
    ("owned by uid", "owner"),
)


def refusal_kind(reason: str) -> str:
    """symlink, fifo, socket, directory, device, owner, size or other."""
    for prefix, kind in _KINDS:
        if reason.startswith(prefix):
            return kind
    if "over the limit" in reason:
        return "size"
    return "other"


def is_up_to_date(src: os.stat_result, tgt: os.stat_result | None) -> bool:
    """rsync's quick check: a regular target with the source's size and mtime (ns)."""
    return (
        tgt is not None
        and stat.S_ISREG(tgt.st_mode)
        and tgt.st_size == src.st_size
        and tgt.st_mtime_ns == src.st_mtime_ns
    )


def install_length(size: int, line_end: int, mtime: float, now: float, settle: float) -> int:
    """How many bytes of the source to install.

    `line_end` is the offset just past the last newline within `size`. While the source is
    hot (changed less than `settle` seconds ago) only whole lines go in: the writer may be
    between two write() calls of one chunk. A quiet source goes in whole, unfinished last
    line included, so a truncated transcript is not held back forever.
    """
    if now - mtime >= settle:
        return size
    return line_end


# --- I/O shell ----------------------------------------------------------------------------

_LOCKS = tuple(threading.Lock() for _ in range(256))


def _lock_for(user: str, name: str) -> threading.Lock:
    # Striped locks: bounded memory whatever the number of files; two files sharing a
    # stripe only wait for each other, they never interleave.
    return _LOCKS[hash((user, name)) % len(_LOCKS)]


def _label(source: SourceDir, name: str) -> str:
    return escape(f"{source.user}/{name}")


def _line_end(fd: int, size: int) -> int:
    """Offset just past the last b"\\n" in the first `size` bytes (0 if there is none)."""
    end = size
    while end > 0:
        start = max(0, end - _TAIL_CHUNK)
        chunk = os.pread(fd, end - start, start)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        if len(chunk) < end - start:  # shrank under us: the retry loop will notice
            return 0
        end = start
    return 0


def _copy_bytes(src: int, dst: int, length: int) -> int:
    """Copy the first `length` bytes in the kernel; returns how many were copied (fewer
    only if the source shrank)."""
    done = 0
    use_cfr = True
    while done < length:
        if use_cfr:
            try:
                n = os.copy_file_range(src, dst, length - done, done, done)
            except OSError as e:
                if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    use_cfr = False
                    continue
                raise
        else:
            os.lseek(dst, done, os.SEEK_SET)
            n = os.sendfile(dst, src, done, length - done)
        if n == 0:
            break
        done += n
    return done


class _Changed(Exception):
    """The source shrank or was replaced while we copied it: discard and try again."""


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
) -> Result:
    """Bring `<store>/<user>/<name>` up to date with `<sessions>/<name>`.

    `lstat` may pass the entry's stat from a directory scan, so that an up-to-date file
    costs one more fstatat (of the target) and nothing else. `since` is the wall time of
    the event that asked for this copy, for the latency in the log line.
    """
    # The no-op path of a pass: the scan's lstat already says the store is up to date.
    # No lock, no retry loop, one shared Result: this is 100,000 calls in a pass over
    # 1,000 users, and the overhead around the two stat calls was 40% of its time.
    if (
        lstat is not None
        and refusal(lstat, source.uid, config.max_file_bytes) is None
        and is_up_to_date(lstat, store.lstat(name))
    ):
        return _SKIPPED
    with _lock_for(source.user, name):
        for attempt in range(MAX_TRIES):
            try:
                result = _sync_once(config, source, store, name, now, dry_run, lstat)
                break
            except _Changed as e:
                log.debug(
                    "%s changed during copy (%s), try %d", _label(source, name), e, attempt + 1
                )
                lstat = None
            except Refused as e:
                log.warning(
                    "refused %s: %s",
                    _label(source, name),
                    e.reason,
                    extra=fields(source.user, name, reason=refusal_kind(e.reason)),
                )
                return Result(Outcome.REFUSED, detail=e.reason)
            except OSError as e:
                code = e.errno or 0
                log.error(
                    "failed %s: %s (%s)",
                    _label(source, name),
                    os.strerror(code) if code else e,
                    errno.errorcode.get(code, "?"),
                    extra=fields(source.user, name, errno=errno.errorcode.get(code, "unknown")),
                )
                return Result(Outcome.FAILED, detail=str(e), errno=code)
        else:
            log.error(
                "failed %s: source kept changing during the copy (%d tries)",
                _label(source, name),
                MAX_TRIES,
                extra=fields(source.user, name, reason="changing"),
            )
            return Result(Outcome.FAILED, detail="source kept changing during the copy")
    if result.outcome is Outcome.COPIED and not dry_run:
        if since is None:
            log.info(
                "copied %s (%d bytes)",
                _label(source, name),
                result.nbytes,
                extra=fields(source.user, name, nbytes=result.nbytes),
            )
        else:
            latency = time.time() - since
            log.info(
                "copied %s (%d bytes, %.1f ms after the event)",
                _label(source, name),
                result.nbytes,
                latency * 1000,
                extra=fields(source.user, name, nbytes=result.nbytes, latency_ms=latency * 1000),
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
) -> Result:
    if pre is None:
        try:
            pre = os.stat(name, dir_fd=source.fd, follow_symlinks=False)
        except FileNotFoundError:
            return Result(Outcome.VANISHED)
    why = refusal(pre, source.uid, config.max_file_bytes)
    if why:
        raise Refused(why)
    tgt = store.lstat(name)
    if tgt is not None and stat.S_ISDIR(tgt.st_mode):
        raise OSError(errno.EISDIR, "store entry is a directory")
    if is_up_to_date(pre, tgt):
        return Result(Outcome.SKIPPED)

    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=source.fd)
    except FileNotFoundError:
        return Result(Outcome.VANISHED)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise Refused("a symlink") from None
        if e.errno == errno.ENXIO:
            raise Refused("a socket") from None
        raise
    try:
        st = os.fstat(fd)
        # The checks that count: on what was opened, not on a name that can be swapped.
        why = refusal(st, source.uid, config.max_file_bytes)
        if why:
            raise Refused(why)
        if is_up_to_date(st, tgt):
            return Result(Outcome.SKIPPED)
        size = st.st_size
        length = install_length(
            size, _line_end(fd, size) if size else 0, st.st_mtime, now, config.settle
        )
        recheck = st.st_mtime + config.settle if length < size else None
        if length == 0 and size > 0:
            return Result(Outcome.SKIPPED, recheck_at=recheck)  # not one whole line yet
        if (
            tgt is not None
            and stat.S_ISREG(tgt.st_mode)
            and tgt.st_size == length
            and tgt.st_mtime_ns == st.st_mtime_ns
        ):
            return Result(Outcome.SKIPPED, recheck_at=recheck)  # that prefix is in already
        if tgt is not None and stat.S_ISREG(tgt.st_mode) and size < tgt.st_size:
            log.warning(
                "source %s shrank from %d to %d bytes; mirroring it",
                _label(source, name),
                tgt.st_size,
                size,
                extra=fields(source.user, name, nbytes=size, reason="shrank"),
            )
        if tgt is not None and stat.S_ISLNK(tgt.st_mode):
            log.warning(
                "store entry %s is a symlink; replacing it, not following it", _label(source, name)
            )
        if dry_run:
            log.info("would copy %s (%d bytes)", _label(source, name), length)
            return Result(Outcome.COPIED, nbytes=length, recheck_at=recheck)
        _install(config, source, store, name, fd, st, length)
    finally:
        os.close(fd)
    return Result(Outcome.COPIED, nbytes=length, recheck_at=recheck)


def _install(
    config: Config,
    source: SourceDir,
    store: UserStore,
    name: str,
    src_fd: int,
    st: os.stat_result,
    length: int,
) -> None:
    """Temp file in the same directory (same file system, so the rename is atomic), exact
    bytes, our mode and group, the source's mtime, fsync, rename, fsync the directory."""
    dir_fd = store.fd(create=True)
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
        # Held until the rename: a temp file nobody holds a lock on is a crash's leftover,
        # which the next pass removes at once instead of an hour later (store.py).
        fcntl.flock(out, fcntl.LOCK_EX | fcntl.LOCK_NB)
        gid = store.store.gid
        if gid is not None:
            os.fchown(out, -1, gid)
        os.fchmod(out, config.file_mode)  # after chown, and never the source's mode
        if _copy_bytes(src_fd, out, length) < length:
            raise _Changed("shrank")
        after = os.fstat(src_fd)
        if after.st_size < length:
            raise _Changed("shrank")
        try:
            now_there = os.stat(name, dir_fd=source.fd, follow_symlinks=False)
        except FileNotFoundError:
            now_there = None
        if now_there is None or now_there.st_ino != st.st_ino or now_there.st_dev != st.st_dev:
            raise _Changed("replaced")
        os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.fsync(out)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        installed = True
        os.fsync(dir_fd)
    finally:
        os.close(out)
        if not installed:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass
