"""The last sightings' histogram against the values themselves: counted, and their nth smallest by a sort."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from heavyranker.model.key_histogram import SPARSE_ENTRIES, Histogram


@pytest.mark.parametrize("entries", [3, SPARSE_ENTRIES + 5, 500])
def test_moves_keep_the_count_of_each_value_and_the_nth_smallest(entries):
    """Batches that move random entries (each once) to the batch's number, some never moved (the default
    row at 0): the lowest values leave the dense part for the sparse one as it grows."""
    rng = np.random.default_rng(entries)
    values = np.zeros(entries, dtype=np.int64)
    histogram = Histogram(values)
    for tick in range(1, 400):
        moved = rng.choice(np.arange(1, entries), int(rng.integers(0, entries)), replace=False)
        histogram.move(values[moved], tick)
        values[moved] = tick
        assert histogram.as_dict() == Counter(values.tolist()), tick
        ordered = np.sort(values)
        for nth in (0, int(rng.integers(entries)), entries - 1):
            threshold = int(ordered[nth])
            below, tied = int(np.sum(values < threshold)), int(np.sum(values == threshold))
            assert histogram.nth(nth) == (threshold, below, tied), (tick, nth)
    assert histogram.as_dict() == Histogram(values).as_dict()  # rebuilt from the values
