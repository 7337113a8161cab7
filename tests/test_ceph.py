"""The real Ceph RGW of tests/ceph.py does what the object-store code relies on: conditional
create and replace, multipart with a server-side UploadPartCopy, HEAD, and objects that
survive a gateway kill -9 and a whole-cluster restart."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from botocore.exceptions import ClientError
from ceph import Rgw

MiB = 1 << 20


def _bucket(rgw: Rgw) -> tuple[Any, str]:
    s3 = rgw.client()
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return s3, name


def _code(e: pytest.ExceptionInfo[ClientError]) -> str:
    return str(e.value.response["Error"]["Code"])


def test_conditional_put(ceph_rgw: Rgw, ceph_bucket: str) -> None:
    s3, b = ceph_rgw.client(), ceph_bucket
    r = s3.put_object(Bucket=b, Key="h/u/a.jsonl", Body=b"{}\n", IfNoneMatch="*")
    etag = r["ETag"]
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=b, Key="h/u/a.jsonl", Body=b"{}\n{}\n", IfNoneMatch="*")
    assert _code(e) == "PreconditionFailed"
    # RGW 16 compares If-Match with the ETag unquoted.
    r2 = s3.put_object(Bucket=b, Key="h/u/a.jsonl", Body=b"{}\n{}\n", IfMatch=etag.strip('"'))
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=b, Key="h/u/a.jsonl", Body=b"x\n", IfMatch=etag.strip('"'))
    assert _code(e) == "PreconditionFailed"
    head = s3.head_object(Bucket=b, Key="h/u/a.jsonl")
    assert head["ContentLength"] == 6 and head["ETag"] == r2["ETag"]


def test_multipart_with_upload_part_copy(ceph_rgw: Rgw) -> None:
    s3, b = _bucket(ceph_rgw)
    first = b"a" * (5 * MiB) + b"\n"
    s3.put_object(Bucket=b, Key="k", Body=first, ContentType="application/x-ndjson")
    tail = b"b" * 1000 + b"\n"
    up = s3.create_multipart_upload(
        Bucket=b, Key="k", ContentType="application/x-ndjson", Metadata={"source-size": "x"}
    )
    uid = up["UploadId"]
    p1 = s3.upload_part_copy(
        Bucket=b, Key="k", UploadId=uid, PartNumber=1, CopySource={"Bucket": b, "Key": "k"}
    )
    p2 = s3.upload_part(Bucket=b, Key="k", UploadId=uid, PartNumber=2, Body=tail)
    assert s3.list_multipart_uploads(Bucket=b).get("Uploads")
    s3.complete_multipart_upload(
        Bucket=b,
        Key="k",
        UploadId=uid,
        MultipartUpload={
            "Parts": [
                {"PartNumber": 1, "ETag": p1["CopyPartResult"]["ETag"]},
                {"PartNumber": 2, "ETag": p2["ETag"]},
            ]
        },
    )
    head = s3.head_object(Bucket=b, Key="k")  # RGW's complete may return an empty ETag
    assert head["ContentLength"] == len(first) + len(tail)
    assert head["ETag"].strip('"').endswith("-2")
    assert head["Metadata"] == {"source-size": "x"}
    assert s3.get_object(Bucket=b, Key="k", Range="bytes=-1002")["Body"].read() == b"\n" + tail
    assert not s3.list_multipart_uploads(Bucket=b).get("Uploads")


def test_objects_survive_gateway_and_cluster_restarts(ceph_rgw: Rgw) -> None:
    s3, b = _bucket(ceph_rgw)
    s3.put_object(Bucket=b, Key="k", Body=b"1\n")
    ceph_rgw.stop_rgw()
    assert not ceph_rgw.rgw_ready()
    ceph_rgw.start_rgw()
    assert s3.get_object(Bucket=b, Key="k")["Body"].read() == b"1\n"
    ceph_rgw.stop_cluster()
    ceph_rgw.start_cluster()
    s3 = ceph_rgw.client()
    assert s3.get_object(Bucket=b, Key="k")["Body"].read() == b"1\n"
    s3.put_object(Bucket=b, Key="k2", Body=b"2\n")
    assert {o["Key"] for o in s3.list_objects_v2(Bucket=b)["Contents"]} == {"k", "k2"}
