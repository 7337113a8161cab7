"""Command line: `session-watcher reconcile|run|status`. Parses, builds the Config, maps
errors to exit codes. Exit codes: 0 ok, 1 a file failed (or the service failed, or `status`
found the store lagging), 2 usage/configuration."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __version__
from .config import ENV_PREFIX, PARSERS, Config, ConfigError, resolve
from .logfmt import setup_logging as _setup_logging
from .safefs import escape

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

log = logging.getLogger("session_watcher")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (no usage dump) and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _common(p: argparse.ArgumentParser) -> None:
    add = p.add_argument
    add("--home-root", metavar="DIR", help="where homes live (default /home)")
    add(
        "--sessions-subdir",
        metavar="REL",
        help="sessions directory inside each home (default user/sessions)",
    )
    add(
        "--depth",
        metavar="N",
        help="directory levels below the sessions directory that hold *.jsonl (default 1)",
    )
    add(
        "--layout",
        choices=["flat", "claude-code"],
        help="preset: flat (user/sessions, depth 1) or claude-code (.claude/projects, depth 4)",
    )
    add(
        "--active-window",
        metavar="SECONDS",
        help="nested directories of sessions changed within this are watched (86400)",
    )
    add(
        "--target",
        metavar="DIR|s3://BUCKET[/PREFIX]",
        help="the store: a directory (default /data/user_sessions) or an S3-compatible bucket",
    )
    add("--min-uid", metavar="N", help="lowest qualifying home owner uid (default 1000)")
    add("--max-uid", metavar="N", help="highest qualifying home owner uid (default 60000)")
    add(
        "--exclude-user",
        dest="exclude_users",
        metavar="NAME",
        action="append",
        help="home directory name to leave out; repeatable",
    )
    add("--group", metavar="NAME", help="group of everything created in the store (data-ops)")
    add("--file-mode", metavar="OCT", help="mode of store files (default 0640)")
    add("--dir-mode", metavar="OCT", help="mode of store directories (default 2770)")
    add("--max-file-bytes", metavar="N", help="larger sources are refused (default 1 GiB)")
    add(
        "--max-user-bytes",
        metavar="N",
        help="bytes one user may hold in the store; past it new copies are refused (10 GiB)",
    )
    add(
        "--max-user-files",
        metavar="N",
        help="files one user may hold in the store (default 100000)",
    )
    add(
        "--cross-mounts",
        action="store_const",
        const=True,
        help="copy from file systems mounted below a home (default: refused, like rsync -x)",
    )
    add(
        "--settle",
        metavar="SECONDS",
        help="a source quiet this long is copied whole, unfinished last line included (5)",
    )
    add(
        "--host-id",
        metavar="NAME",
        help="this host in object keys (s3:// targets; default the short host name)",
    )
    add(
        "--object-key",
        metavar="TEMPLATE",
        help="object key below the prefix, with {host} {user} {name} ({host}/{user}/{name})",
    )
    add(
        "--state-dir",
        metavar="DIR",
        help="index of uploaded objects and instance lock (default /var/lib/session-watcher)",
    )
    add(
        "--object-checksums",
        metavar="MODE",
        help="botocore checksums: when_required (default; RGW, MinIO) or when_supported",
    )
    add("-v", "--verbose", action="store_true", help="log at DEBUG level")
    add("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    add(
        "--log-format",
        metavar="FORMAT",
        help="text (default; for journald) or json (one object per line, for log shippers)",
    )


def _state_file(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-file",
        metavar="PATH",
        help="the service's state file (default /run/session-watcher/state.json)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="session-watcher",
        description="Copy users' session transcripts into a central store, atomically.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )

    rec = sub.add_parser("reconcile", help="run one full pass and exit")
    _common(rec)
    rec.add_argument(
        "--dry-run", action="store_true", help="decide and log what would be copied; write nothing"
    )
    rec.add_argument(
        "--json", action="store_true", help="print the pass's counts as one JSON object on stdout"
    )
    rec.add_argument(
        "--workers", metavar="N", help="threads that copy (checks stay on one; default 4)"
    )
    rec.set_defaults(func=_cmd_reconcile)

    run = sub.add_parser("run", help="watch and copy continuously (the systemd service)")
    _common(run)
    run.add_argument(
        "--reconcile-interval",
        metavar="SECONDS",
        help="seconds between full passes; 0 = only at start (default 600)",
    )
    run.add_argument(
        "--workers",
        metavar="N",
        help="threads for live copies, and for each pass's copies (default 4)",
    )
    run.add_argument(
        "--stuck-after",
        metavar="SECONDS",
        help="a user whose file system has not answered this long is skipped until it does (15)",
    )
    run.add_argument(
        "--user-write-mb-s",
        metavar="MB",
        help="MB/s one user's files may make the service write; 0 = unlimited (default 32)",
    )
    run.add_argument(
        "--user-copies-s",
        metavar="N",
        help="copies a second one user's files may cause; 0 = unlimited (default 100)",
    )
    run.add_argument(
        "--upload-interval",
        metavar="SECONDS",
        help="s3://: a growing transcript goes up at least this often (default 30)",
    )
    _state_file(run)
    run.add_argument(
        "--metrics-file",
        metavar="PATH",
        help="write Prometheus metrics here every 15 s (node_exporter textfile; default none)",
    )
    run.set_defaults(func=_cmd_run)

    st = sub.add_parser(
        "status", help="compare sources with the store (read-only); exit 1 if it is lagging"
    )
    _common(st)
    _state_file(st)
    st.add_argument(
        "--grace",
        metavar="SECONDS",
        help="files changed more recently than this may still be on their way (default 120)",
    )
    st.add_argument("--json", action="store_true", help="print the report as one JSON object")
    st.set_defaults(func=_cmd_status)
    return parser


def config_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Config:
    """Flags (as text) → typed values, then `resolve` adds environment and defaults."""
    flags: dict[str, Any] = {}
    for name, parse in PARSERS.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if name == "exclude_users":
            flags[name] = frozenset(u for v in value for u in parse(v))
        elif isinstance(value, bool):  # a switch (--cross-mounts)
            flags[name] = value
        else:
            try:
                flags[name] = parse(value)
            except ConfigError as e:
                raise ConfigError(f"--{name.replace('_', '-')}: {e}") from None
    if getattr(args, "verbose", False) and "log_level" not in flags:
        flags["log_level"] = "DEBUG"
    return resolve(flags, os.environ if environ is None else environ)


def setup_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr (journald collects it), as text or one JSON object per line."""
    _setup_logging(level, fmt)


def _check_home_root(config: Config) -> None:
    root = config.home_root
    # The roots are opened with O_NOFOLLOW like everything else; say so plainly rather
    # than failing later with ELOOP (e.g. /home -> /var/home on some distributions).
    if root.is_symlink():
        raise ConfigError(
            f"home root {escape(str(root))} is a symlink; give the real path "
            f"({escape(os.path.realpath(root))})"
        )
    if not root.is_dir():
        raise ConfigError(f"home root {escape(str(root))} is not a directory")


def _cmd_reconcile(args: argparse.Namespace, config: Config) -> int:
    from .reconcile import reconcile

    _check_home_root(config)
    if show_progress(args, config):
        from .progress import progress_bar

        with progress_bar() as progress:
            stats = reconcile(config, dry_run=args.dry_run, progress=progress)
    else:
        stats = reconcile(config, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(stats.as_dict()), flush=True)
    return EXIT_FAILED if stats.files_failed else EXIT_OK


def show_progress(
    args: argparse.Namespace, config: Config, environ: dict[str, str] | None = None
) -> bool:
    """A progress bar only for a person at a terminal: never on a pipe, with --json or
    JSON logs, or under systemd (JOURNAL_STREAM / INVOCATION_ID)."""
    env = os.environ if environ is None else environ
    return (
        sys.stdout.isatty()
        and sys.stderr.isatty()
        and not getattr(args, "json", False)
        and config.log_format == "text"
        and "JOURNAL_STREAM" not in env
        and "INVOCATION_ID" not in env
    )


def _cmd_status(args: argparse.Namespace, config: Config) -> int:
    from .status import check, render_json, render_text

    # Like every option: the flag, else SESSION_WATCHER_GRACE, else 120 s.
    text = args.grace
    if text is None:
        text = os.environ.get(ENV_PREFIX + "GRACE", "").strip() or "120"
    try:
        grace = float(text)
    except ValueError:
        raise ConfigError(f"--grace: not a number: {text!r}") from None
    if not 0 <= grace < float("inf"):
        raise ConfigError(f"--grace must be a number of seconds >= 0, got {text!r}")
    _check_home_root(config)
    report = check(config, grace=grace)
    sys.stdout.write((render_json(report) + "\n") if args.json else render_text(report))
    sys.stdout.flush()
    return EXIT_OK if report.ok else EXIT_FAILED


def _cmd_run(args: argparse.Namespace, config: Config) -> int:
    from .service import run_service

    _check_home_root(config)
    return run_service(config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print(f"session-watcher: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(config.log_level, config.log_format)
    try:
        return int(args.func(args, config))
    except ConfigError as e:
        print(f"session-watcher: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        log.error("%s", e)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
