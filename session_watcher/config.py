"""The one frozen configuration, and how it is resolved: flag, else environment, else default."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKSUM_MODES",
    "DEFAULT_OBJECT_KEY",
    "ENV_PREFIX",
    "LAYOUTS",
    "MAX_DEPTH",
    "Bucket",
    "Config",
    "ConfigError",
    "parse_mode",
    "resolve",
]

ENV_PREFIX = "SESSION_WATCHER_"
MAX_DEPTH = 8

# Named presets of (sessions subdir, depth). Claude Code writes
# `~/.claude/projects/<project>/<session>.jsonl` and, for sessions that ran subagents,
# `~/.claude/projects/<project>/<session>/subagents/agent-<id>.jsonl`.
LAYOUTS: dict[str, tuple[str, int]] = {
    "flat": ("user/sessions", 1),
    "claude-code": (".claude/projects", 4),
}


class ConfigError(ValueError):
    """A setting is unusable; the CLI prints it as one line and exits 2."""


DEFAULT_OBJECT_KEY = "{host}/{user}/{name}"
# botocore's `request_checksum_calculation` / `response_checksum_validation`. Its default
# (when_supported) sends checksums in a chunked trailer that Ceph RGW 16 and other
# non-AWS engines reject (411 MissingContentLength on a PUT over HTTPS).
CHECKSUM_MODES = ("when_required", "when_supported")


@dataclass(frozen=True)
class Bucket:
    """An object-store target, `s3://BUCKET[/PREFIX]`; `prefix` has no leading or trailing
    slash ("" for none)."""

    name: str
    prefix: str = ""

    def __str__(self) -> str:
        return f"s3://{self.name}/{self.prefix}" if self.prefix else f"s3://{self.name}"


def _short_host() -> str:
    return socket.gethostname().split(".")[0] or "localhost"


@dataclass(frozen=True)
class Config:
    """Everything the copy engine, the pass and the service need, built once and passed down."""

    home_root: Path = Path("/home")
    sessions_subdir: str = "user/sessions"
    # How many directory levels below the sessions directory hold transcripts: 1 is the
    # flat layout (`<sessions>/*.jsonl`); Claude Code's own layout needs 4
    # (`<project>/<session>/subagents/agent-x.jsonl`). `--layout claude-code` sets both.
    depth: int = 1
    # Below the first level, a directory is watched only while its session is active: it,
    # or the transcript named after it beside it, changed within this many seconds. Older
    # ones are watched again the moment their session is written to; passes see them all.
    active_window: float = 86400.0
    target: Path = Path("/data/user_sessions")
    min_uid: int = 1000
    max_uid: int = 60000
    exclude_users: frozenset[str] = frozenset()
    group: str = "data-ops"
    file_mode: int = 0o640
    dir_mode: int = 0o2770
    max_file_bytes: int = 1 << 30
    # What one user may hold in the store (the store is an archive shared by everyone: a
    # user must not be able to fill it for the others). 10 GiB is years of heavy Claude Code
    # use (a long session is tens of MB); 100,000 files leaves room for subagent transcripts.
    # Size them to the store: store size / users who may fill it at once.
    max_user_bytes: int = 10 << 30
    max_user_files: int = 100_000
    # What one user's files may make the service write, live: MB/s with a burst of 16 s of
    # it. Copies of up to 1 MiB are never held back by it (see ratelimit.ByteBudget).
    user_write_mb_s: float = 32.0
    # Copies one user's files may cause a second, with a burst of 10 s of it: about ten
    # times Claude Code's busiest session (a flush every 100 ms, a few subagents beside
    # it). Each copy costs two fsyncs on the disk every user shares.
    user_copies_s: float = 100.0
    # Directories and files below a home on another file system than the home are refused
    # (like rsync -x), unless the operator mounts parts of homes on purpose.
    cross_mounts: bool = False
    settle: float = 5.0
    log_level: str = "INFO"
    log_format: str = "text"  # text (journald) or json (log shippers)
    reconcile_interval: float = 600.0  # `run` only
    # `run`: the live copy workers, and each pass's copy threads; `reconcile`: its copy threads.
    workers: int = 4
    # A user's I/O that has not returned after this long marks the user stuck: their work
    # is skipped (everyone else's goes on) until their file system answers again.
    stuck_after: float = 15.0
    # `run` writes it, `status` reads it; /run/session-watcher is the unit's RuntimeDirectory.
    state_file: Path = Path("/run/session-watcher/state.json")
    metrics_file: Path | None = None  # `run` only: node_exporter textfile, every 15 s
    # --- the object store (`--target s3://...`; `target` is then unused) ---
    bucket: Bucket | None = None
    # Keys are PREFIX/<object_key with {host}, {user}, {name}>; host = host_id.
    host_id: str = dataclasses.field(default_factory=_short_host)
    object_key: str = DEFAULT_OBJECT_KEY
    # A grown transcript goes up once quiet for 2 s, at the latest this long after its
    # oldest byte not yet uploaded (objstore.upload_due).
    upload_interval: float = 30.0
    # The index of what was uploaded (sqlite) and the one-instance lock; the unit's
    # StateDirectory=.
    state_dir: Path = Path("/var/lib/session-watcher")
    object_checksums: str = "when_required"

    def __post_init__(self) -> None:
        _check(self)

    @property
    def sessions_parts(self) -> tuple[str, ...]:
        return tuple(p for p in self.sessions_subdir.split("/") if p)

    @property
    def target_text(self) -> str:
        """The store as the operator wrote it: a directory or s3://BUCKET/PREFIX."""
        return str(self.bucket) if self.bucket is not None else str(self.target)


def _check(c: Config) -> None:
    if not c.home_root.is_absolute():
        raise ConfigError(f"home root must be an absolute path: {str(c.home_root)!r}")
    if c.bucket is None and not c.target.is_absolute():
        raise ConfigError(f"target must be an absolute path: {str(c.target)!r}")
    parts = c.sessions_subdir.split("/")
    if (
        c.sessions_subdir.startswith("/")
        or not c.sessions_parts
        or any(p in (".", "..") for p in parts)
    ):
        raise ConfigError(
            f"sessions subdir must be a relative path without '.' or '..': {c.sessions_subdir!r}"
        )
    if not 1 <= c.depth <= MAX_DEPTH:
        raise ConfigError(f"depth must be 1..{MAX_DEPTH}, got {c.depth}")
    if not 0 <= c.active_window <= 365 * 86400:
        raise ConfigError(f"active window must be 0..31536000 seconds, got {c.active_window}")
    if not 0 <= c.min_uid <= c.max_uid:
        raise ConfigError(f"need 0 <= min uid <= max uid, got {c.min_uid} and {c.max_uid}")
    for what, mode in (("file mode", c.file_mode), ("dir mode", c.dir_mode)):
        if not 0 <= mode <= 0o7777:
            raise ConfigError(f"{what} out of range: {mode:o}")
    if c.file_mode & 0o7000:
        raise ConfigError(f"file mode must not set setuid/setgid/sticky bits: {c.file_mode:04o}")
    if c.max_file_bytes <= 0:
        raise ConfigError(f"max file bytes must be positive, got {c.max_file_bytes}")
    if c.max_user_bytes <= 0 or c.max_user_files <= 0:
        raise ConfigError(
            f"max user bytes and files must be positive, got {c.max_user_bytes}"
            f" and {c.max_user_files}"
        )
    if not 0 <= c.user_write_mb_s <= 1e6:
        raise ConfigError(f"user write rate must be 0..1000000 MB/s, got {c.user_write_mb_s}")
    if not 0 <= c.user_copies_s <= 1e6:
        raise ConfigError(f"user copy rate must be 0..1000000 copies/s, got {c.user_copies_s}")
    if not 0 <= c.settle <= 86400:
        raise ConfigError(f"settle must be 0..86400 seconds, got {c.settle}")
    if not 0 <= c.reconcile_interval <= 7 * 86400:
        raise ConfigError(
            f"reconcile interval must be 0..604800 seconds (a week), got {c.reconcile_interval}"
        )
    if not 0.1 <= c.stuck_after <= 3600:
        raise ConfigError(f"stuck after must be 0.1..3600 seconds, got {c.stuck_after}")
    if not 1 <= c.workers <= 64:
        raise ConfigError(f"workers must be 1..64, got {c.workers}")
    if c.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"unknown log level {c.log_level!r}")
    if c.log_format not in ("text", "json"):
        raise ConfigError(f"log format must be text or json, got {c.log_format!r}")
    _check_object_store(c)
    for what, path in (("state file", c.state_file), ("metrics file", c.metrics_file)):
        if path is not None and not path.is_absolute():
            raise ConfigError(f"{what} must be an absolute path: {str(path)!r}")


def _check_object_store(c: Config) -> None:
    if not c.host_id or not c.host_id.isascii() or not c.host_id.isprintable() or "/" in c.host_id:
        raise ConfigError(f"host id must be printable ASCII without '/': {c.host_id!r}")
    try:
        c.object_key.format(host="h", user="u", name="n")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            f"object key template: only {{host}}, {{user}} and {{name}} may appear ({e}): "
            f"{c.object_key!r}"
        ) from None
    if "{name}" not in c.object_key or "{user}" not in c.object_key:
        raise ConfigError(f"object key template needs {{user}} and {{name}}: {c.object_key!r}")
    if c.object_key.startswith("/"):
        raise ConfigError(f"object key template must not start with '/': {c.object_key!r}")
    if not 1 <= c.upload_interval <= 3600:
        raise ConfigError(f"upload interval must be 1..3600 seconds, got {c.upload_interval}")
    if not c.state_dir.is_absolute():
        raise ConfigError(f"state dir must be an absolute path: {str(c.state_dir)!r}")
    if c.object_checksums not in CHECKSUM_MODES:
        raise ConfigError(f"s3 checksums must be one of {', '.join(CHECKSUM_MODES)}")


def parse_target(text: str) -> Path | Bucket:
    """`--target`: a directory, or `s3://BUCKET[/PREFIX]` for an object store."""
    if not text.startswith("s3://"):
        return Path(text)
    name, _, prefix = text.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    # S3's bucket naming rules, the part that matters here: no slash, no empty name.
    if not (3 <= len(name) <= 63) or not all(ch.isalnum() or ch in "-." for ch in name):
        raise ConfigError(f"not a bucket name: {name!r}")
    if "//" in prefix:
        raise ConfigError(f"object key prefix with an empty part: {prefix!r}")
    return Bucket(name, prefix)


def parse_mode(text: str) -> int:
    """Octal mode as an operator writes it: 640, 0640 or 0o640."""
    try:
        return int(text.removeprefix("0o"), 8)
    except ValueError:
        raise ConfigError(f"not an octal mode: {text!r}") from None


def _parse_int(text: str) -> int:
    try:
        return int(text, 0) if text.strip().lower().startswith("0x") else int(text)
    except ValueError:
        raise ConfigError(f"not a whole number: {text!r}") from None


def _parse_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"not a number: {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"not a finite number: {text!r}")
    return value


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off", ""):
        return False
    raise ConfigError(f"not yes or no: {text!r}")


def _parse_users(text: str) -> frozenset[str]:
    return frozenset(u.strip() for u in text.split(",") if u.strip())


# Field name -> parser of its text form, shared by flags and environment variables.
PARSERS: dict[str, Any] = {
    "home_root": Path,
    "sessions_subdir": str,
    "depth": _parse_int,
    "layout": lambda s: s.strip().lower(),  # a preset, not a field: see `resolve`
    "active_window": _parse_float,
    "target": parse_target,
    "min_uid": _parse_int,
    "max_uid": _parse_int,
    "exclude_users": _parse_users,
    "group": str,
    "file_mode": parse_mode,
    "dir_mode": parse_mode,
    "max_file_bytes": _parse_int,
    "max_user_bytes": _parse_int,
    "max_user_files": _parse_int,
    "user_write_mb_s": _parse_float,
    "user_copies_s": _parse_float,
    "cross_mounts": _parse_bool,
    "settle": _parse_float,
    "log_level": lambda s: s.strip().upper(),
    "reconcile_interval": _parse_float,
    "workers": _parse_int,
    "stuck_after": _parse_float,
    "log_format": lambda s: s.strip().lower(),
    "state_file": Path,
    "metrics_file": Path,
    "host_id": str,
    "object_key": str,
    "upload_interval": _parse_float,
    "state_dir": Path,
    "object_checksums": lambda s: s.strip().lower(),
}


def _env_names(field: str) -> tuple[str, ...]:
    """Environment variables for a field, first match wins. `exclude_users` is the option
    `--exclude-user`, so `SESSION_WATCHER_EXCLUDE_USER` is what an operator writes; the
    field's own (plural) name is accepted too."""
    if field == "exclude_users":
        return (ENV_PREFIX + "EXCLUDE_USER", ENV_PREFIX + "EXCLUDE_USERS")
    return (ENV_PREFIX + field.upper(),)


def resolve(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """Build the Config: an explicit flag wins, else `SESSION_WATCHER_<NAME>`, else the default.

    `flags` maps field names to already-parsed values (None or absent = not given); flags
    the caller does not know about are ignored, so `reconcile` and `run` share this.
    `layout` (flag, else `SESSION_WATCHER_LAYOUT`) presets the sessions subdir and depth:
    an explicit flag for either still wins; the environment's wins only over a preset that
    came from the environment too.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    layout_flag = flags.get("layout")
    layout = layout_flag or env.get(ENV_PREFIX + "LAYOUT", "").strip()
    preset: set[str] = set()
    if layout:
        if layout not in LAYOUTS:
            raise ConfigError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
        subdir, depth = LAYOUTS[layout]
        # The preset is the default; an explicit --sessions-subdir or --depth still wins.
        values["sessions_subdir"], values["depth"] = subdir, depth
        if layout_flag:  # a --layout flag also beats the environment's subdir and depth
            preset = {"sessions_subdir", "depth"}
    for f in dataclasses.fields(Config):
        if f.name not in PARSERS:
            continue
        given = flags.get(f.name)
        if given is not None and given != ():
            values[f.name] = frozenset(given) if f.name == "exclude_users" else given
            continue
        if f.name in preset:
            continue
        for var in _env_names(f.name):
            raw = env.get(var)
            if raw is not None and raw.strip() != "":
                try:
                    values[f.name] = PARSERS[f.name](raw.strip())
                except ConfigError as e:
                    raise ConfigError(f"{var}: {e}") from None
                break
    target = values.get("target")
    if isinstance(target, Bucket):  # `--target s3://...`: the object store
        values["bucket"] = values.pop("target")
    return Config(**values)
