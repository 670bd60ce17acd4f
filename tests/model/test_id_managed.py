"""A managed table's map against a plain-Python LRU / LFU of the same rules (id_managed's docstring), written
one id at a time with dicts and full sorts, over a few hundred batches that fill and evict a small table."""

from __future__ import annotations

import io
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np
import onnxruntime
import pytest
import torch

from heavyranker.config.embeddings import Eviction
from heavyranker.model import count_histogram, id_managed, managed_state
from heavyranker.model.id_managed import ManagedMapping
from heavyranker.model.sorted_index import SplitIndex

PADDING = -1


class ReferenceMap:
    """Rows 1..n-1 and n candidate entries, each [id, count, last batch]; a missing key is a free one."""

    def __init__(self, num_embeddings: int, min_count: int, eviction: Eviction):
        self.n, self.min_count, self.lfu = num_embeddings, min_count, eviction == Eviction.LFU
        self.rows: dict[int, list[int]] = {}
        self.candidates: dict[int, list[int]] = {}
        self.tick = 0

    def resident(self) -> dict[int, int]:
        return {id_: row for row, (id_, _, _) in self.rows.items()}

    def state(self) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        return self.rows, self.candidates

    def best_first(self, table: dict[int, list[int]], places: range, keep: set[int]) -> list[int]:
        """Free places by index, then the least recently seen (lru) or least often, then least recently
        (lfu), ties by index."""

        def key(place: int) -> tuple[int, ...]:
            if place not in table:
                return (0, place)
            _, count, last = table[place]
            return (1, count, last, place) if self.lfu else (1, last, place)

        return [place for place in sorted(places, key=key) if place not in keep]

    def step(self, ids: list[int]) -> None:
        self.tick += 1
        sightings = Counter(i for i in ids if i != PADDING)
        row_of, touched_rows = self.resident(), set()
        for id_, count in sightings.items():
            if id_ in row_of:
                row = row_of[id_]
                self.rows[row][1] += count
                self.rows[row][2] = self.tick
                touched_rows.add(row)
        entry_of = {id_: entry for entry, (id_, _, _) in self.candidates.items()}
        others = sorted(i for i in sightings if i not in row_of)
        known = [i for i in others if i in entry_of]
        new = [i for i in others if i not in entry_of]
        free = self.best_first(self.candidates, range(self.n), {entry_of[i] for i in known})
        for entry, id_ in zip(free, new, strict=False):  # new ids beyond the free entries are not counted
            self.candidates[entry] = [id_, 0, 0]
            entry_of[id_] = entry
        waiting = [entry_of[i] for i in others if i in entry_of]
        for entry in waiting:
            self.candidates[entry][1] += sightings[self.candidates[entry][0]]
            self.candidates[entry][2] = self.tick
        ready = [e for e in waiting if self.candidates[e][1] >= self.min_count]
        ready.sort(key=lambda e: (-self.candidates[e][1], self.candidates[e][0]))
        rows = self.best_first(self.rows, range(1, self.n), touched_rows)
        for row, entry in zip(rows, ready, strict=False):
            id_, count, _ = self.candidates.pop(entry)
            self.rows[row] = [id_, count, self.tick]


def entries(mapping: ManagedMapping) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Each taken row and candidate entry of the buffers: [id, count, last batch]."""
    tables = []
    for prefix in ("row", "candidate"):
        used = getattr(mapping, f"{prefix}_used").numpy()
        columns = [getattr(mapping, f"{prefix}_{name}").numpy() for name in ("ids", "count", "last")]
        tables.append({int(e): [int(c[e]) for c in columns] for e in np.flatnonzero(used)})
    return tables[0], tables[1]


def saved(mapping: ManagedMapping, reference: ReferenceMap) -> dict[str, torch.Tensor]:
    return mapping.state_dict()


def maps_as_the_reference(
    eviction: Eviction, min_count: int, resume_from: Callable[[ManagedMapping, ReferenceMap], dict] = saved
) -> int:
    """300 batches of a few ids, zipf-drawn, through a 9-row map and the reference (the map resumed at
    batch 150 from resume_from's state dict): the same rows, entries and lookups after each; the evictions."""
    rng = np.random.default_rng([min_count, eviction == Eviction.LFU])
    pool = np.append(rng.integers(-(2**63), 2**63 - 1, 40, dtype=np.int64), PADDING)
    mapping = ManagedMapping(9, min_count, eviction, PADDING)
    reference = ReferenceMap(9, min_count, eviction)
    evictions = 0
    for step in range(300):
        draws = rng.zipf(1.4, int(rng.integers(1, 13)))  # a few frequent ids, and many ties
        ids = pool[np.minimum(draws, len(pool)) - 1]
        if step == 150:  # a resumed mapping rebuilds its indexes from the buffers
            resumed = ManagedMapping(9, min_count, eviction, PADDING)
            resumed.load_state_dict(resume_from(mapping, reference))
            mapping = resumed
        before = reference.resident()
        rows, _ = mapping(torch.from_numpy(ids).unsqueeze(0))
        reference.step(ids.tolist())
        resident = reference.resident()
        assert mapping.resident() == resident, step
        assert entries(mapping) == reference.state(), step  # counts and last sightings too
        assert rows[0, :, 0].tolist() == [resident.get(i, 0) for i in ids.tolist()], step
        evictions += len(before.keys() - resident.keys())
    return evictions


@pytest.mark.parametrize("eviction", [Eviction.LRU, Eviction.LFU])
@pytest.mark.parametrize("min_count", [1, 3])
@pytest.mark.parametrize("scan_chunk", [2, id_managed.SCAN_CHUNK])
def test_the_map_is_a_plain_python_lru_or_lfu_of_the_same_ids(eviction, min_count, scan_chunk, monkeypatch):
    # Scans of 2 entries at a time: the first free or tied entries are found across chunks, as in a table
    # of millions.
    monkeypatch.setattr(id_managed, "SCAN_CHUNK", scan_chunk)
    evictions = maps_as_the_reference(eviction, min_count)
    assert evictions > 40  # the table was full most of the time: eviction decided most admissions


@pytest.mark.parametrize(("eviction", "bytes_a_row"), [(Eviction.LRU, 3), (Eviction.LFU, 16)])
def test_a_full_tables_count_lists_only_the_entries_it_needs(eviction, bytes_a_row):
    """A full table whose rows and candidates were all last seen at the same batch, with the same count (the
    bench's start; and any batch's ids share a tick): choosing the few to evict must not list the million
    tied entries (8 bytes each, the time of a count at 10M rows). At most the one-byte masks of a pass over
    the table and a scan's chunks are allocated at once, and for lfu the next key over the table (8 bytes a
    row) that orders the entries tied on the count."""
    n = 1_000_000
    mapping, resident = full_table(n, eviction)
    rng = np.random.default_rng(0)
    for step in range(3):
        ids = full_tables_batch(rng, resident, n)
        if step > 0:  # the first count builds the candidates' index (16 bytes a row, kept)
            tracemalloc.start()
        mapping(ids.unsqueeze(0))
        if step > 0:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < bytes_a_row * n, step  # listing the tied rows or candidates takes 8 bytes a row
        rows = mapping.lookup(ids)
        assert (rows[:96] > 0).all()  # resident, or candidates admitted (each evicting a row)
        assert int(mapping.num_resident) == n - 1


def full_table(n: int, eviction: Eviction) -> tuple[ManagedMapping, np.ndarray]:
    """A map whose n - 1 rows and n candidates are taken, all last seen at batch 1; its resident ids."""
    mapping = ManagedMapping(n, 2, eviction, PADDING)
    resident = np.arange(1, n, dtype=np.int64) * 7  # ascending: the sorted ids are the row ids
    state = {
        "row_ids": np.append(0, resident),
        "row_used": np.arange(n) > 0,
        "row_count": np.full(n, 2),
        "candidate_ids": -np.arange(1, n + 1),  # candidates, seen once: admitted when seen again
        "candidate_used": np.ones(n, dtype=bool),
        "candidate_count": np.ones(n, dtype=np.int64),
        "sorted_ids": np.append(resident, 0),
        "sorted_rows": np.arange(1, n + 1) % n,
    }
    for name, values in state.items():
        getattr(mapping, name).copy_(torch.from_numpy(values))
    mapping.row_last.fill_(1)
    mapping.candidate_last.fill_(1)
    mapping.num_resident.fill_(n - 1)
    mapping.tick.fill_(1)
    return mapping, resident


def full_tables_batch(rng: np.random.Generator, resident: np.ndarray, n: int) -> torch.Tensor:
    """64 resident ids, 32 candidates (admitted: seen twice) and 32 new ids (new candidates)."""
    seen = rng.choice(resident, 64), -rng.integers(1, n + 1, 32), rng.integers(1, 2**40, 32) * 8 + 1
    return torch.from_numpy(np.concatenate(seen))


@pytest.mark.parametrize("eviction", [Eviction.LRU, Eviction.LFU])
def test_a_full_tables_count_reads_only_the_chunks_up_to_the_entries_it_takes(eviction, monkeypatch):
    """The threshold comes from the last sightings' histogram (lru) or from those of the counts and of the
    last sightings at a count (lfu), and the free entries' count from the map's size, so a count on a full
    table (after the first, which builds them) reads the keys and the used flags only a chunk at a time, up
    to the last entry it takes: no pass over the table (a mask of it would take a byte a row), which cost 20
    to 90 ms a count at 10M rows (lfu: about 90, and 16 bytes a row before)."""
    monkeypatch.setattr(id_managed, "SCAN_CHUNK", 1024)
    n = 1_000_000
    mapping, resident = full_table(n, eviction)
    rng = np.random.default_rng(0)
    mapping(full_tables_batch(rng, resident, n).unsqueeze(0))
    for step in range(3):
        tracemalloc.start()
        mapping(full_tables_batch(rng, resident, n).unsqueeze(0))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < n // 2, step  # a mask of the table: n bytes


def counted_with_a_reload(eviction: Eviction) -> Iterator[tuple[int, ManagedMapping]]:
    """A 9-row map after each of 300 zipf-drawn batches that fill it and evict from it, reloaded at 150."""
    rng = np.random.default_rng(5)
    pool = rng.integers(-(2**63), 2**63 - 1, 40, dtype=np.int64)
    mapping = ManagedMapping(9, 2, eviction, PADDING)
    for step in range(300):
        if step == 150:
            resumed = ManagedMapping(9, 2, eviction, PADDING)
            resumed.load_state_dict(mapping.state_dict())
            mapping = resumed
        ids = pool[np.minimum(rng.zipf(1.4, int(rng.integers(1, 13))), len(pool)) - 1]
        mapping(torch.from_numpy(ids).unsqueeze(0))
        yield step, mapping


@pytest.mark.parametrize("eviction", [Eviction.LRU, Eviction.LFU])
def test_the_last_sightings_histograms_are_those_of_the_buffers(eviction, monkeypatch):
    """After each of 300 batches that fill a 9-row map and evict from it, and after a reload: each table's
    histogram of last sightings is the count of each value in its buffer."""
    monkeypatch.setattr(id_managed, "recent_capacity", lambda num_embeddings: 2)
    for step, mapping in counted_with_a_reload(eviction):
        for prefix in ("row", "candidate"):
            last = getattr(mapping, f"{prefix}_last").numpy()
            histogram = mapping._last_seen[prefix].as_dict()  # type: ignore[index]
            assert histogram == Counter(last.tolist()), (step, prefix)


@pytest.mark.parametrize("count_bins", [3, count_histogram.COUNT_BINS])
def test_the_lfu_count_histograms_are_those_of_the_buffers(count_bins, monkeypatch):
    """lfu, the same batches: each table's entries per count (those at count_bins or more in one bin), and
    for the counts where an eviction threshold landed, per last sighting, are those of its buffers."""
    monkeypatch.setattr(id_managed, "recent_capacity", lambda num_embeddings: 2)
    monkeypatch.setattr(count_histogram, "COUNT_BINS", count_bins)
    thresholds_at: set[tuple[str, int]] = set()  # (table, count) that kept a histogram of last sightings
    for step, mapping in counted_with_a_reload(Eviction.LFU):
        for prefix in ("row", "candidate"):
            count, last = (getattr(mapping, f"{prefix}_{name}").numpy() for name in ("count", "last"))
            bins, last_seen = mapping._counted[prefix].as_dicts()  # type: ignore[index]
            assert bins == Counter(np.minimum(count, count_bins).tolist()), (step, prefix)
            for at, histogram in last_seen.items():
                assert histogram == Counter(last[count == at].tolist()), (step, prefix, at)
                thresholds_at.add((prefix, at))
    assert {"row", "candidate"} == {prefix for prefix, _ in thresholds_at}


@pytest.mark.parametrize("min_count", [1, 3])
@pytest.mark.parametrize("count_bins", [1, 2])
def test_lfu_thresholds_in_the_count_histograms_last_bin_keep_the_map_of_the_reference(
    min_count, count_bins, monkeypatch
):
    """Counts from 1 or 2 up share the last bin: the threshold falls back to passes over the keys, often
    (and at 2, as often from the histograms, one count to the next)."""
    monkeypatch.setattr(count_histogram, "COUNT_BINS", count_bins)
    assert maps_as_the_reference(Eviction.LFU, min_count) > 40


@pytest.mark.parametrize("eviction", [Eviction.LRU, Eviction.LFU])
@pytest.mark.parametrize("min_count", [1, 3])
@pytest.mark.parametrize("recent", [1, 2, 3])
def test_merges_of_small_recent_parts_keep_the_map_of_the_reference(eviction, min_count, recent, monkeypatch):
    """Recent parts of 1 to 3 ids (of 9): the resident ids' and the candidates' merge every few batches."""
    monkeypatch.setattr(id_managed, "recent_capacity", lambda num_embeddings: recent)
    merges: Counter[int] = Counter()
    merge = SplitIndex.merge

    def counted(index: SplitIndex, *args: np.ndarray) -> None:
        merges[index.vacant] += 1
        merge(index, *args)

    monkeypatch.setattr(SplitIndex, "merge", counted)
    assert maps_as_the_reference(eviction, min_count) > 40
    # The resident ids' (vacant: row 0), and the candidates' where ids wait (at min_count 1 none does).
    assert merges[0] >= 2 and (min_count == 1 or merges[id_managed.FREE] > 10)


def first_layout(mapping: ManagedMapping, reference: ReferenceMap) -> dict[str, torch.Tensor]:
    """The state dict as the layout before the recent parts wrote it: every resident id in sorted_ids,
    ascending (the reference's), and no recent_ids, recent_rows, num_recent or num_vacated."""
    state = {k: v.clone() for k, v in mapping.state_dict().items() if k not in managed_state.SPLIT_STATE}
    resident = sorted(reference.resident().items())
    for name, column in (("sorted_ids", 0), ("sorted_rows", 1)):
        state[name].zero_()
        state[name][: len(resident)] = torch.tensor([pair[column] for pair in resident])
    assert int(state["num_resident"]) == len(resident)
    return state


@pytest.mark.parametrize("eviction", [Eviction.LRU, Eviction.LFU])
def test_a_state_dict_of_the_first_layout_resumes_the_same_map(eviction, monkeypatch):
    monkeypatch.setattr(id_managed, "recent_capacity", lambda num_embeddings: 2)  # merges after the load too
    assert maps_as_the_reference(eviction, 3, first_layout) > 40


def traced_map(monkeypatch: pytest.MonkeyPatch) -> ManagedMapping:
    """Rows 1..4 and a recent part of 2, lru, admitted when first seen; after 5 batches (traced by hand): the
    main part [10, 20, 30] (20 evicted: vacated, row 0), the recent part [40, 50]."""
    monkeypatch.setattr(id_managed, "recent_capacity", lambda num_embeddings: 2)
    mapping = ManagedMapping(5, 1, Eviction.LRU, None)
    for ids in ([10, 20], [30], [40], [50], [10]):
        mapping(torch.tensor([ids]))
    return mapping


def test_the_recent_part_takes_admissions_and_a_merge_folds_it_in_without_the_evicted(monkeypatch):
    mapping = traced_map(monkeypatch)
    # [10, 20] -> rows 1, 2 (recent); [30] -> row 3: the recent part full, all merged into the main part;
    # [40] -> row 4 (recent); [50] evicts 10 (row 1, seen at batch 1 like 20: the lower row): vacated in the
    # main part; [10] evicts 20 (row 2) and takes its own vacated place again, with row 2.
    assert mapping.sorted_ids[:3].tolist() == [10, 20, 30] and mapping.sorted_rows[:3].tolist() == [2, 0, 3]
    assert mapping.recent_ids.tolist() == [40, 50] and mapping.recent_rows.tolist() == [4, 1]
    assert (int(mapping.num_resident), int(mapping.num_recent), int(mapping.num_vacated)) == (4, 2, 1)
    ids = torch.tensor([10, 20, 30, 40, 50, 60])
    assert mapping.lookup(ids).tolist() == [2, 0, 3, 4, 1, 0]  # 20 evicted in the main part: row 0
    mapping(torch.tensor([[60]]))  # evicts 30 (row 3, batch 2): the recent part is full, a merge
    assert mapping.sorted_ids[:4].tolist() == [10, 40, 50, 60]
    assert mapping.sorted_rows[:4].tolist() == [2, 4, 1, 3]
    assert (int(mapping.num_resident), int(mapping.num_recent), int(mapping.num_vacated)) == (4, 0, 0)
    assert mapping.lookup(ids).tolist() == [2, 0, 0, 4, 1, 3]
    assert mapping.resident() == {10: 2, 40: 4, 50: 1, 60: 3}


@pytest.mark.parametrize("format", ["pt2", "onnx"])
def test_an_export_serves_both_parts_of_the_map_as_they_were_at_the_export(format, monkeypatch):
    mapping = traced_map(monkeypatch).eval()
    ids = torch.tensor([[10, 20, 30, 40, 50, 60, -(2**63)]])
    if format == "pt2":
        saved = io.BytesIO()
        torch.export.save(torch.export.export(mapping, (ids,)), saved)
        saved.seek(0)
        program = torch.export.load(saved).module()
        served = lambda: program(ids)[0]  # noqa: E731
    else:
        proto = torch.onnx.export(mapping, (ids,), dynamo=True, verbose=False).model_proto
        session = onnxruntime.InferenceSession(proto.SerializeToString())
        served = lambda: torch.from_numpy(session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0])  # noqa: E731
    mapping.train()(torch.tensor([[60, 70]]))  # the eager map changes after the export
    assert served()[0, :, 0].tolist() == [2, 0, 3, 4, 1, 0, 0]
