"""How many entries of a managed table hold each value of a key that only grows (a last sighting: a batch
number), kept beside the table's buffers so that a full table finds its eviction threshold (the value of
the nth smallest) without reading the key: see id_managed._victims."""

from __future__ import annotations

import numpy as np

SPARSE_ENTRIES = 64  # at most this many entries' values below the dense part, held one by one


class Histogram:
    """dense[v - base]: the entries whose key is v, for v from base up; sparse[v]: those below base (few: the
    default row, never seen, stays at 0). The key's values are non-negative, and an entry's key only moves
    up to a new value (the batch counted), or the entry leaves (count_histogram's, one a count): when the
    dense part grows, its lowest values that few entries hold leave it, so that it spans the batches of a
    full table's entries, not all the batches counted."""

    def __init__(self, values: np.ndarray, *, counted: bool = False):
        """values: each entry's key or, counted, how many entries hold each value (from 0)."""
        self.dense = values if counted else np.bincount(values)  # no copy: int64 is bincount's index type
        self.base = 0
        self.sparse: dict[int, int] = {}
        self._compact(0)

    def move(self, old_values: np.ndarray, new_value: int) -> None:
        """Entries (each once) whose key goes from old_values to new_value (at least the highest value)."""
        self.remove(old_values)
        self.add(len(old_values), new_value)

    def remove(self, old_values: np.ndarray) -> None:
        """Entries (each once) that leave, from their values."""
        is_sparse = old_values < self.base
        for value in old_values[is_sparse].tolist():
            self.sparse[value] -= 1
            if self.sparse[value] == 0:
                del self.sparse[value]
        np.subtract.at(self.dense, old_values[~is_sparse] - self.base, 1)

    def add(self, entries: int, new_value: int) -> None:
        """`entries` entries that come in at new_value (at least the highest value)."""
        if new_value - self.base >= len(self.dense):
            self._compact(new_value)
            grown = max(new_value - self.base + 1 - len(self.dense), len(self.dense))  # doubled: amortized
            self.dense = np.concatenate([self.dense, np.zeros(grown, dtype=np.int64)])
        self.dense[new_value - self.base] += entries

    def nth(self, nth: int) -> tuple[int, int, int]:
        """The value of the nth smallest entry (from 0), how many entries are below it, and how many at it."""
        below = 0
        for value, count in sorted(self.sparse.items()):
            if nth < below + count:
                return value, below, count
            below += count
        at_or_below = np.cumsum(self.dense)
        at = int(np.searchsorted(at_or_below, nth - below, side="right"))
        tied = int(self.dense[at])
        return self.base + at, below + int(at_or_below[at]) - tied, tied

    def thresholds(self, nth: int) -> tuple[tuple[int], int, int, int]:
        """nth's value as the threshold of one key (as id_managed._smallest takes it), the entries below and
        at it, and those below on a key before it: none."""
        value, below, tied = self.nth(nth)
        return (value,), below, tied, 0

    def as_dict(self) -> dict[int, int]:
        """value -> entries, for the values that some entry holds."""
        held = np.flatnonzero(self.dense)
        return self.sparse | dict(zip((held + self.base).tolist(), self.dense[held].tolist(), strict=True))

    def _compact(self, new_value: int) -> None:
        """Moves the dense part's lowest values, while they hold SPARSE_ENTRIES entries at most, to `sparse`,
        and drops its empty ones below the first it keeps (or starts it at new_value, if none is left)."""
        held = np.flatnonzero(self.dense)
        if len(held) == 0:
            self.dense, self.base = np.zeros(1, dtype=np.int64), new_value
            return
        room = SPARSE_ENTRIES - sum(self.sparse.values())
        moved = int(np.searchsorted(np.cumsum(self.dense[held]), room, side="right"))
        moved = min(moved, len(held) - 1)  # the dense part keeps the highest value held
        for at in held[:moved].tolist():
            self.sparse[self.base + at] = int(self.dense[at])
        lowest = int(held[moved])
        self.dense, self.base = self.dense[lowest:].copy(), self.base + lowest
