"""Fixtures shared by every test module: a real home tree, a tmpfs mount, a thread-leak guard,
the service as a real process (`start`) and a stand-in for systemd's notify socket."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ceph import Rgw, missing_binaries, start_rgw
from harness import START_TIMEOUT, NotifySocket, Service, StartFn
from helpers import Tree, cli_env, make_base, remove_base, wait_for


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a thread running (after a short grace period to stop)."""
    before = set(threading.enumerate())
    yield

    def leaked() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in before and t.is_alive()]

    try:
        wait_for(lambda: not leaked(), timeout=5.0, what="threads to finish")
    except AssertionError:
        pytest.fail(f"test leaked threads: {leaked()}")


@pytest.fixture
def tree() -> Iterator[Tree]:
    """A home root `tree.home_root` (users added with `tree.add_user(name)`, owned by uid
    1000+i as root) and a store path `tree.target` that does not exist yet."""
    base = make_base()
    try:
        yield Tree(base)
    finally:
        remove_base(base)


@pytest.fixture
def tmpfs(tree: Tree) -> Iterator[Callable[[Path, str], Path]]:
    """`tmpfs(dir, size)` mounts a tmpfs of that size on `dir` (root only); unmounted after,
    before `tree` is removed (hence the dependency)."""
    mounted: list[Path] = []

    def mount(where: Path, size: str) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
            check=True,
            capture_output=True,
        )
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        if subprocess.run(["umount", str(where)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False)
        assert not os.path.ismount(where)


@pytest.fixture
def start(tree: Tree) -> Iterator[StartFn]:
    """`start(*flags, env=..., ready=True)` runs `session-watcher run` on `tree` (settle 0,
    no periodic pass unless the flags say otherwise) and, with `ready`, waits for its
    "ready" line. An `env` value of "" removes that variable. Every process started is
    killed in teardown."""
    started: list[Service] = []

    def _start(*extra: str, env: dict[str, str] | None = None, ready: bool = True) -> Service:
        argv = [
            sys.executable,
            "-m",
            "session_watcher",
            "run",
            # DEBUG: every copy's line (at INFO a user gets one a minute; see copy.py).
            *tree.cli_args(
                "--settle", "0", "--reconcile-interval", "0", "--log-level", "DEBUG", *extra
            ),
        ]
        log_path = tree.base / f"service-{len(started)}.log"
        log_file = log_path.open("wb")
        full_env = {k: v for k, v in cli_env(env).items() if v != ""}
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=full_env
        )
        svc = Service(proc, log_path, log_file)
        started.append(svc)
        if ready:
            svc.wait_log("ready: watching", timeout=START_TIMEOUT)
        return svc

    yield _start
    for svc in started:
        svc.close()


@pytest.fixture
def notify_path(tree: Tree) -> Iterator[NotifySocket]:
    # tree.base is short (/tmp/sw-test-...): sun_path holds only 108 bytes.
    ns = NotifySocket(str(tree.base / "notify.sock"))
    yield ns
    ns.close()


@pytest.fixture(scope="session")
def ceph_rgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rgw]:
    """One real single-node Ceph cluster with radosgw for the whole session (tests/ceph.py),
    wherever Debian's ceph-mon, ceph-osd, radosgw and ceph-common are installed (.ci/run
    installs them). Tests create their own buckets; a test that stops the gateway or the
    cluster starts it again before it ends."""
    missing = missing_binaries()
    if missing:
        pytest.skip(
            f"Ceph not installed ({', '.join(missing)} missing): apt-get install -y "
            "--no-install-recommends ceph-mon ceph-osd radosgw ceph-common"
        )
    rgw = start_rgw(tmp_path_factory.mktemp("ceph"))
    try:
        yield rgw
    finally:
        rgw.cleanup()


@pytest.fixture
def ceph_bucket(ceph_rgw: Rgw) -> str:
    """A new, empty bucket on the session's Ceph RGW (name unique per test)."""
    name = f"t-{uuid.uuid4().hex[:16]}"
    s3 = ceph_rgw.client()
    try:
        s3.create_bucket(Bucket=name)
    finally:
        s3.close()
    return name
