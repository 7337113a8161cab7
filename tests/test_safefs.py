"""safefs: descriptor-relative opens that refuse symlinks, and names made safe to log."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from session_watcher.safefs import (
    FILE_FLAGS,
    Refused,
    close_quietly,
    escape,
    open_dir_at,
    open_root_dir,
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("plain.jsonl", "'plain.jsonl'"),
        ("with space.jsonl", "'with space.jsonl'"),
        ("-rf.jsonl", "'-rf.jsonl'"),
        ("new\nline.jsonl", "'new\\x0aline.jsonl'"),
        ("tab\there\r", "'tab\\x09here\\x0d'"),
        ("esc\x1b[31m", "'esc\\x1b[31m'"),
        ("quote'and\\slash", "'quote\\'and\\\\slash'"),
        ("caf\u00e9", "'caf\u00e9'"),
        ("line\u2028sep", "'line\\u2028sep'"),
        (b"bad\xff\xfe.jsonl", "'bad\\xff\\xfe.jsonl'"),
        (os.fsdecode(b"bad\xff.jsonl"), "'bad\\xff.jsonl'"),
    ],
)
def test_escape_makes_one_printable_token(name: str | bytes, expected: str) -> None:
    out = escape(name)
    assert out == expected
    assert out.isprintable()
    assert "\n" not in out and "\r" not in out


def test_escape_is_unambiguous_for_names_that_look_escaped() -> None:
    # A name that spells an escape must not collide with the name it spells.
    assert escape("a\\x0ab") != escape("a\nb")


def test_open_dir_at_opens_a_real_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    parent = open_root_dir(tmp_path)
    try:
        fd, st = open_dir_at(parent, "d")
        try:
            assert os.path.samestat(st, os.stat(tmp_path / "d"))
        finally:
            os.close(fd)
    finally:
        os.close(parent)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("symlink-to-dir", "a symlink"),
        ("symlink-dangling", "a symlink"),
        ("file", "not a directory"),
    ],
)
def test_open_dir_at_refuses_symlinks_and_non_directories(
    tmp_path: Path, kind: str, reason: str
) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "inside").write_text("x")
    entry = tmp_path / "entry"
    if kind == "symlink-to-dir":
        entry.symlink_to(tmp_path / "real")
    elif kind == "symlink-dangling":
        entry.symlink_to(tmp_path / "nowhere")
    else:
        entry.write_text("not a dir")
    parent = open_root_dir(tmp_path)
    try:
        with pytest.raises(Refused) as info:
            open_dir_at(parent, "entry")
        assert info.value.reason == reason
    finally:
        os.close(parent)


def test_open_dir_at_missing_is_file_not_found(tmp_path: Path) -> None:
    parent = open_root_dir(tmp_path)
    try:
        with pytest.raises(FileNotFoundError):
            open_dir_at(parent, "absent")
    finally:
        os.close(parent)


def test_open_root_dir_refuses_a_symlinked_last_component(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OSError):
        open_root_dir(tmp_path / "link")
    # Its parents resolve normally: they are the operator's.
    (tmp_path / "plink").symlink_to(tmp_path)
    fd = open_root_dir(tmp_path / "plink" / "real")
    os.close(fd)


def test_file_flags_never_follow_and_never_block_on_a_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "target").write_text("secret")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    dir_fd = open_root_dir(tmp_path)
    try:
        # A FIFO with no writer: a blocking open would hang here (pytest-timeout catches it).
        fd = os.open("fifo", FILE_FLAGS, dir_fd=dir_fd)
        os.close(fd)
        with pytest.raises(OSError) as info:
            os.open("link", FILE_FLAGS, dir_fd=dir_fd)
        assert info.value.errno == 40  # ELOOP
        # A socket cannot be opened at all (ENXIO), which the copy maps to a refusal.
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(tmp_path / "sock"))
        with pytest.raises(OSError) as info:
            os.open("sock", FILE_FLAGS, dir_fd=dir_fd)
        assert info.value.errno == 6  # ENXIO
    finally:
        os.close(dir_fd)


def test_close_quietly_tolerates_none_and_closed(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    close_quietly(fd)
    with pytest.raises(OSError):
        os.fstat(fd)
    close_quietly(fd)  # already closed: no exception
    close_quietly(None)
