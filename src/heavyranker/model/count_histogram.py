"""How many entries of a managed table hold each (count, last sighting), for the low counts, kept beside the
table's buffers so that a full table under lfu finds its eviction threshold (the nth smallest entry by
count, then last sighting) without reading the keys: see id_managed._victims.

Why a histogram of last sightings per count, and not one pass over the entries tied on the count to order
them: the tie is the rule (a batch's new ids all start at the same count, and min_count admits them at the
same count), millions of entries in a full table of 10M, where the entries to evict are the few oldest of
it; with the (count, last sighting) threshold, a scan lists the entries up to the last one needed, one chunk
of the table at a bench's start. Only the counts where a threshold landed keep one (built by a pass then):
the low ones, few, and each spans the batches of its entries (key_histogram.Histogram's dense part), where
one for every count would multiply that by the counts held."""

from __future__ import annotations

import numpy as np

from .key_histogram import Histogram

COUNT_BINS = 64  # counts below it are binned one by one; those at or above it share the last bin
BUILD_CHUNK = 1 << 16  # entries a pass that builds a histogram reads at a time (no copy of a whole key)


class CountHistogram:
    """bins[c]: the entries counted c times, for c below COUNT_BINS, and bins[COUNT_BINS] those counted more;
    last_seen[c]: the last sightings' histogram of the entries counted c times, for the counts where a
    threshold landed. An entry's count moves arbitrarily (up by a batch's sightings, or to that of the id
    that takes it), and its last sighting along with it, to the batch counted: the highest value held."""

    def __init__(self, counts: np.ndarray):
        self.bins = np.zeros(COUNT_BINS + 1, dtype=np.int64)
        for start in range(0, len(counts), BUILD_CHUNK):
            chunk = np.minimum(counts[start : start + BUILD_CHUNK], COUNT_BINS)
            self.bins += np.bincount(chunk, minlength=COUNT_BINS + 1)
        self.last_seen: dict[int, Histogram] = {}

    def move(self, old_counts: np.ndarray, old_lasts: np.ndarray, new_counts: np.ndarray, tick: int) -> None:
        """Entries (each once) going from (old_counts, old_lasts) to (new_counts, tick)."""
        np.subtract.at(self.bins, np.minimum(old_counts, COUNT_BINS), 1)
        np.add.at(self.bins, np.minimum(new_counts, COUNT_BINS), 1)
        for count, histogram in self.last_seen.items():
            histogram.remove(old_lasts[old_counts == count])
            arriving = int(np.count_nonzero(new_counts == count))
            if arriving:
                histogram.add(arriving, tick)

    def thresholds(
        self, nth: int, counts: np.ndarray, lasts: np.ndarray
    ) -> tuple[tuple[int, int], int, int, int] | None:
        """The count and last sighting of the nth smallest entry (from 0), how many entries are below it, how
        many at it, and how many at a lower count; None where its count is in the last bin (not told apart).
        counts, lasts: the keys (the buffers), read once by the first threshold at a count (builds its
        last_seen)."""
        at_or_below = np.cumsum(self.bins)
        count = int(np.searchsorted(at_or_below, nth, side="right"))
        if count >= COUNT_BINS:
            return None
        if count not in self.last_seen:
            self.last_seen[count] = _last_seen_at(count, counts, lasts)
        below = int(at_or_below[count] - self.bins[count])
        last, below_last, tied = self.last_seen[count].nth(nth - below)
        return (count, last), below + below_last, tied, below

    def as_dicts(self) -> tuple[dict[int, int], dict[int, dict[int, int]]]:
        """bin -> entries, for the bins that some entry is in, and count -> last_seen's as_dict."""
        held = np.flatnonzero(self.bins)
        bins = dict(zip(held.tolist(), self.bins[held].tolist(), strict=True))
        return bins, {count: histogram.as_dict() for count, histogram in self.last_seen.items()}


def _last_seen_at(count: int, counts: np.ndarray, lasts: np.ndarray) -> Histogram:
    """The last sightings' histogram of the entries counted `count` times: one pass, a chunk at a time."""
    counted = np.zeros(1, dtype=np.int64)
    for start in range(0, len(counts), BUILD_CHUNK):
        chunk = slice(start, start + BUILD_CHUNK)
        binned = np.bincount(lasts[chunk][counts[chunk] == count])
        if len(binned) > len(counted):
            counted = np.concatenate([counted, np.zeros(len(binned) - len(counted), dtype=np.int64)])
        counted[: len(binned)] += binned
    return Histogram(counted, counted=True)
