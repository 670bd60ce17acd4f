"""The lfu key's histogram against the keys themselves: counted, and the nth smallest (count, last sighting)
by a sort."""

from __future__ import annotations

from collections import Counter

import numpy as np

from heavyranker.model.count_histogram import COUNT_BINS, CountHistogram


def test_moves_keep_the_entries_per_count_and_last_sighting_and_the_nth_smallest():
    """Batches that move random entries (each once) to random counts (up, or reset low: an id reused) at the
    batch's number, some never moved (count and last 0); counts from COUNT_BINS up share the last bin."""
    rng = np.random.default_rng(0)
    entries = 300
    counts, lasts = np.zeros(entries, dtype=np.int64), np.zeros(entries, dtype=np.int64)
    histogram = CountHistogram(counts)
    for tick in range(1, 200):
        moved = rng.choice(np.arange(1, entries), int(rng.integers(0, 40)), replace=False)
        new_counts = np.where(rng.random(len(moved)) < 0.3, rng.integers(1, 3, len(moved)), counts[moved] + 5)
        histogram.move(counts[moved], lasts[moved], new_counts, tick)
        counts[moved], lasts[moved] = new_counts, tick
        order = np.lexsort((lasts, counts))  # by count, then last sighting
        for nth in (0, int(rng.integers(entries)), entries - 1):
            count, last = int(counts[order[nth]]), int(lasts[order[nth]])
            is_below = (counts < count) | ((counts == count) & (lasts < last))
            tied = int(np.sum((counts == count) & (lasts == last)))
            lower = int(np.sum(counts < count))
            expected = None if count >= COUNT_BINS else ((count, last), int(np.sum(is_below)), tied, lower)
            assert histogram.thresholds(nth, counts, lasts) == expected, (tick, nth)
        bins, last_seen = histogram.as_dicts()
        assert bins == Counter(np.minimum(counts, COUNT_BINS).tolist()), tick
        for count, held in last_seen.items():
            assert held == Counter(lasts[counts == count].tolist()), (tick, count)
    assert max(counts) >= COUNT_BINS and len(last_seen) > 3  # the last bin and several counts were reached
