"""The progress bar of `reconcile` at a terminal: homes done of those found, bytes copied.

UI only: the library's `reconcile(progress=...)` takes any callable; this is the CLI's.
Log lines go through tqdm while the bar is up, so they do not tear it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .reconcile import Progress

__all__ = ["human_bytes", "progress_bar"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@contextmanager
def progress_bar() -> Iterator[Callable[[Progress], None]]:
    bar = tqdm(total=0, unit="home", desc="reconcile", file=sys.stderr, leave=True, smoothing=0)

    def update(p: Progress) -> None:
        if bar.total != p.users_total:
            bar.total = p.users_total
            bar.refresh()
        if p.users_done > bar.n:
            bar.update(p.users_done - bar.n)
        bar.set_postfix_str(f"{human_bytes(p.bytes_copied)} copied", refresh=False)

    try:
        with logging_redirect_tqdm():
            yield update
    finally:
        bar.close()
