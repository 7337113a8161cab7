"""The object-store implementation of the store seam (`--target s3://BUCKET[/PREFIX]`).

`copy.sync_file` still decides everything about the source (refusals, the torn-line rule,
quotas, the byte budget); this module answers its three questions about the target:

- `ObjectUserStore.lstat(name)`: what do you hold for this key? From the sqlite index
  (index.py), refreshed by one LIST of this host's prefix per full pass (HEAD only for an
  object the index does not know, e.g. after the index was deleted or a crash).
- `ObjectUserStore.due(...)`: may this version go up now? The pacing: a new transcript
  at once, a grown one when quiet for QUIET_SECONDS or at the latest `--upload-interval`
  after its oldest byte not yet uploaded (APPEND_INTERVAL once appends cost only their own
  bytes). "Not yet" is SKIPPED with a recheck time, so the live queue comes back.
- `ObjectUserStore.install(...)`: put these bytes of this open source. A PUT conditional
  on what we last wrote (If-None-Match: * / If-Match), or, for an object of 5 MiB or more
  that the source has grown past, a multipart upload whose part 1 is a server-side copy of
  the object and whose other parts are the new bytes, checked with a HEAD after complete.

Every botocore failure becomes an OSError with an errno (a bounded label for metrics and
the state file), so the callers treat the bucket like a disk that can fail.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

from . import __version__
from .config import Config, ConfigError
from .index import Entry, Index, lock_state_dir
from .safefs import Refused, escape
from .store import Store, Usage, UserStore

__all__ = [
    "APPEND_INTERVAL",
    "MULTIPART_MIN",
    "QUIET_SECONDS",
    "ObjectStore",
    "ObjectUserStore",
    "object_key",
    "store_for_target",
    "upload_due",
]

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/x-ndjson"
# S3's smallest part (all but the last): an object this big can be grown by UploadPartCopy.
MULTIPART_MIN = 5 * 1024 * 1024
PART_BYTES = 64 * 1024 * 1024  # new bytes go up in parts this big at most (memory bound)
MAX_KEY_BYTES = 1024
QUIET_SECONDS = 2.0
# Once the object is >= MULTIPART_MIN an update costs its new bytes plus five requests, so
# a hot transcript goes up this often (visible lag); a smaller one is re-sent whole each
# time, so it waits for quiet or --upload-interval (bytes stay bounded).
APPEND_INTERVAL = 5.0
# The first and last TAIL_BYTES of what was uploaded are hashed: a source whose start or
# uploaded end changed is not an append and goes up whole (a change only in the middle of
# a file that also grew is not seen: transcripts are append-only).
TAIL_BYTES = 4096
# After a connection-level failure, calls fail at once for this long: a pass over 10,000
# files while the store is down costs a few requests, not 10,000 timeouts.
DOWN_SECONDS = 2.0
META_HOST = "sw-host"
META_SIZE = "sw-source-size"
META_MTIME = "sw-mtime-ns"
META_INODE = "sw-inode"
META_TAIL = "sw-tail"
META_VERSION = "sw-version"


# --- pure decisions ---------------------------------------------------------------------


def upload_due(
    held_size: int | None, dirty_since: float, mtime: float, now: float, interval: float
) -> float | None:
    """None when a version should go up now, else the time to look again.

    A new object (`held_size` None) goes at once. A grown one goes when the source has
    been quiet for QUIET_SECONDS, or `interval` after its oldest byte not yet uploaded
    (`dirty_since`, when the change was first seen), whichever comes first."""
    if held_size is None:
        return None
    at = min(mtime + QUIET_SECONDS, dirty_since + interval)
    return None if now >= at else at


def object_key(config: Config, user: str, name: str) -> str:
    """PREFIX/<template> for one source; Refused (kind "key") for a key S3 cannot hold."""
    assert config.bucket is not None
    try:
        rel = config.object_key.format(host=config.host_id, user=user, name=name)
        prefix = config.bucket.prefix
        key = f"{prefix}/{rel}" if prefix else rel
        raw = key.encode("utf-8")
    except UnicodeEncodeError:
        raise Refused("its object key would not be valid UTF-8", "key") from None
    if len(raw) > MAX_KEY_BYTES:
        raise Refused(f"its object key would be {len(raw)} bytes, over {MAX_KEY_BYTES}", "key")
    return key


def _list_prefix(config: Config) -> str:
    """The longest literal start of every key of this host: one LIST covers them all."""
    assert config.bucket is not None
    tmpl = config.object_key
    cut = min(i for i in (tmpl.find("{user}"), tmpl.find("{name}")) if i >= 0)
    lit = tmpl[:cut]
    lit = lit.format(host=config.host_id) if "{host}" in lit else lit.split("{")[0]
    prefix = config.bucket.prefix
    return f"{prefix}/{lit}" if prefix else lit


def _key_pattern(config: Config) -> re.Pattern[str]:
    """Matches this host's keys, capturing the user."""
    assert config.bucket is not None
    out = re.escape(f"{config.bucket.prefix}/") if config.bucket.prefix else ""
    for part in re.split(r"(\{host\}|\{user\}|\{name\})", config.object_key):
        if part == "{host}":
            out += re.escape(config.host_id)
        elif part == "{user}":
            out += "(?P<user>[^/]+)" if "(?P<user>" not in out else "(?P=user)"
        elif part == "{name}":
            out += "(?P<name>.+)" if "(?P<name>" not in out else "(?P=name)"
        else:
            out += re.escape(part)
    return re.compile(out)


def _held_stat(entry: Entry) -> os.stat_result:
    """What `sync_file` compares: a regular file of the object's size with the source
    mtime (ns) of the version it holds."""
    secs = entry.mtime_ns / 1e9
    # The 10 classic fields, then st_atime/st_mtime/st_ctime as floats and in ns.
    fields = (stat.S_IFREG | 0o640, entry.inode, 0, 1, 0, 0, entry.size, 0, int(secs), 0)
    return os.stat_result((*fields, 0.0, secs, 0.0, 0, entry.mtime_ns, 0))


def _ends_hash(fd: int, length: int) -> str:
    """sha256 of the first and last TAIL_BYTES of the first `length` bytes of `fd`."""
    n = min(TAIL_BYTES, length)
    return hashlib.sha256(_read(fd, n, 0) + _read(fd, n, length - n)).hexdigest()


def _read(fd: int, length: int, offset: int) -> bytes:
    """Exactly `length` bytes at `offset`, or OSError(ENODATA) if the source shrank."""
    chunks: list[bytes] = []
    done = 0
    while done < length:
        chunk = os.pread(fd, length - done, offset + done)
        if not chunk:
            raise _Shrank
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


class _Shrank(Exception):
    pass


class _Conflict(Exception):
    """412 (or a missing object for If-Match): the key is not what we last wrote."""


# --- the bucket: client, index, pacing and engine quirks, for the process's life -----------


def _client(config: Config) -> Any:
    try:
        import boto3
        from botocore.config import Config as BotoConfig
    except ImportError:
        raise ConfigError(
            f"--target {config.target_text} needs boto3: pip install 'session-watcher[s3]'"
        ) from None
    # Endpoint, region, credentials and CA bundle: the standard AWS chain (AWS_ENDPOINT_URL,
    # AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SHARED_CREDENTIALS_FILE, AWS_PROFILE, instance
    # metadata, AWS_CA_BUNDLE). TLS is verified unless the chain says otherwise.
    mode: Literal["when_supported", "when_required"] = (
        "when_supported" if config.object_checksums == "when_supported" else "when_required"
    )
    boto_config = BotoConfig(
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=5,
        read_timeout=30,
        request_checksum_calculation=mode,
        response_checksum_validation=mode,
        user_agent_extra=f"session-watcher/{__version__}",
    )
    return boto3.session.Session().client("s3", config=boto_config)


def _os_error(e: Exception, what: str) -> OSError:
    """A botocore failure as an OSError whose errno names the kind (bounded labels)."""
    from botocore import exceptions as bx

    if isinstance(e, bx.ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code == "NoSuchBucket":
            num = errno.ENXIO
        elif code in ("SlowDown", "Throttling", "RequestLimitExceeded") or status == 429:
            num = errno.EAGAIN
        elif status == 403 or code in (
            "AccessDenied",
            "ExpiredToken",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
        ):
            num = errno.EACCES
        else:
            num = errno.EIO
        return OSError(num, f"{what}: {code or status} from the object store")
    if isinstance(e, bx.NoCredentialsError | bx.PartialCredentialsError):
        return OSError(errno.EACCES, f"{what}: no credentials for the object store")
    if isinstance(e, bx.ConnectTimeoutError | bx.ReadTimeoutError):
        return OSError(errno.ETIMEDOUT, f"{what}: the object store timed out")
    if isinstance(e, bx.EndpointConnectionError):
        return OSError(errno.ECONNREFUSED, f"{what}: cannot connect to the object store")
    if isinstance(e, bx.ConnectionClosedError | bx.ConnectionError):
        return OSError(errno.ECONNRESET, f"{what}: connection to the object store lost")
    return OSError(errno.EIO, f"{what}: {type(e).__name__}")


def _connection_level(e: OSError) -> bool:
    return e.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT)


class Bucket:
    """One bucket as this host sees it: the client, the index, the pending-upload clock
    per key, and what we learnt about the engine. Made once per process."""

    def __init__(self, config: Config, *, readonly: bool, paced: bool) -> None:
        assert config.bucket is not None
        self.config = config
        self.name = config.bucket.name
        self.readonly = readonly
        self.paced = paced
        self._lock_fd = None if readonly else lock_state_dir(config.state_dir)
        self.client = _client(config)
        self.index = Index(config.state_dir, self.name, readonly=readonly)
        self.list_prefix = _list_prefix(config)
        self.pattern = _key_pattern(config)
        # key -> wall time its source was first seen ahead of the object: one entry per
        # file with pending bytes (never per event), dropped when it is uploaded.
        self.dirty: dict[str, float] = {}
        # Ceph RGW 16 matches If-Match only unquoted, AWS and moto either way: start
        # quoted, and switch once if a HEAD shows the ETag we sent did match.
        self.quote_if_match = self.index.learnt("if-match") != "bare"
        self._down_until = 0.0
        self._down: OSError | None = None
        self._state_lock = threading.Lock()
        self.requests: dict[str, int] = {}  # per operation, for tests and the bench
        # Multipart uploads of this process in flight; any other under our prefix at the
        # first listing was left by a process that died mid-upload (kill -9): aborted.
        self.uploads: set[str] = set()
        self.swept = False

    # --- calls -------------------------------------------------------------------------

    def call(self, op: str, **kw: Any) -> Any:
        """One S3 call; failures as OSError (see _os_error); 412 as _Conflict."""
        from botocore import exceptions as bx

        with self._state_lock:
            down = self._down if time.monotonic() < self._down_until else None
            self.requests[op] = self.requests.get(op, 0) + (0 if down else 1)
        if down is not None:
            raise OSError(down.errno, down.strerror)
        try:
            return getattr(self.client, op)(Bucket=self.name, **kw)
        except bx.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise _Conflict from None
            if op == "put_object" and code == "NoSuchKey":  # If-Match on a deleted object
                raise _Conflict from None
            if op == "head_object" and (status == 404 or code in ("404", "NoSuchKey")):
                return None
            raise _os_error(e, op) from None
        except (bx.BotoCoreError, ValueError) as e:
            err = _os_error(e, op)
            if _connection_level(err):
                with self._state_lock:
                    self._down, self._down_until = err, time.monotonic() + DOWN_SECONDS
            raise err from None

    def head(self, key: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.call("head_object", Key=key)
        return result

    def ours(self, head: dict[str, Any]) -> Entry | None:
        """The index row for an object this host wrote (its metadata), else None."""
        meta = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
        if meta.get(META_HOST) != self.config.host_id:
            return None
        try:
            return Entry(
                size=int(head["ContentLength"]),
                mtime_ns=int(meta[META_MTIME]),
                inode=int(meta[META_INODE]),
                etag=str(head.get("ETag", "")),
                tail=str(meta.get(META_TAIL, "")),
            )
        except (KeyError, ValueError):
            return None

    def listing(self) -> Iterator[tuple[str, str, int, str]]:
        """(key, user, size, etag) of this host's objects: one LIST per 1,000."""
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Prefix": self.list_prefix, "MaxKeys": 1000}
            if token:
                kw["ContinuationToken"] = token
            page = self.call("list_objects_v2", **kw)
            for obj in page.get("Contents", []):
                m = self.pattern.fullmatch(obj["Key"])
                if m is not None:
                    yield obj["Key"], m.group("user"), int(obj["Size"]), str(obj["ETag"])
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def close(self) -> None:
        """Release the index and the instance lock (the process's last store is done)."""
        self.index.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.client.close()

    def if_match(self, etag: str) -> str:
        bare = etag.strip('"')
        return f'"{bare}"' if self.quote_if_match else bare


# --- the store seam ---------------------------------------------------------------------


class ObjectStore(Store):
    """The Store role for a bucket: quotas (from the index), and one LIST per instance
    (the service makes one per full pass) that brings the index up to date."""

    def __init__(self, config: Config, bucket: Bucket, *, dry_run: bool = False) -> None:
        super().__init__(config, None, dry_run=dry_run)
        self.bucket = bucket
        self._listed = False
        self._list_lock = threading.Lock()
        self._list_failed: tuple[float, OSError] | None = None
        # Keys whose object another host or instance wrote (never overwritten): what
        # `lstat` answers for them, so `status` shows the file as stale, not missing.
        self.foreign: dict[str, Entry] = {}

    def open_root(self, *, create: bool) -> int | None:
        return None  # no descriptor: ObjectUserStore needs none

    def close(self) -> None:
        self.bucket.close()

    def user_store(self, root_fd: int | None, user: str) -> UserStore:
        return ObjectUserStore(self, user)

    def remove_stale_temps(self, dir_fd: int, user: str, now: float | None = None) -> int:
        return 0  # an aborted multipart upload leaves nothing (see Upload)

    def _measure(self, user: str, dir_fd: int | None) -> Usage:
        self.ensure_listed()
        nbytes, files = self.bucket.index.usage(user)
        return Usage(nbytes, files)

    def ensure_listed(self) -> None:
        """LIST this host's keys once: confirm index rows (ETag and size), HEAD objects the
        index does not know (adopt ours, note foreign ones), drop rows of deleted objects.
        A failure is remembered for DOWN_SECONDS (the next caller fails at once)."""
        if self._listed:
            return
        with self._list_lock:
            if self._listed:
                return
            failed = self._list_failed
            if failed is not None and time.monotonic() < failed[0]:
                raise OSError(failed[1].errno, failed[1].strerror)
            try:
                self._list()
            except OSError as e:
                self._list_failed = (time.monotonic() + DOWN_SECONDS, e)
                raise
            self._listed = True

    def _list(self) -> None:
        b = self.bucket
        index = b.index
        seen: set[str] = set()
        heads = 0
        for key, user, size, etag in b.listing():
            seen.add(key)
            row = index.get(key)
            if row is not None and row.etag.strip('"') == etag.strip('"') and row.size == size:
                continue
            head = b.head(key)
            heads += 1
            if head is None:
                continue
            entry = b.ours(head)
            if entry is None:
                self.foreign[key] = Entry(size, 0, 0, etag)
                index.delete(key)
            else:
                index.put(key, user, entry)
        for key in index.keys_with_prefix(b.list_prefix) - seen:
            if b.pattern.fullmatch(key):
                index.delete(key)  # deleted from the bucket: it goes up again
        log.debug("listed %d objects (%d HEADs)", len(seen), heads)
        if not b.swept and not b.readonly:
            self._abort_dead_uploads()
            b.swept = True

    def _abort_dead_uploads(self) -> None:
        """Incomplete multipart uploads under this host's prefix that are not this
        process's: a previous process died mid-upload. One request when there are none."""
        b = self.bucket
        page = b.call("list_multipart_uploads", Prefix=b.list_prefix)
        for up in page.get("Uploads", []):
            key, upload_id = up["Key"], up["UploadId"]
            if upload_id in b.uploads or not b.pattern.fullmatch(key):
                continue
            try:
                b.call("abort_multipart_upload", Key=key, UploadId=upload_id)
                log.info("aborted an incomplete upload a stopped process left at %s", escape(key))
            except (OSError, _Conflict) as e:
                log.warning("could not abort an incomplete upload at %s: %s", escape(key), e)


class ObjectUserStore(UserStore):
    """One user's keys in the bucket."""

    def __init__(self, store: ObjectStore, user: str) -> None:
        super().__init__(store, None, user)
        self.ostore = store
        self.bucket = store.bucket

    def fd(self, *, create: bool) -> int | None:
        return None

    def close(self) -> None:
        pass

    def key(self, name: str) -> str:
        return object_key(self.store.config, self.user, name)

    def lstat(self, name: str) -> os.stat_result | None:
        try:
            key = self.key(name)
        except Refused:
            return None  # refused by `due`, with its reason
        self.ostore.ensure_listed()
        entry = self.bucket.index.get(key) or self.ostore.foreign.get(key)
        return None if entry is None else _held_stat(entry)

    def due(
        self, name: str, st: os.stat_result, held: os.stat_result | None, now: float
    ) -> float | None:
        """None: install now; else the time (epoch s) to look at the file again."""
        key = self.key(name)  # raises Refused for a key S3 cannot hold
        b = self.bucket
        if not b.paced:
            return None
        since = b.dirty.setdefault(key, now)
        size = None if held is None else held.st_size
        interval = (
            APPEND_INTERVAL
            if size is not None and size >= MULTIPART_MIN
            else self.store.config.upload_interval
        )
        return upload_due(size, since, st.st_mtime, now, min(interval, b.config.upload_interval))

    def install(
        self,
        name: str,
        src_fd: int,
        st: os.stat_result,
        length: int,
        verify: Callable[[], None],
    ) -> None:
        """Put the first `length` bytes of `src_fd` at the name's key. `verify` raises if
        the source was replaced or shrank meanwhile (called before anything is committed).
        Raises OSError (errno EEXIST: another writer's object is at the key)."""
        key = self.key(name)
        upload = _Upload(self.bucket, key, self.user, src_fd, st, length, verify)
        upload.run()
        self.bucket.dirty.pop(key, None)


class _Upload:
    """One version of one key going up."""

    def __init__(
        self,
        bucket: Bucket,
        key: str,
        user: str,
        fd: int,
        st: os.stat_result,
        length: int,
        verify: Callable[[], None],
    ) -> None:
        self.b = bucket
        self.key = key
        self.user = user
        self.fd = fd
        self.st = st
        self.length = length
        self.verify = verify
        try:
            self.tail = _ends_hash(fd, length)
        except _Shrank:
            verify()
            raise OSError(errno.EAGAIN, "source shrank during the upload") from None
        self.meta = {
            META_HOST: bucket.config.host_id,
            META_SIZE: str(st.st_size),
            META_MTIME: str(st.st_mtime_ns),
            META_INODE: str(st.st_ino),
            META_TAIL: self.tail,
            META_VERSION: __version__,
        }

    def entry(self, etag: str) -> Entry:
        return Entry(self.length, self.st.st_mtime_ns, self.st.st_ino, etag, self.tail)

    def run(self) -> None:
        held = self.b.index.get(self.key)
        for _ in range(3):
            try:
                etag = self._attempt(held)
            except _Conflict:
                held = self._resolve()
                if held is not None and self._is_this_version(held):
                    self.b.index.put(self.key, self.user, held)
                    return  # already there (a crash before the index write): no duplicate
                continue
            self.b.index.put(self.key, self.user, self.entry(etag))
            return
        raise OSError(errno.EAGAIN, "the object kept changing under us; trying again later")

    def _is_this_version(self, held: Entry) -> bool:
        return (
            held.size == self.length
            and held.mtime_ns == self.st.st_mtime_ns
            and held.inode == self.st.st_ino
        )

    def _resolve(self) -> Entry | None:
        """After a failed condition: whose object is at the key? Ours (a version the
        index missed, or the If-Match quoting of this engine): its row. None: gone."""
        head = self.b.head(self.key)
        if head is None:
            self.b.index.delete(self.key)
            return None
        entry = self.b.ours(head)
        if entry is None:
            raise OSError(
                errno.EEXIST,
                "an object that another host or instance wrote is at its key; not overwritten",
            )
        known = self.b.index.get(self.key)
        if known is not None and known.etag.strip('"') == entry.etag.strip('"'):
            # Our If-Match named the object that is there and still failed: this engine
            # wants the other quoting (Ceph RGW 16: unquoted).
            self.b.quote_if_match = not self.b.quote_if_match
            form = "quoted" if self.b.quote_if_match else "bare"
            self.b.index.learn("if-match", form)
            log.info("object store: this engine takes the ETag of If-Match %s", form)
        self.b.index.put(self.key, self.user, entry)
        return entry

    def _attempt(self, held: Entry | None) -> str:
        if (
            held is not None
            and held.size >= MULTIPART_MIN
            and self.length > held.size
            and held.inode == self.st.st_ino
            and self._still_prefix(held)
        ):
            return self._multipart(held, copy_first=True)
        if self.length > PART_BYTES:
            return self._multipart(held, copy_first=False)
        try:
            body = _read(self.fd, self.length, 0)
        except _Shrank:
            self.verify()
            raise OSError(errno.EAGAIN, "source shrank during the upload") from None
        self.verify()
        cond = {"IfNoneMatch": "*"} if held is None else {"IfMatch": self.b.if_match(held.etag)}
        resp = self.b.call(
            "put_object",
            Key=self.key,
            Body=body,
            ContentType=CONTENT_TYPE,
            Metadata=self.meta,
            **cond,
        )
        return str(resp.get("ETag", ""))

    def _still_prefix(self, held: Entry) -> bool:
        """The object's first and last TAIL_BYTES are still the source's: the source grew
        by appending (a rewrite goes up whole)."""
        if not held.tail:
            return False
        try:
            return _ends_hash(self.fd, held.size) == held.tail
        except _Shrank:
            return False

    def _multipart(self, held: Entry | None, *, copy_first: bool) -> str:
        b = self.b
        if held is None:
            # Multipart completion ignores conditions on moto and RGW 16: claim the key with
            # a conditional empty-body check first, so a foreign object is never replaced.
            if b.head(self.key) is not None:
                raise _Conflict
        else:
            head = b.head(self.key)
            if head is None or head.get("ETag", "").strip('"') != held.etag.strip('"'):
                raise _Conflict
        mpu = b.call(
            "create_multipart_upload", Key=self.key, ContentType=CONTENT_TYPE, Metadata=self.meta
        )
        upload_id = mpu["UploadId"]
        b.uploads.add(upload_id)
        try:
            parts: list[dict[str, Any]] = []
            offset = 0
            if copy_first:
                assert held is not None
                r = b.call(
                    "upload_part_copy",
                    Key=self.key,
                    UploadId=upload_id,
                    PartNumber=1,
                    CopySource={"Bucket": b.name, "Key": self.key},
                    CopySourceIfMatch=b.if_match(held.etag),
                )
                parts.append({"PartNumber": 1, "ETag": r["CopyPartResult"]["ETag"]})
                offset = held.size
            while offset < self.length:
                n = min(PART_BYTES, self.length - offset)
                try:
                    data = _read(self.fd, n, offset)
                except _Shrank:
                    self.verify()
                    raise OSError(errno.EAGAIN, "source shrank during the upload") from None
                r = b.call(
                    "upload_part",
                    Key=self.key,
                    UploadId=upload_id,
                    PartNumber=len(parts) + 1,
                    Body=data,
                )
                parts.append({"PartNumber": len(parts) + 1, "ETag": r["ETag"]})
                offset += n
            self.verify()
            b.call(
                "complete_multipart_upload",
                Key=self.key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            try:
                b.call("abort_multipart_upload", Key=self.key, UploadId=upload_id)
            except (OSError, _Conflict) as e:
                log.warning("could not abort the multipart upload of %s: %s", escape(self.key), e)
            raise
        finally:
            b.uploads.discard(upload_id)
        # RGW returns an empty ETag on complete, and no engine checks conditions there:
        # the HEAD says what is at the key now.
        head = b.head(self.key)
        entry = None if head is None else b.ours(head)
        if entry is None or not self._is_this_version(entry):
            raise _Conflict  # someone wrote in between: resolved (and repaired) by run()
        return entry.etag


def store_for_target(
    config: Config,
    gid: int | None,
    *,
    dry_run: bool = False,
    previous: Store | None = None,
    paced: bool = False,
    readonly: bool = False,
) -> Store:
    """The store for `config.target`: a directory Store, or an ObjectStore over the
    process's one Bucket (taken over from `previous`, so client, index and the instance
    lock live as long as the process, while each full pass gets a fresh LIST)."""
    if config.bucket is None:
        store = Store(config, gid, dry_run=dry_run)
        return store if previous is None else store.inherit(previous)
    if isinstance(previous, ObjectStore):
        return ObjectStore(config, previous.bucket, dry_run=dry_run).inherit(previous)
    bucket = Bucket(config, readonly=readonly or dry_run, paced=paced)
    return ObjectStore(config, bucket, dry_run=dry_run)
