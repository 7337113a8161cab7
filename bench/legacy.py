"""The legacy collector's algorithm, reimplemented for comparison (its code is not copied):
for every home, every `*.jsonl` in user/sessions is copied with its metadata unless a file
of that name already exists in the store. Run as `python -m bench.legacy HOME_ROOT STORE`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def collect(home_root: Path, store: Path, min_uid: int = 0) -> int:
    copied = 0
    for home in home_root.iterdir():
        if not home.is_dir() or home.name.startswith(".") or home.stat().st_uid < min_uid:
            continue
        sessions = home / "user" / "sessions"
        if not sessions.exists():
            continue
        for src in sessions.iterdir():
            dst = store / home.name / src.name
            if src.is_file() and src.suffix == ".jsonl" and not dst.exists():  # skip-if-exists
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
                copied += 1
    return copied


if __name__ == "__main__":
    collect(Path(sys.argv[1]), Path(sys.argv[2]))
