"""`id_mapping: managed`: a collision-free id -> row map with admission and eviction.

Row 0 is the default row: every id without a row of its own looks it up (an unseen id scores through it,
without an error). In training, each batch's ids are first counted: an id gets a row of its own once it
has been seen `min_count` times, taking a free row, or else the row of the resident id that `eviction`
picks (lru: seen least recently; lfu: seen least often, then least recently), never one looked up in the
same batch. The evicted id loses its row and its counts, and the new id starts from the row's vector (as
in torchrec). Ids waiting for admission are counted in a candidate table of as many entries, which evicts
by the same rule; a batch's new ids beyond its free entries are not counted.

The whole state is in buffers of fixed size (so in every checkpoint, and a resumed run maps exactly as an
uninterrupted one), and the lookup is two binary searches over the resident ids sorted, in a main part
and a small recent part (a fixed number of gather steps), which torch.export and ONNX trace: an export
serves the map as it was at its checkpoint.
Under torch.distributed every rank counts the sightings of all ranks, so the maps stay identical.

A training step costs O(batch) plus a few vectorized passes over the table, never a sort of it: the
batch's ids are found by binary search in the resident ids and in a sorted index of the candidates (kept
beside the buffers, rebuilt from them on load); free entries are taken by index, found a chunk at a time
up to the last (their number is the table's size less its used entries); a full table takes the eviction
keys' thresholds (the keys of the nth entry to evict) from histograms beside the buffers, rebuilt from them
on load: under lru of the last sightings (key_histogram.Histogram), under lfu of the counts and, at the low
counts where a threshold landed, of their last sightings (count_histogram.CountHistogram), and lists the
entries up to them a chunk at a time, up to the last one it needs (ties by index); where lfu's count is in
the counts' last bin (COUNT_BINS and more), it finds the threshold among the entries under a bound doubled
from the count's lowest value (a few passes) and orders those tied on the count by last sighting through
a mask of them, not a list; and the sorted ids (resident, and candidates) take the admitted and evicted
ones in the small recent part of a sorted_index.SplitIndex, whose merge into the main part (O(table))
comes once every many steps: recent_capacity.

Why not torchrec's MCHManagedCollisionModule: its admission is a threshold on counts within one eviction
interval (not a count that accumulates until admission), it works on KeyedJaggedTensor dicts of a
ManagedCollisionCollection, and its lookup is torch.searchsorted, for which the ONNX exporter has no op.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..config.embeddings import Eviction
from .count_histogram import CountHistogram
from .key_histogram import Histogram
from .managed_state import check_managed_state, complete_first_layout
from .sorted_index import SortedIndex, SplitIndex, search

FREE = -1  # the score of a free row or candidate entry: taken before any eviction
ROW_STATE = ("row_ids", "row_used", "row_count", "row_last")
CANDIDATE_STATE = ("candidate_ids", "candidate_used", "candidate_count", "candidate_last")
STATE = (*ROW_STATE, *CANDIDATE_STATE, "sorted_ids", "sorted_rows", "recent_ids", "recent_rows")
KEPT = np.iinfo(np.int64).max  # the score of an entry that must not be evicted: chosen last, then dropped
SCAN_CHUNK = 1 << 16  # entries a scan for the first few of a kind reads at a time
RECENT_PER_ROOT = 4  # the recent parts' capacity, in square roots of the table (see recent_capacity)
# nth -> the value of each key at the nth smallest entry, how many entries are below and at them, and how many
# of those below are on a key before the last (lfu: a lower count), from histograms without a pass; or None
# where the histograms cannot tell (see _smallest)
Thresholds = Callable[[int], tuple[tuple[int, ...], int, int, int] | None]


class ManagedMapping(nn.Module):
    """forward(ids [B, L]) -> rows [B, L, 1], mask [B, L] (False only for the padding id)."""

    same_on_every_rank = True  # every rank counts every rank's ids: DDP need not send rank 0's buffers

    def __init__(self, num_embeddings: int, min_count: int, eviction: Eviction, padding_id: int | None):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.num_hashes = 1
        self.min_count = min_count
        self.eviction = eviction
        self.padding_id = padding_id
        self.search_steps = num_embeddings.bit_length()
        n, recent = num_embeddings, recent_capacity(num_embeddings)
        self.recent_search_steps = recent.bit_length()
        for prefix in ("row", "candidate"):
            self.register_buffer(f"{prefix}_ids", torch.zeros(n, dtype=torch.int64))
            self.register_buffer(f"{prefix}_used", torch.zeros(n, dtype=torch.bool))
            self.register_buffer(f"{prefix}_count", torch.zeros(n, dtype=torch.int64))
            self.register_buffer(f"{prefix}_last", torch.zeros(n, dtype=torch.int64))
        # Resident ids: a main part, ascending, and their rows (0 where the id was evicted since the last
        # merge: vacated), and a recent part, ascending, and their rows (sorted_index.SplitIndex).
        self.register_buffer("sorted_ids", torch.zeros(n, dtype=torch.int64))
        self.register_buffer("sorted_rows", torch.zeros(n, dtype=torch.int64))
        self.register_buffer("recent_ids", torch.zeros(recent, dtype=torch.int64))
        self.register_buffer("recent_rows", torch.zeros(recent, dtype=torch.int64))
        self.register_buffer("num_resident", torch.zeros((), dtype=torch.int64))
        self.register_buffer("num_recent", torch.zeros((), dtype=torch.int64))
        self.register_buffer("num_vacated", torch.zeros((), dtype=torch.int64))
        self.register_buffer("tick", torch.zeros((), dtype=torch.int64))  # batches counted
        self._candidate_index: SplitIndex | None = None  # candidate id -> entry, from the buffers
        self._last_seen: dict[str, Histogram] | None = None  # row_last's, candidate_last's, from the buffers
        self._counted: dict[str, CountHistogram] | None = None  # lfu: (row_count, row_last)'s, candidates'

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not torch.compiler.is_compiling():
            self.observe(ids)
        valid = torch.ones_like(ids, dtype=torch.bool) if self.padding_id is None else ids != self.padding_id
        return self.lookup(ids).unsqueeze(-1), valid

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The row of each id: its own, or 0. Its row in the main part (0 if vacated there) or else in the
        recent part, each found by binary search."""
        in_main = self.num_resident - self.num_recent + self.num_vacated
        main = _search_rows(self.sorted_ids, self.sorted_rows, in_main, ids, self.search_steps)
        recent_steps = self.recent_search_steps
        recent = _search_rows(self.recent_ids, self.recent_rows, self.num_recent, ids, recent_steps)
        return torch.where(main > 0, main, recent)

    def resident(self) -> dict[int, int]:
        """id -> row of every id that has a row of its own."""
        used = self.row_used.cpu().numpy()
        return dict(
            zip(self.row_ids.cpu().numpy()[used].tolist(), np.flatnonzero(used).tolist(), strict=True)
        )

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kw: Any) -> None:
        complete_first_layout(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kw)
        check_managed_state(dict(self.named_buffers()), self.num_embeddings, prefix)
        # Rebuilt from the loaded buffers on the next count:
        self._candidate_index = self._last_seen = self._counted = None

    # -- counting (training only) ------------------------------------------------------------------------

    @torch.no_grad()
    def observe(self, ids: torch.Tensor) -> None:
        """Counts the batch's ids and admits those that reached min_count (the rules in the docstring)."""
        flat = ids.reshape(-1)
        if self.padding_id is not None:
            flat = flat[flat != self.padding_id]
        seen, counts = _all_ranks(*np.unique(flat.cpu().numpy(), return_counts=True))
        # The buffers themselves on CPU (.numpy() shares their memory): no copy of the table's state.
        state = {name: getattr(self, name).cpu().numpy() for name in STATE}
        if self._candidate_index is None:
            used = np.flatnonzero(state["candidate_used"])
            self._candidate_index = SplitIndex.of(
                state["candidate_ids"][used], used, self.num_embeddings, len(state["recent_ids"]), FREE
            )
        if self._last_seen is None:
            self._last_seen = {prefix: Histogram(state[f"{prefix}_last"]) for prefix in ("row", "candidate")}
        if self._counted is None and self.eviction == Eviction.LFU:
            self._counted = {name: CountHistogram(state[f"{name}_count"]) for name in ("row", "candidate")}
        tick = int(self.tick) + 1
        touched_rows, waiting, taken, dropped = self._count(state, tick, seen, counts)
        admitted = self._admit(state, tick, touched_rows, waiting)  # candidate entries
        # One merge into the candidate index: the new ids that stay candidates in, the evicted and
        # admitted ones (unless they only came in this batch) out.
        stays = ~np.isin(taken, admitted, kind="sort")
        gone = admitted[~np.isin(admitted, taken, kind="sort")]
        added = state["candidate_ids"][taken[stays]]
        removed = np.concatenate([dropped, state["candidate_ids"][gone]])
        self._candidate_index.replace(removed, added, taken[stays])
        if self.row_ids.device.type != "cpu":
            for name, values in state.items():
                getattr(self, name).copy_(torch.from_numpy(values))
        self.tick.fill_(tick)

    def _count(
        self, state: dict[str, np.ndarray], tick: int, seen: np.ndarray, counts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Adds the sightings to resident rows and candidate entries (new ids take entries); returns the
        rows touched, the candidate entries touched, those of them the new ids took, and the candidate
        ids they evicted."""
        assert self._candidate_index is not None
        rows, is_resident = self._resident_index(state).find(seen)
        touched_rows = rows[is_resident]  # each row once: the ids are unique
        self._see(state, "row", touched_rows, state["row_count"][touched_rows] + counts[is_resident], tick)
        others, other_counts = seen[~is_resident], counts[~is_resident]
        entries, is_known = self._candidate_index.find(others)
        known = entries[is_known]
        new, new_counts = others[~is_known], other_counts[~is_known]
        taken = self._victims(state, "candidate", len(new), known)
        new, new_counts = new[: len(taken)], new_counts[: len(taken)]  # the rest is not counted
        dropped = state["candidate_ids"][taken[state["candidate_used"][taken]]]
        state["candidate_ids"][taken], state["candidate_used"][taken] = new, True
        waiting = np.concatenate([known, taken])
        known_counts = state["candidate_count"][known] + other_counts[is_known]
        self._see(state, "candidate", waiting, np.concatenate([known_counts, new_counts]), tick)
        return touched_rows, waiting, taken, dropped

    def _admit(
        self, state: dict[str, np.ndarray], tick: int, touched_rows: np.ndarray, waiting: np.ndarray
    ) -> np.ndarray:
        """Gives rows to the waiting ids that reached min_count, most sighted first (then lowest id);
        returns the candidate entries admitted."""
        ready = waiting[state["candidate_count"][waiting] >= self.min_count]
        ready = ready[np.lexsort((state["candidate_ids"][ready], -state["candidate_count"][ready]))]
        rows = self._victims(state, "row", len(ready), np.append(touched_rows, 0))
        ready = ready[: len(rows)]
        if len(rows) == 0:
            return ready
        evicted = state["row_ids"][rows[state["row_used"][rows]]]
        admitted = state["candidate_ids"][ready]
        state["row_ids"][rows], state["row_used"][rows] = admitted, True
        self._see(state, "row", rows, state["candidate_count"][ready], tick)
        state["candidate_used"][ready] = False
        index = self._resident_index(state)
        index.replace(evicted, admitted, rows)  # in the buffers themselves
        self.num_resident.fill_(index.size)
        self.num_recent.fill_(index.recent.size)
        self.num_vacated.fill_(index.vacated)
        return ready

    def _see(
        self, state: dict[str, np.ndarray], prefix: str, entries: np.ndarray, counts: np.ndarray, tick: int
    ) -> None:
        """The entries (each once) now counted `counts` times, last seen at `tick`: in the buffers and their
        histograms."""
        assert self._last_seen is not None
        old_lasts = state[f"{prefix}_last"][entries]
        self._last_seen[prefix].move(old_lasts, tick)
        if self._counted is not None:
            self._counted[prefix].move(state[f"{prefix}_count"][entries], old_lasts, counts, tick)
        state[f"{prefix}_count"][entries], state[f"{prefix}_last"][entries] = counts, tick

    def _resident_index(self, state: dict[str, np.ndarray]) -> SplitIndex:
        recent, vacated = int(self.num_recent), int(self.num_vacated)
        in_main = int(self.num_resident) - recent + vacated
        main = SortedIndex(state["sorted_ids"], state["sorted_rows"], in_main)
        return SplitIndex(main, SortedIndex(state["recent_ids"], state["recent_rows"], recent), vacated, 0)

    def _victims(
        self, state: dict[str, np.ndarray], prefix: str, wanted: int, keep: np.ndarray
    ) -> np.ndarray:
        """Up to `wanted` entries to (re)use, best first: free ones (by index), then by the eviction rule
        (ties by index); never those in `keep`. No sort of the table: the threshold from a histogram (under
        lfu, of the counts and of the last sightings at the low counts), and a scan a chunk at a time up to
        the last entry needed; under lfu, where the threshold's count is in the histogram's last bin, a few
        passes over the table."""
        if wanted == 0:
            return np.zeros(0, dtype=np.int64)
        # The free ones are counted (row 0, the default row, is never used): the scan stops at the last.
        assert self._candidate_index is not None
        used = int(self.num_resident) if prefix == "row" else self._candidate_index.size
        limit = min(wanted + len(keep), self.num_embeddings - used)
        free = _first_true(state[f"{prefix}_used"], limit, where=False)  # all free ones, if fewer
        chosen = free[~np.isin(free, keep, kind="sort")][:wanted]
        if len(chosen) == wanted:
            return chosen
        # Fewer free entries than wanted: so few that every one of them is in `chosen` or `keep`.
        excluded = np.union1d(free, keep)
        assert self._last_seen is not None
        keys = [state[f"{prefix}_last"]]
        thresholds: Thresholds = self._last_seen[prefix].thresholds
        if self.eviction == Eviction.LFU:
            assert self._counted is not None
            keys.insert(0, state[f"{prefix}_count"])
            thresholds = functools.partial(self._counted[prefix].thresholds, counts=keys[0], lasts=keys[1])
        return np.concatenate([chosen, _smallest(keys, wanted - len(chosen), excluded, None, thresholds)])


def recent_capacity(num_embeddings: int) -> int:
    """The recent parts' capacity: a count shifts them (O(capacity)), a merge every (capacity / ids admitted
    a count) counts shifts the table (O(table)), and the lookup takes capacity.bit_length() more steps."""
    return min(num_embeddings, RECENT_PER_ROOT * math.isqrt(num_embeddings))


def _search_rows(
    ascending: torch.Tensor, rows: torch.Tensor, size: torch.Tensor, ids: torch.Tensor, steps: int
) -> torch.Tensor:
    """The row of each id in ascending[:size] -> rows[:size], or 0: at the count of ids below it, found a bit
    at a time from the highest of `steps` (2**steps > size). A fixed number of gathers, which torch.export and
    ONNX trace (the ONNX exporter has no torch.searchsorted); a probe each, half the ops of a search that
    narrows [lo, hi), so that the two searches of a lookup cost what one did."""
    last = len(ascending) - 1
    below = torch.zeros_like(ids)  # how many of ascending[:size] are known to be below the id
    for bit in reversed(range(steps)):
        probe = below + (1 << bit)
        is_below = (probe <= size) & (ascending[(probe - 1).clamp(max=last)] < ids)
        below = torch.where(is_below, probe, below)
    at = below.clamp(max=last)
    found = (below < size) & (ascending[at] == ids)
    return torch.where(found, rows[at], 0)


def _smallest(
    keys: list[np.ndarray],
    k: int,
    excluded: np.ndarray,
    among: np.ndarray | None = None,
    thresholds: Thresholds | None = None,
) -> np.ndarray:
    """The k entries (of `among`, ascending, or of all), none of them `excluded` (ascending), first in the
    order of (keys[0], keys[1], ..., index), in that order: those below the first key's threshold (the
    value of its nth smallest, counting the excluded that may all be among the smallest), then those tied
    at it, by the next key (the same way: over all entries, the others masked as KEPT, or among them) or,
    for the last key, by index. Only the k chosen are sorted, and the excluded are found by binary search.
    `thresholds` (of all entries), where it tells them: every key's threshold at once, from histograms
    without a pass over the keys; one scan lists the entries up to the last one needed, ties by index."""
    primary = keys[0] if among is None else keys[0][among]
    if len(primary) == 0 or k == 0:
        return np.zeros(0, dtype=np.int64)
    nth = min(k + len(excluded), len(primary)) - 1
    split = None if thresholds is None else thresholds(nth)
    if split is not None:
        at, below_count, tied_count, below_earlier = split
        # Those below on a key before the last (lfu: a lower count) are few and, in a full table, usually all
        # excluded (the default row, free entries): then the scan reads the last key alone, half the reads.
        unlisted = _unlisted(keys, at, excluded, below_earlier)
        wanted_tied = min(tied_count, k + len(excluded))
        below, tied = _first_at_most(
            keys, at, below_count - (unlisted or 0), wanted_tied, unlisted is not None
        )
    else:
        # By index, the first k + len(excluded) tied entries will do: no need to list all of them; nor, over
        # the whole table, for the next key, which takes them with a mask (below).
        listed = None if len(keys) > 1 and among is not None else k + len(excluded)
        below, tied, threshold = _split_at_nth(primary, nth, listed)
        if among is not None:
            below, tied = among[below], among[tied]
    below = _without(below, excluded)
    below = below[np.lexsort([below, *(key[below] for key in reversed(keys))])][:k]
    need = k - len(below)
    if need == 0:
        return below
    if split is not None or len(keys) == 1:  # ties by index: the first ones will do
        rest = _without(tied[: need + len(excluded)], excluded)[:need]
    elif among is not None:
        rest = _smallest(keys[1:], need, excluded[:0], _without(tied, excluded))
    else:  # the next key over the whole table, KEPT outside the tie (so last), rather than a list of the tie
        is_tied = keys[0] == threshold
        rest = _smallest([np.where(is_tied, keys[1], KEPT), *keys[2:]], need, excluded)
        rest = rest[is_tied[rest]]  # a small table may not have `need` tied entries
    return np.concatenate([below, rest])


def _split_at_nth(values: np.ndarray, nth: int, tied_limit: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """The entries (ascending) whose value is below the nth smallest value, those equal to it (only the
    first tied_limit, if given), and that value, without a histogram: the lowest value is the threshold
    directly where it has enough entries (ties are the rule: a batch's ids share their last sighting); else
    the nth is selected among the entries up to a bound, doubled from the lowest value until enough lie under
    it: a few passes over the table (the keys are batch numbers and counts), where np.partition would copy
    and partially sort all of it."""
    lowest = int(values.min())
    at_lowest = values == lowest
    if np.count_nonzero(at_lowest) > nth:
        return np.zeros(0, dtype=np.int64), _first_true(at_lowest, tied_limit), lowest
    step = 1
    while True:
        bound = min(lowest + step, KEPT)
        under = values <= bound
        if bound == KEPT or np.count_nonzero(under) > nth:
            break
        step *= 2
    entries = np.flatnonzero(under)
    chosen = values[entries]
    threshold = np.partition(chosen, nth)[nth]
    return entries[chosen < threshold], _first_true(chosen == threshold, tied_limit, entries), int(threshold)


def _first_true(
    mask: np.ndarray, limit: int | None, entries: np.ndarray | None = None, where: bool = True
) -> np.ndarray:
    """The indices (or `entries`) where `mask` is true (false, with where=False), ascending: only the first
    `limit`, found a chunk at a time (a full table has millions tied), or all of them."""
    if limit is None:
        found = np.flatnonzero(mask if where else ~mask)
    else:
        chunks, total = [np.zeros(0, dtype=np.int64)], 0
        for start in range(0, len(mask) if limit > 0 else 0, SCAN_CHUNK):
            chunk = mask[start : start + SCAN_CHUNK]
            chunks.append(np.flatnonzero(chunk if where else ~chunk))
            chunks[-1] += start
            total += len(chunks[-1])
            if total >= limit:
                break
        found = np.concatenate(chunks)[:limit]
    return found if entries is None else entries[found]


def _unlisted(
    keys: list[np.ndarray], thresholds: tuple[int, ...], excluded: np.ndarray, earlier: int
) -> int | None:
    """Where all the `earlier` entries below the thresholds on a key before the last are excluded: how many
    of them a scan of the last key alone does not list (those above its threshold); else None."""
    if len(keys) == 1:
        return 0
    is_earlier, _ = _below_or_at(keys[:-1], thresholds[:-1], excluded)
    if np.count_nonzero(is_earlier) < earlier:
        return None
    return int(np.count_nonzero(is_earlier & (keys[-1][excluded] > thresholds[-1])))


def _below_or_at(
    keys: list[np.ndarray], thresholds: tuple[int, ...], entries: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Which entries are below the thresholds (in the order of keys[0], then keys[1], ...), and which at."""
    values = keys[0][entries]
    is_below, is_tied = values < thresholds[0], values == thresholds[0]
    for key, threshold in zip(keys[1:], thresholds[1:], strict=True):
        values = key[entries]
        is_below |= is_tied & (values < threshold)
        is_tied &= values == threshold
    return is_below, is_tied


def _first_at_most(
    keys: list[np.ndarray], thresholds: tuple[int, ...], below: int, tied: int, last_only: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The `below` entries (ascending) whose keys are below the thresholds (in the order of keys[0], then
    keys[1], ...), all of them, and the first `tied` at them: a chunk at a time, up to the chunk that holds
    the last one needed. An entry at most at the thresholds has a key below its threshold, or the last key at
    most at its own (last_only: only the latter are looked for): only those (few: the thresholds are low
    values) are read again for the exact order, not all those at most at the first key's threshold (under
    lfu, the whole lowest count: half a table)."""
    found_below, found_tied = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    below_left, tied_left = below, tied
    earlier = [] if last_only else list(zip(keys[:-1], thresholds[:-1], strict=True))
    for start in range(0, len(keys[0]), SCAN_CHUNK):
        if below_left <= 0 and tied_left <= 0:
            break
        chunk = slice(start, start + SCAN_CHUNK)
        maybe = keys[-1][chunk] <= thresholds[-1]
        for key, threshold in earlier:
            maybe |= key[chunk] < threshold
        at_most = np.flatnonzero(maybe) + start
        is_below, is_tied = _below_or_at(keys, thresholds, at_most)
        found_below.append(at_most[is_below])
        found_tied.append(at_most[is_tied])
        below_left, tied_left = below_left - len(found_below[-1]), tied_left - len(found_tied[-1])
    return np.concatenate(found_below), np.concatenate(found_tied)[:tied]


def _without(ascending: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    at, found = search(ascending, excluded)
    kept = np.ones(len(ascending), dtype=bool)
    kept[at[found]] = False
    return ascending[kept]


def _all_ranks(seen: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sightings of every rank added up (sorted by id), so that every rank updates its map alike."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return seen, counts
    gathered: list[tuple[np.ndarray, np.ndarray] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (seen, counts))
    ids = np.concatenate([g[0] for g in gathered if g is not None])
    total = np.concatenate([g[1] for g in gathered if g is not None])
    merged, inverse = np.unique(ids, return_inverse=True)
    return merged, np.bincount(inverse, weights=total, minlength=len(merged)).astype(np.int64)
