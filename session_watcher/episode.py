"""Warn once per episode: a condition that can hit many keys at once (the inotify watch
limit reached, EMFILE) is one WARNING when the first key starts failing and one INFO when
the last one works again, not one line per key per retry.

Pure bookkeeping: the caller logs what `fail`, `ok` and `keep` say.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable

__all__ = ["Episode"]


class Episode:
    """The set of keys failing now; an episode lasts while the set is not empty."""

    def __init__(self) -> None:
        self._failing: set[Hashable] = set()
        self.total = 0  # keys that failed during the current (or last) episode

    def __len__(self) -> int:
        return len(self._failing)

    def fail(self, key: Hashable) -> bool:
        """`key` failed; True if this failure opens an episode (say so, once)."""
        opens = not self._failing
        if opens:
            self.total = 0
        if key not in self._failing:
            self._failing.add(key)
            self.total += 1
        return opens

    def ok(self, key: Hashable) -> bool:
        """`key` works (again); True if this closes the episode."""
        if key not in self._failing:
            return False
        self._failing.discard(key)
        return not self._failing

    def keep(self, keys: Collection[Hashable]) -> bool:
        """Forget the failing keys not in `keys` (gone, or no longer wanted); True if that
        closes the episode."""
        if not self._failing:
            return False
        self._failing.intersection_update(keys)
        return not self._failing
