"""`--log-format json` lines parse with json.loads and carry the structured fields; the
progress bar of `reconcile` shows on a terminal only."""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import logging
import os
import pty
import struct
import subprocess
import sys
import termios
from typing import Any

from helpers import Tree, cli_env, root_only, run_cli

from session_watcher.cli import show_progress
from session_watcher.config import Config
from session_watcher.logfmt import fields, setup_logging


def json_lines(stderr: str) -> list[dict[str, Any]]:
    out = []
    for line in stderr.splitlines():
        doc = json.loads(line)
        assert {"ts", "level", "logger", "msg"} <= set(doc), doc
        out.append(doc)
    return out


@root_only
def test_reconcile_json_logs_parse_with_fields(tree: Tree) -> None:
    tree.add_user("alice")
    tree.write("alice", "a.jsonl", b'{"a":1}\n')
    odd = "evil\nINFO forged line \udcff.jsonl"
    tree.write_fast("alice", odd, b"x\n")
    os.symlink("/etc/shadow", tree.user("alice").sessions / "link.jsonl")
    p = run_cli("reconcile", *tree.cli_args("--log-format", "json", "--log-level", "DEBUG"))
    assert p.returncode == 0, p.stderr
    docs = json_lines(p.stderr)
    copied = {d["file"]: d for d in docs if d["msg"].startswith("copied")}
    assert copied["a.jsonl"]["user"] == "alice" and copied["a.jsonl"]["bytes"] == 8
    # The user's first copy in a minute at INFO, the next at DEBUG (one line a minute).
    assert sorted(d["level"] for d in copied.values()) == ["DEBUG", "INFO"]
    assert copied["a.jsonl"]["logger"] == "session_watcher.copy"
    assert copied["evil\nINFO forged line \\xff.jsonl"]["bytes"] == 2  # one line, escaped
    (refused,) = [d for d in docs if d["msg"].startswith("refused")]
    assert refused["level"] == "WARNING" and refused["reason"] == "symlink"
    assert refused["file"] == "link.jsonl"
    assert any(d["msg"].startswith("pass done") for d in docs)


def test_env_selects_json_and_bad_format_is_usage_error(tree: Tree) -> None:
    tree.add_user("alice")
    p = run_cli("reconcile", *tree.cli_args(), env={"SESSION_WATCHER_LOG_FORMAT": "json"})
    assert p.returncode == 0
    assert json_lines(p.stderr)
    p = run_cli("reconcile", *tree.cli_args("--log-format", "xml"))
    assert p.returncode == 2 and "log format must be text or json" in p.stderr
    p = run_cli("status", *tree.cli_args("--log-format", "json"))
    assert p.returncode == 0 and p.stderr == ""


def test_json_formatter_fields_latency_and_exceptions() -> None:
    stream = io.StringIO()
    setup_logging("DEBUG", "json", stream=stream)
    try:
        log = logging.getLogger("session_watcher.test")
        log.info(
            "copied %s",
            "'bob/x.jsonl'",
            extra=fields("bob", "x.jsonl", nbytes=5, latency_ms=1.23456),
        )
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            log.exception("failed", extra=fields("bob", "y.jsonl", errno="ENOSPC"))
    finally:
        logging.getLogger().handlers[:] = []
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "copied 'bob/x.jsonl'"
    assert (first["user"], first["file"], first["bytes"], first["latency_ms"]) == (
        "bob",
        "x.jsonl",
        5,
        1.235,
    )
    assert first["ts"].endswith("Z") and "reason" not in first
    assert second["level"] == "ERROR" and second["errno"] == "ENOSPC"
    assert "No space left on device" in second["exc"]


# --- progress -----------------------------------------------------------------------------


def _tree_with_files(tree: Tree) -> None:
    for name in ("alice", "bob"):
        tree.add_user(name)
        tree.write_fast(name, "s.jsonl", b'{"x":1}\n' * 100)


def test_no_progress_bar_on_a_pipe(tree: Tree) -> None:
    _tree_with_files(tree)
    p = run_cli("reconcile", *tree.cli_args())
    assert p.returncode == 0
    assert "\r" not in p.stderr and "home" not in p.stderr.replace("/home", "")
    assert "it/s" not in p.stderr and "%|" not in p.stderr


def _on_a_pty(tree: Tree, env: dict[str, str] | None = None, *extra: str) -> str:
    main, sub = pty.openpty()
    fcntl.ioctl(sub, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a real size
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "session_watcher", "reconcile", *tree.cli_args(*extra)],
            stdin=subprocess.DEVNULL,
            stdout=sub,
            stderr=sub,
            env=cli_env(env),
        )
        os.close(sub)
        out = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(timeout=30) == 0, out
    finally:
        os.close(main)
    return out.decode(errors="replace")


def test_progress_bar_on_a_terminal_only(tree: Tree) -> None:
    _tree_with_files(tree)
    out = _on_a_pty(tree)
    assert "reconcile: 100%" in out and "2/2" in out and "copied" in out, out
    assert "pass done" in out  # log lines still get through
    for env, extra in (
        ({"INVOCATION_ID": "x"}, ()),
        ({"JOURNAL_STREAM": "8:1"}, ()),
        (None, ("--json",)),
        (None, ("--log-format", "json")),
    ):
        out = _on_a_pty(tree, env, *extra)
        assert "%|" not in out and "home/s" not in out, (env, extra, out)


def test_show_progress_needs_a_tty() -> None:
    args = argparse.Namespace(json=False)
    # Under pytest stdout is captured (not a TTY).
    assert show_progress(args, Config(), environ={}) is (
        sys.stdout.isatty() and sys.stderr.isatty()
    )
