"""A real single-node Ceph cluster with an S3 gateway, started from Python for the tests,
the benchmark and the soak: one mon, one OSD on memstore, radosgw, all on 127.0.0.1 under
one temporary directory (Debian's `ceph-mon ceph-osd radosgw ceph-common` packages).

    rgw = start_rgw(tmpdir)      # a few seconds; rgw.endpoint, rgw.access_key, rgw.secret_key
    rgw.stop_rgw(); rgw.start_rgw()          # radosgw only (kill -9 by default)
    rgw.stop_cluster(); rgw.start_cluster()  # every daemon; objects survive (memstore saves
                                             # its contents on a clean OSD shutdown)
    rgw.stop()                               # everything, idempotent; also at exit

Readiness is polled (an anonymous ListBuckets over HTTP), never slept for. Nothing here
changes the machine: configuration, data, logs and sockets live under the one directory.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BINARIES", "Rgw", "missing_binaries", "start_rgw"]

BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool")
ACCESS_KEY = "SWTESTACCESSKEY00001"
SECRET_KEY = "sw-test-secret-key-not-a-real-one-0000001"  # noqa: S105  (a local test cluster)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def free_port() -> int:
    """A port that is free now (the kernel's choice; the caller binds it shortly after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CONF = """\
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
public addr = 127.0.0.1
run dir = {d}/run
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
log to stderr = false
err to stderr = true
auth cluster required = none
auth service required = none
auth client required = none
auth supported = none
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
ms bind msgr1 = false
ms bind msgr2 = true
paxos propose interval = 0.05
mon data avail crit = 0
mon data avail warn = 0
keyring = {d}/keyring

[mon]
mon data = {d}/mon
mon cluster log file = {d}/log/cluster.log

[osd]
osd data = {d}/osd
osd objectstore = memstore
memstore device bytes = 4294967296
osd journal size = 100
osd fast shutdown = false
osd max object name len = 460
osd max object namespace len = 64

[client.rgw]
auth client required = none
ms mon client mode = crc
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw data = {d}/rgw
rgw dns name = localhost
rgw enable usage log = false
rgw lc debug interval = 10
"""


class CephError(RuntimeError):
    pass


@dataclass
class Rgw:
    """A running single-node cluster; see the module docstring."""

    dir: Path
    mon_port: int
    rgw_port: int
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = "us-east-1"
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    start_seconds: float = 0.0

    @property
    def conf(self) -> Path:
        return self.dir / "ceph.conf"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.rgw_port}"

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The standard AWS variables that point a client (boto3, aws, session-watcher) at
        this gateway (or at `endpoint`, e.g. a proxy in front of it)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        }

    def client(self, endpoint: str | None = None, **config: Any) -> Any:
        """A boto3 S3 client for this gateway (or `endpoint`, e.g. a proxy in front of it),
        checksums only when required (RGW 16 rejects botocore's default trailer checksums
        with 411 MissingContentLength), path-style addressing, few retries."""
        import boto3
        from botocore.config import Config

        cfg = Config(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 2, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
            **config,
        )
        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=cfg,
        )

    # --- processes ------------------------------------------------------------------------

    def _cmd(self, *args: str, timeout: float = 60) -> str:
        r = subprocess.run(
            [*args, "-c", str(self.conf)],
            capture_output=True,
            timeout=timeout,
            cwd=self.dir,
            check=False,
        )
        if r.returncode != 0:
            raise CephError(f"{' '.join(args)}: exit {r.returncode}: {r.stderr.decode()[-800:]}")
        return r.stdout.decode()

    def _spawn(self, name: str, *args: str) -> None:
        with open(self.dir / "log" / f"{name}.stderr", "ab") as err:
            self.procs[name] = subprocess.Popen(
                [*args, "-f", "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=self.dir,
                start_new_session=True,  # a ^C of the test run does not reach the daemons
            )

    def _kill(self, name: str, sig: int = signal.SIGKILL, timeout: float = 30) -> None:
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        try:
            p.send_signal(sig)
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def _check_alive(self, *names: str) -> None:
        for n in names:
            p = self.procs.get(n)
            if p is None or p.poll() is not None:
                log = self.dir / "log" / f"{n}.stderr"
                tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
                code = None if p is None else p.returncode
                raise CephError(f"{n} exited ({code}) while starting: {tail}")

    def _wait(self, cond: object, what: str, timeout: float, *alive: str) -> None:
        assert callable(cond)
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            self._check_alive(*alive)
            if cond():
                return
            if time.monotonic() > deadline:
                raise CephError(f"{what}: not ready after {timeout:.0f} s (logs in {self.dir}/log)")
            time.sleep(delay)
            delay = min(0.2, delay * 1.5)

    def rgw_ready(self) -> bool:
        """True when the gateway answers an anonymous ListBuckets."""
        conn = http.client.HTTPConnection("127.0.0.1", self.rgw_port, timeout=2)
        try:
            conn.request("GET", "/")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def _osd_up(self) -> bool:
        try:
            out = self._cmd("ceph", "osd", "stat", timeout=10)
        except (CephError, subprocess.TimeoutExpired):
            return False
        return "1 up" in out and "1 in" in out

    def start_mon(self) -> None:
        self._spawn("mon", "ceph-mon", "-i", "a")

    def start_osd(self) -> None:
        self._spawn("osd", "ceph-osd", "-i", "0")
        self._wait(self._osd_up, "ceph-osd", 60, "mon", "osd")

    def start_rgw(self, timeout: float = 60) -> None:
        """Start radosgw (again) and wait until it answers."""
        if "rgw" in self.procs and self.procs["rgw"].poll() is None:
            return
        self._spawn("rgw", "radosgw", "-n", "client.rgw")
        self._wait(self.rgw_ready, "radosgw", timeout, "rgw")

    def stop_rgw(self, sig: int = signal.SIGKILL) -> None:
        """Stop radosgw only (kill -9 by default): the S3 endpoint refuses connections."""
        self._kill("rgw", sig)

    def stop_cluster(self) -> None:
        """Stop every daemon: radosgw at once, the OSD cleanly (memstore writes its contents
        to disk on a clean shutdown, so objects survive `start_cluster`), then the mon."""
        self._kill("rgw")
        self._kill("osd", signal.SIGTERM, timeout=60)
        self._kill("mon", signal.SIGTERM)

    def start_cluster(self) -> None:
        self.start_mon()
        self.start_osd()
        self.start_rgw()

    def stop(self) -> None:
        for n in ("rgw", "osd", "mon"):
            self._kill(n)

    def cleanup(self) -> None:
        """stop() and remove the directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_rgw(tmpdir: Path | str, *, rgw_port: int = 0) -> Rgw:
    """Create and start a fresh cluster in a new directory under `tmpdir`; the caller owns
    it (`stop()` or `cleanup()`), and an atexit hook stops it in any case."""
    missing = missing_binaries()
    if missing:
        raise CephError(
            f"not installed: {', '.join(missing)} (apt-get install -y --no-install-recommends "
            "ceph-mon ceph-osd radosgw ceph-common)"
        )
    t0 = time.monotonic()
    base = Path(tmpdir)
    base.mkdir(parents=True, exist_ok=True)
    d = Path(os.path.realpath(base / f"ceph-{uuid.uuid4().hex[:8]}"))
    for sub in ("run", "log", "mon", "osd", "rgw"):
        (d / sub).mkdir(parents=True)
    rgw = Rgw(d, free_port(), rgw_port or free_port())
    atexit.register(rgw.stop)
    fsid = str(uuid.uuid4())
    rgw.conf.write_text(CONF.format(fsid=fsid, mon_port=rgw.mon_port, rgw_port=rgw.rgw_port, d=d))
    try:
        monmap = d / "monmap"
        subprocess.run(
            [
                "monmaptool",
                "--create",
                "--clobber",
                "--fsid",
                fsid,
                "--addv",
                "a",
                f"[v2:127.0.0.1:{rgw.mon_port}]",
                "--enable-all-features",
                "--set-min-mon-release",
                "16",
                str(monmap),
            ],
            check=True,
            capture_output=True,
        )
        keyring = d / "keyring"
        subprocess.run(
            [
                "ceph-authtool",
                "--create-keyring",
                "--gen-key",
                "-n",
                "mon.",
                "--cap",
                "mon",
                "allow *",
                str(keyring),
            ],
            check=True,
            capture_output=True,
        )
        rgw._cmd(
            "ceph-mon", "--mkfs", "-i", "a", "--monmap", str(monmap), "--keyring", str(keyring)
        )
        rgw.start_mon()
        osd_uuid = str(uuid.uuid4())
        osd_id = rgw._cmd("ceph", "osd", "new", osd_uuid).strip()
        if osd_id != "0":
            raise CephError(f"ceph osd new: expected id 0, got {osd_id!r}")
        rgw._cmd("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
        rgw.start_osd()
        rgw._cmd(
            "radosgw-admin",
            "-n",
            "client.rgw",
            "user",
            "create",
            "--uid",
            "sw",
            "--display-name",
            "session-watcher tests",
            "--access-key",
            rgw.access_key,
            "--secret-key",
            rgw.secret_key,
        )
        rgw.start_rgw()
    except BaseException:
        rgw.stop()
        raise
    rgw.start_seconds = time.monotonic() - t0
    return rgw


if __name__ == "__main__":  # `python tests/ceph.py`: start one, print how to use it, wait
    import sys
    import tempfile

    top = tempfile.mkdtemp(prefix="sw-ceph-")
    r = start_rgw(top)
    print(f"started in {r.start_seconds:.1f} s; dir {r.dir}", file=sys.stderr)
    for k, v in r.env().items():
        print(f"export {k}={v}")
    with contextlib.suppress(KeyboardInterrupt):
        signal.pause()
    r.cleanup()
    shutil.rmtree(top, ignore_errors=True)
