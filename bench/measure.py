"""Shared measurement pieces: the observer process, close→arrival matching, percentiles,
and the table row type."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .peers import PROJECT

__all__ = ["Arrival", "Observer", "Row", "landing_times", "median", "pct"]


@dataclass(frozen=True)
class Arrival:
    key: tuple[int, str]  # (store dir index, file name)
    t: float  # CLOCK_MONOTONIC when the observer read the event
    size: int
    seq: int  # seq of the last complete line in the landed copy


@dataclass(frozen=True)
class Row:
    scenario: str
    tool: str
    measure: str
    result: str
    target: str = ""
    verdict: str = ""


class Observer:
    """`python -m bench.observer` on the given store directories."""

    def __init__(self, dirs: list[Path]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.observer", *map(str, dirs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=PROJECT,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("observer failed to start")
        self.overflows = 0

    def stop(self) -> list[Arrival]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        data = json.loads(self.proc.stdout.read())
        self.proc.stdout.close()
        self.proc.wait()
        self.overflows = int(data["overflows"])
        return [
            Arrival((int(i), str(n)), float(t), int(s), int(q)) for i, n, t, s, q in data["records"]
        ]


def landing_times(
    closes: list[tuple[tuple[int, str], int, float]], arrivals: list[Arrival]
) -> list[float | None]:
    """For each close (key, seq, t_close): seconds until the first arrival of that file
    whose copy contains that seq (None: never arrived)."""
    by_key: dict[tuple[int, str], list[Arrival]] = defaultdict(list)
    for a in sorted(arrivals, key=lambda a: a.t):
        by_key[a.key].append(a)
    out: list[float | None] = []
    for key, seq, t in closes:
        landed = next((a.t for a in by_key.get(key, []) if a.seq >= seq), None)
        out.append(None if landed is None else landed - t)
    return out


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


def median(values: list[float]) -> float:
    return statistics.median(values)
