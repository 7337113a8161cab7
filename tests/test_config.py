"""Config: defaults, validation, and resolution (flag, else SESSION_WATCHER_* env, else default)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from session_watcher.config import Config, ConfigError, parse_mode, resolve


def test_defaults_are_the_documented_ones() -> None:
    c = Config()
    assert c.home_root == Path("/home")
    assert c.sessions_subdir == "user/sessions"
    assert c.sessions_parts == ("user", "sessions")
    assert c.target == Path("/data/user_sessions")
    assert (c.min_uid, c.max_uid) == (1000, 60000)
    assert c.exclude_users == frozenset()
    assert c.group == "data-ops"
    assert (c.file_mode, c.dir_mode) == (0o640, 0o2770)
    assert c.max_file_bytes == 1 << 30
    assert c.settle == 5.0
    assert c.log_level == "INFO"


def test_config_is_frozen() -> None:
    c = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.group = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "mode"), [("640", 0o640), ("0640", 0o640), ("0o640", 0o640), ("2770", 0o2770)]
)
def test_parse_mode_accepts_operator_spellings(text: str, mode: int) -> None:
    assert parse_mode(text) == mode


@pytest.mark.parametrize("text", ["rw-r-----", "999", "0x1a4", "", "6 40"])
def test_parse_mode_rejects_non_octal(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_mode(text)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"home_root": Path("relative/home")},
        {"target": Path("store")},
        {"sessions_subdir": "/abs/sessions"},
        {"sessions_subdir": "user/../../etc"},
        {"sessions_subdir": ""},
        {"min_uid": 2000, "max_uid": 1000},
        {"min_uid": -1},
        {"file_mode": 0o4640},
        {"file_mode": 0o10000},
        {"dir_mode": -1},
        {"max_file_bytes": 0},
        {"settle": -1.0},
        {"log_level": "LOUD"},
        {"workers": 0},
    ],
)
def test_unusable_settings_are_config_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Config(**kwargs)


def test_flag_wins_over_env_and_env_over_default() -> None:
    env = {
        "SESSION_WATCHER_HOME_ROOT": "/env/home",
        "SESSION_WATCHER_TARGET": "/env/store",
        "SESSION_WATCHER_MIN_UID": "1500",
        "SESSION_WATCHER_FILE_MODE": "0600",
        "SESSION_WATCHER_SETTLE": "2.5",
        "SESSION_WATCHER_LOG_LEVEL": "debug",
    }
    c = resolve({"home_root": Path("/flag/home"), "min_uid": None}, env)
    assert c.home_root == Path("/flag/home")  # flag
    assert c.target == Path("/env/store")  # env
    assert c.min_uid == 1500  # flag None = not given
    assert c.file_mode == 0o600
    assert c.settle == 2.5
    assert c.log_level == "DEBUG"
    assert c.max_uid == 60000  # default


def test_empty_env_values_are_ignored() -> None:
    assert resolve({}, {"SESSION_WATCHER_GROUP": "  "}).group == "data-ops"


@pytest.mark.parametrize("var", ["SESSION_WATCHER_EXCLUDE_USER", "SESSION_WATCHER_EXCLUDE_USERS"])
def test_exclude_user_env_is_comma_separated(var: str) -> None:
    # The issue names env vars after the option (`--exclude-user`); the plural is accepted too.
    c = resolve({}, {var: "alice, bob,,carol "})
    assert c.exclude_users == frozenset({"alice", "bob", "carol"})


def test_exclude_user_flag_wins_over_env() -> None:
    c = resolve({"exclude_users": ["dave"]}, {"SESSION_WATCHER_EXCLUDE_USER": "alice"})
    assert c.exclude_users == frozenset({"dave"})


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("SESSION_WATCHER_MIN_UID", "lots"),
        ("SESSION_WATCHER_DIR_MODE", "rwx"),
        ("SESSION_WATCHER_SETTLE", "nan"),
        ("SESSION_WATCHER_MAX_FILE_BYTES", "1.5"),
    ],
)
def test_bad_env_value_names_the_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError, match=var):
        resolve({}, {var: value})


def test_resolve_ignores_unrelated_environment() -> None:
    assert resolve({}, {"HOME": "/root", "SESSION_WATCHER": "x"}) == Config()
