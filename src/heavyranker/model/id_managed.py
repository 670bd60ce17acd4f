"""`id_mapping: managed`: a collision-free id -> row map with admission and eviction.

Row 0 is the default row: every id without a row of its own looks it up (an unseen id scores through it,
without an error). In training, each batch's ids are first counted: an id gets a row of its own once it
has been seen `min_count` times, taking a free row, or else the row of the resident id that `eviction`
picks (lru: seen least recently; lfu: seen least often, then least recently), never one looked up in the
same batch. The evicted id loses its row and its counts, and the new id starts from the row's vector (as
in torchrec). Ids waiting for admission are counted in a candidate table of as many entries, which evicts
by the same rule; a batch's new ids beyond its free entries are not counted.

The whole state is in buffers of fixed size (so in every checkpoint, and a resumed run maps exactly as an
uninterrupted one), and the lookup is a binary search over the resident ids sorted (a fixed number of
gather steps), which torch.export and ONNX trace: an export serves the map as it was at its checkpoint.
Under torch.distributed every rank counts the sightings of all ranks, so the maps stay identical.

Why not torchrec's MCHManagedCollisionModule: its admission is a threshold on counts within one eviction
interval (not a count that accumulates until admission), it works on KeyedJaggedTensor dicts of a
ManagedCollisionCollection, and its lookup is torch.searchsorted, for which the ONNX exporter has no op.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..config.model import Eviction

FREE = -1  # the score of a free row or candidate entry: taken before any eviction
ROW_STATE = ("row_ids", "row_used", "row_count", "row_last")
CANDIDATE_STATE = ("candidate_ids", "candidate_used", "candidate_count", "candidate_last")


class ManagedMapping(nn.Module):
    """forward(ids [B, L]) -> rows [B, L, 1], mask [B, L] (False only for the padding id)."""

    def __init__(self, num_embeddings: int, min_count: int, eviction: Eviction, padding_id: int | None):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.num_hashes = 1
        self.min_count = min_count
        self.eviction = eviction
        self.padding_id = padding_id
        self.search_steps = num_embeddings.bit_length()
        n = num_embeddings
        for prefix in ("row", "candidate"):
            self.register_buffer(f"{prefix}_ids", torch.zeros(n, dtype=torch.int64))
            self.register_buffer(f"{prefix}_used", torch.zeros(n, dtype=torch.bool))
            self.register_buffer(f"{prefix}_count", torch.zeros(n, dtype=torch.int64))
            self.register_buffer(f"{prefix}_last", torch.zeros(n, dtype=torch.int64))
        self.register_buffer("sorted_ids", torch.zeros(n, dtype=torch.int64))  # resident ids, ascending
        self.register_buffer("sorted_rows", torch.zeros(n, dtype=torch.int64))  # ... and their rows
        self.register_buffer("num_resident", torch.zeros((), dtype=torch.int64))
        self.register_buffer("tick", torch.zeros((), dtype=torch.int64))  # batches counted
        self._row_of: dict[int, int] | None = None  # id -> row and id -> candidate entry, from the buffers
        self._candidate_of: dict[int, int] | None = None

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not torch.compiler.is_compiling():
            self.observe(ids)
        valid = torch.ones_like(ids, dtype=torch.bool) if self.padding_id is None else ids != self.padding_id
        return self.lookup(ids).unsqueeze(-1), valid

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The row of each id: its own, or 0. The leftmost sorted position whose id is >= the id, found in
        search_steps halvings of [0, num_resident)."""
        last = self.num_embeddings - 1
        lo = torch.zeros_like(ids)
        hi = lo + self.num_resident
        for _ in range(self.search_steps):
            active = lo < hi
            middle = torch.div(lo + hi, 2, rounding_mode="floor")
            below = self.sorted_ids[middle.clamp(max=last)] < ids
            lo = torch.where(active & below, middle + 1, lo)
            hi = torch.where(active & ~below, middle, hi)
        at = lo.clamp(max=last)
        found = (lo < self.num_resident) & (self.sorted_ids[at] == ids)
        return torch.where(found, self.sorted_rows[at], 0)

    def resident(self) -> dict[int, int]:
        """id -> row of every id that has a row of its own."""
        used = self.row_used.cpu().numpy()
        return dict(
            zip(self.row_ids.cpu().numpy()[used].tolist(), np.flatnonzero(used).tolist(), strict=True)
        )

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._row_of = self._candidate_of = None  # rebuilt from the loaded buffers on the next count

    # -- counting (training only) ------------------------------------------------------------------------

    @torch.no_grad()
    def observe(self, ids: torch.Tensor) -> None:
        """Counts the batch's ids and admits those that reached min_count (the rules in the docstring)."""
        flat = ids.reshape(-1)
        if self.padding_id is not None:
            flat = flat[flat != self.padding_id]
        seen, counts = _all_ranks(*np.unique(flat.cpu().numpy(), return_counts=True))
        state = {name: getattr(self, name).cpu().numpy().copy() for name in (*ROW_STATE, *CANDIDATE_STATE)}
        if self._row_of is None or self._candidate_of is None:
            self._row_of, self._candidate_of = self._index(state, "row"), self._index(state, "candidate")
        tick = int(self.tick) + 1
        touched_rows, waiting = self._count(state, tick, seen, counts)
        admitted = self._admit(state, tick, touched_rows, waiting)
        for name, values in state.items():
            getattr(self, name).copy_(torch.from_numpy(values))
        self.tick.fill_(tick)
        if admitted:
            self._sort()

    @staticmethod
    def _index(state: dict[str, np.ndarray], prefix: str) -> dict[int, int]:
        used = state[f"{prefix}_used"]
        return dict(zip(state[f"{prefix}_ids"][used].tolist(), np.flatnonzero(used).tolist(), strict=True))

    def _count(
        self, state: dict[str, np.ndarray], tick: int, seen: np.ndarray, counts: np.ndarray
    ) -> tuple[np.ndarray, list[int]]:
        """Adds the sightings to resident rows and candidate entries (new ids take entries); returns the
        rows touched and the candidate entries touched."""
        assert self._row_of is not None and self._candidate_of is not None
        rows = [self._row_of.get(i, -1) for i in seen.tolist()]
        resident = np.array(rows, dtype=np.int64) >= 0
        touched_rows = np.array(rows, dtype=np.int64)[resident]
        np.add.at(state["row_count"], touched_rows, counts[resident])
        state["row_last"][touched_rows] = tick
        others = [(i, c) for i, c, r in zip(seen.tolist(), counts.tolist(), resident, strict=True) if not r]
        known = [(self._candidate_of[i], c) for i, c in others if i in self._candidate_of]
        new = [(i, c) for i, c in others if i not in self._candidate_of]
        touched = [entry for entry, _ in known]
        free = self._victims(state, "candidate", len(new), np.array(touched, dtype=np.int64))
        for entry, (i, _) in zip(free, new, strict=False):
            if state["candidate_used"][entry]:
                del self._candidate_of[int(state["candidate_ids"][entry])]
            state["candidate_ids"][entry], state["candidate_used"][entry] = i, True
            state["candidate_count"][entry] = 0
            self._candidate_of[i] = int(entry)
        known += [(int(entry), c) for entry, (_, c) in zip(free, new, strict=False)]
        for entry, c in known:
            state["candidate_count"][entry] += c
            state["candidate_last"][entry] = tick
        return touched_rows, [entry for entry, _ in known]

    def _admit(
        self, state: dict[str, np.ndarray], tick: int, touched_rows: np.ndarray, waiting: list[int]
    ) -> int:
        """Gives rows to the waiting ids that reached min_count, most sighted first (then lowest id)."""
        assert self._row_of is not None and self._candidate_of is not None
        ready = [e for e in waiting if state["candidate_count"][e] >= self.min_count]
        ready.sort(key=lambda e: (-int(state["candidate_count"][e]), int(state["candidate_ids"][e])))
        rows = self._victims(state, "row", len(ready), np.append(touched_rows, 0))
        for row, entry in zip(rows.tolist(), ready, strict=False):
            if state["row_used"][row]:
                del self._row_of[int(state["row_ids"][row])]
            new_id = int(state["candidate_ids"][entry])
            state["row_ids"][row], state["row_used"][row] = new_id, True
            state["row_count"][row], state["row_last"][row] = state["candidate_count"][entry], tick
            self._row_of[new_id] = row
            state["candidate_used"][entry] = False
            del self._candidate_of[new_id]
        return len(rows)

    def _victims(
        self, state: dict[str, np.ndarray], prefix: str, wanted: int, keep: np.ndarray
    ) -> np.ndarray:
        """Up to `wanted` entries to (re)use, best first: free ones, then by the eviction rule; never
        those in `keep`."""
        if wanted == 0:
            return np.zeros(0, dtype=np.int64)
        used = state[f"{prefix}_used"]
        last = np.where(used, state[f"{prefix}_last"], FREE)
        count = np.where(used, state[f"{prefix}_count"], FREE)
        blocked = np.zeros(len(used), dtype=bool)
        blocked[keep] = True
        index = np.arange(len(used))
        keys = (index, last) if self.eviction == Eviction.LRU else (index, last, count)
        order = np.lexsort(keys)
        return order[~blocked[order]][:wanted]

    def _sort(self) -> None:
        ids, used = self.row_ids.cpu().numpy(), self.row_used.cpu().numpy()
        rows = np.flatnonzero(used)
        order = np.argsort(ids[rows], kind="stable")
        n = len(rows)
        self.sorted_ids[:n] = torch.from_numpy(ids[rows][order])
        self.sorted_rows[:n] = torch.from_numpy(rows[order])
        self.num_resident.fill_(n)


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
