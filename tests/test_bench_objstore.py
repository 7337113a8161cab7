"""The object-store bench's bucket watcher: it sees which line an object holds, and flags
an object that does not end a line or differs from its source as torn."""

from __future__ import annotations

import time
from pathlib import Path

from ceph import Rgw
from helpers import wait_for

from bench.objstore import BucketWatch, _last_seq
from bench.tree import line


def test_last_seq() -> None:
    assert _last_seq(line(1, 100) + line(2, 100)) == 2
    assert _last_seq(line(1, 100) + line(2, 100)[:-5]) == 1
    assert _last_seq(b"") == -1


def test_watch_records_arrivals_and_torn_objects(
    ceph_rgw: Rgw, ceph_bucket: str, tmp_path: Path
) -> None:
    good, torn = tmp_path / "good.jsonl", tmp_path / "torn.jsonl"
    good.write_bytes(line(1, 300) + line(2, 300))
    torn.write_bytes(line(1, 300) + line(2, 300))
    s3 = ceph_rgw.client()
    watch = BucketWatch(ceph_rgw, ceph_bucket, {"g": good, "t": torn})
    try:
        t0 = time.monotonic()
        s3.put_object(Bucket=ceph_bucket, Key="g", Body=good.read_bytes())
        s3.put_object(Bucket=ceph_bucket, Key="t", Body=torn.read_bytes()[:400])
        s3.put_object(Bucket=ceph_bucket, Key="other", Body=b"x\n")  # not watched
        wait_for(lambda: len(watch.arrivals) == 2, timeout=10, what="both objects seen")
        assert watch.current() == ["t"]
        assert watch.exact() == ["t"]
    finally:
        watch.stop()
        s3.close()
    by_key = {a.key[1]: a for a in watch.arrivals}
    assert by_key["g"].seq == 2 and by_key["g"].t >= t0
    assert by_key["t"].seq == 1
    assert watch.torn == ["t at 400 B"]
