"""Sorted id -> value maps in arrays of a fixed capacity, changed in place: a managed table's resident ids (in
its buffers, which the lookup reads) and its candidates (model/id_managed.py).

SortedIndex is one sorted array: a change shifts the runs between the changed places, so it moves the
whole array when its changes are spread over it. SplitIndex is a large sorted main part and a small sorted
recent part of fixed capacity: an added key goes into the recent part (a shift of the small array only), a
removed one leaves the recent part or, in the main part, keeps its place with the value `vacant` (and takes
it again if the key comes back); once the recent part is full, one merge folds it into the main part and
drops the vacated places. A change costs O(its keys + the recent capacity), and the merge, O(main part +
recent capacity), comes once every (recent capacity / keys added a change) changes.
"""

from __future__ import annotations

import numpy as np


class SortedIndex:
    """keys[:size] (unique, ascending) -> values[:size], in arrays of a fixed capacity: searched with
    np.searchsorted, and changed in place by shifting the runs between the changes (no sort, no new array)."""

    def __init__(self, keys: np.ndarray, values: np.ndarray, size: int):
        self.keys, self.values, self.size = keys, values, size

    @classmethod
    def of(cls, keys: np.ndarray, values: np.ndarray, capacity: int) -> SortedIndex:
        index = cls(np.zeros(capacity, np.int64), np.zeros(capacity, np.int64), len(keys))
        order = np.argsort(keys, kind="stable")
        index.keys[: len(keys)], index.values[: len(keys)] = keys[order], values[order]
        return index

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The value of each key, and whether it is there (if not, the value means nothing)."""
        at, found = search(self.keys[: self.size], keys)
        return self.values[at], found

    def replace(self, removed: np.ndarray, added: np.ndarray, added_values: np.ndarray) -> None:
        """Drops the `removed` keys (all there) and adds the `added` ones (none there)."""
        gone = np.sort(np.searchsorted(self.keys[: self.size], removed))
        order = np.argsort(added, kind="stable")
        added, added_values = added[order], added_values[order]
        at = np.searchsorted(self.keys[: self.size], added)  # each goes before the key now at `at`
        # Runs of kept keys between the changes: each moves by (keys added before it) - (removed before it).
        cuts = np.unique(np.concatenate([[0, self.size], gone, gone + 1, at]))
        starts, ends = cuts[:-1], cuts[1:]
        kept = ~np.isin(starts, gone, kind="sort")
        starts, ends = starts[kept], ends[kept]
        shifts = np.searchsorted(at, starts, side="right") - np.searchsorted(gone, starts)
        # A run moving left can only overwrite runs before it, one moving right runs after it: so the
        # left-moving ones go first, from the left, then the right-moving ones from the right.
        left, right = np.flatnonzero(shifts < 0), np.flatnonzero(shifts > 0)[::-1]
        for run in np.concatenate([left, right]).tolist():
            start, end, shift = int(starts[run]), int(ends[run]), int(shifts[run])
            self.keys[start + shift : end + shift] = self.keys[start:end]
            self.values[start + shift : end + shift] = self.values[start:end]
        places = at + np.arange(len(added)) - np.searchsorted(gone, at)
        self.keys[places], self.values[places] = added, added_values
        self.size += len(added) - len(gone)


class SplitIndex:
    """A key's value is in `main` (unless it is `vacant` there: the key was removed) or in `recent`, never
    both; `vacated` counts the main part's vacant places. The rules in the module's docstring."""

    def __init__(self, main: SortedIndex, recent: SortedIndex, vacated: int, vacant: int):
        self.main, self.recent, self.vacated, self.vacant = main, recent, vacated, vacant

    @classmethod
    def of(cls, keys: np.ndarray, values: np.ndarray, capacity: int, recent: int, vacant: int) -> SplitIndex:
        """All in the main part, of `capacity`; an empty recent part of `recent`."""
        empty = SortedIndex(np.zeros(recent, np.int64), np.zeros(recent, np.int64), 0)
        return cls(SortedIndex.of(keys, values, capacity), empty, 0, vacant)

    @property
    def size(self) -> int:
        """The keys there (vacated ones not counted)."""
        return self.main.size - self.vacated + self.recent.size

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The value of each key, and whether it is there (if not, the value means nothing)."""
        values, found = self.main.find(keys)
        found &= values != self.vacant
        recent_values, in_recent = self.recent.find(keys)
        return np.where(in_recent, recent_values, values), found | in_recent

    def replace(self, removed: np.ndarray, added: np.ndarray, added_values: np.ndarray) -> None:
        """Drops the `removed` keys (all there) and adds the `added` ones (none there, none removed)."""
        main = self.main.keys[: self.main.size]
        at, in_main = search(main, removed)
        in_main &= self.main.values[at] != self.vacant  # else in the recent part
        self.main.values[at[in_main]] = self.vacant
        back, comes_back = search(main, added)  # a vacated place: the key takes it again
        self.main.values[back[comes_back]] = added_values[comes_back]
        self.vacated += int(np.count_nonzero(in_main)) - int(np.count_nonzero(comes_back))
        removed, added, added_values = removed[~in_main], added[~comes_back], added_values[~comes_back]
        if self.recent.size - len(removed) + len(added) <= len(self.recent.keys):
            self.recent.replace(removed, added, added_values)
            return
        self.recent.replace(removed, added[:0], added_values[:0])
        self.merge(added, added_values)

    def merge(self, added: np.ndarray, added_values: np.ndarray) -> None:
        """Folds the recent part and the `added` keys (none there) into the main part, without its vacated
        places: one shift of the main part's runs, in place."""
        vacated = np.flatnonzero(self.main.values[: self.main.size] == self.vacant)
        recent = slice(0, self.recent.size)
        keys = np.concatenate([self.recent.keys[recent], added])
        values = np.concatenate([self.recent.values[recent], added_values])
        self.main.replace(self.main.keys[vacated], keys, values)
        self.recent.size = self.vacated = 0


def search(ascending: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each key is in `ascending` (a binary search each), and whether it is there at all."""
    if len(ascending) == 0:
        return np.zeros(len(keys), np.int64), np.zeros(len(keys), bool)
    at = np.minimum(np.searchsorted(ascending, keys), len(ascending) - 1)
    return at, ascending[at] == keys
