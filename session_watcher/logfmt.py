"""Log formats: text for journald (the default), one JSON object per line for log shippers.

Call sites pass structured fields with `extra=` (see FIELDS); the text format ignores them
(the message already says it all, with names escaped), the JSON format adds them as keys.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, TextIO

__all__ = ["FIELDS", "JsonFormatter", "fields", "setup_logging", "utf8_text"]

# The structured fields a log call may pass with `extra=`; only these reach the JSON line.
FIELDS = ("user", "file", "bytes", "latency_ms", "reason", "errno")


def fields(
    user: str | None = None,
    file: str | None = None,
    *,
    nbytes: int | None = None,
    latency_ms: float | None = None,
    reason: str | None = None,
    errno: str | None = None,
) -> dict[str, Any]:
    """The `extra=` mapping of a log call: only the fields that are given."""
    values: dict[str, Any] = {
        "user": user,
        "file": file,
        "bytes": nbytes,
        "latency_ms": None if latency_ms is None else round(latency_ms, 3),
        "reason": reason,
        "errno": errno,
    }
    return {k: v for k, v in values.items() if v is not None}


def utf8_text(value: str) -> str:
    # A user-controlled name may hold bytes that are not UTF-8 (surrogate escapes): give
    # them as \\xNN so every line is valid UTF-8 JSON; json.dumps escapes control characters.
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "msg", <fields>, "exc"?}`, one object per line."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": utf8_text(record.getMessage()),
        }
        for key in FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                out[key] = utf8_text(value) if isinstance(value, str) else value
        if record.exc_info:
            out["exc"] = utf8_text(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def setup_logging(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Log to stderr (journald collects it). Text: journald adds its own timestamps, so
    ours is left out when JOURNAL_STREAM says stderr is the journal."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        text = "%(levelname)s %(name)s: %(message)s"
        if "JOURNAL_STREAM" not in os.environ:
            text = "%(asctime)s " + text
        handler.setFormatter(logging.Formatter(text))
    # The handler filters too: a library logger whose level was lowered on purpose must
    # not print below `level`.
    handler.setLevel(level)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The AWS SDK's own lines (where it found credentials, each retry, at DEBUG the signed
    # headers) are not ours to print: the object store's failures come as our own lines.
    for name in ("boto3", "botocore", "s3transfer", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
