"""bench/noisy.py: close -> copy is taken from the victim's closes and the service's log."""

from __future__ import annotations

import pytest

from bench.noisy import close_to_copy

T0 = 1_764_964_084.0  # 2025-12-05T19:48:04Z, a whole second


def copy(ts: str, nbytes: int) -> dict[str, object]:
    return {"ts": f"2025-12-05T19:48:{ts}Z", "bytes": nbytes, "latency_ms": 0.1}


def test_each_close_meets_the_first_copy_holding_its_bytes_plus_the_truncated_ms() -> None:
    closes = [(T0 + 0.0102, 202), (T0 + 0.1105, 404), (T0 + 0.2101, 606), (T0 + 0.3101, 808)]
    copies = [
        copy("04.012", 202),  # 1.8 ms after the first close, + 1 ms for the truncation
        copy("04.150", 404),
        copy("04.400", 808),  # holds the third append too, which no copy of its own held
    ]
    got = close_to_copy(closes, copies)
    assert got == pytest.approx([2.8, 40.5, 190.9, 90.9], abs=0.01)


def test_a_copy_logged_before_the_victim_read_its_clock_counts_zero() -> None:
    """The victim is descheduled between its close and its clock; the copy is done first."""
    closes = [(T0 + 0.0102, 202), (T0 + 0.1205, 404)]
    copies = [copy("04.012", 202), copy("04.118", 404), copy("04.230", 404)]
    assert close_to_copy(closes, copies) == pytest.approx([2.8, 0.0], abs=0.01)


def test_an_append_no_copy_holds_is_left_out_not_counted_as_fast() -> None:
    closes = [(T0 + 0.0102, 202), (T0 + 0.1105, 404)]
    assert close_to_copy(closes, [copy("04.012", 202)]) == pytest.approx([2.8], abs=0.01)
