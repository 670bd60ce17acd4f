"""How raw int64 ids become rows of an embedding table (a table's `id_mapping`), before the table.

Every mapping takes ids [B, L] and returns rows [B, L, k] (k vectors per id, summed or averaged) and a mask
[B, L] of the places holding an id (False: padding, or an id the table skips). The table only looks rows
up, so a sharded table can replace it without touching the mapping. All three run in plain torch integer
ops, which torch.export and the ONNX exporter trace, so an exported model maps ids as training did.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..config.embeddings import IdMapping, TableConfig
from .id_managed import ManagedMapping

# The hash: an id's 64 bits as three chunks c0, c1, c2 (bits 0-20, 21-41 and 42-63 shifted up by 2**21 to
# be non-negative), then h = ((a0 c0 + a1 c1 + a2 c2 + b) mod P) mod num_embeddings, with a0..a2 in
# [1, P) and b in [0, P) drawn from HASH_SEED and the hash's index. Each product stays below 2**53 and the
# sum below 2**55, so int64 never overflows (ONNX and torch agree on every op); for two different ids the
# chance of one hash colliding mod P is at most 1/P (a multilinear, Carter-Wegman family).
HASH_PRIME = 2**31 - 1
HASH_SEED = 20_260_126
LOW_BITS = 2**21 - 1
LOW_42_BITS = 2**42 - 1


def hash_coefficients(num_hashes: int) -> torch.Tensor:
    """[num_hashes, 4]: a0, a1, a2, b of each hash function; the same for every table and run."""
    rows = []
    for j in range(num_hashes):
        rng = np.random.default_rng([HASH_SEED, j])
        rows.append([*rng.integers(1, HASH_PRIME, 3), rng.integers(0, HASH_PRIME)])
    return torch.tensor(rows, dtype=torch.int64)


def hash_ids(ids: torch.Tensor, coefficients: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """[*ids.shape, k]: row of each id under each of the k hash functions (the formula above)."""
    c0 = ids & LOW_BITS
    c1 = torch.div(ids & (LOW_42_BITS - LOW_BITS), 2**21, rounding_mode="trunc")  # exact: no rounding
    c2 = torch.div(ids - (ids & LOW_42_BITS), 2**42, rounding_mode="trunc") + 2**21
    a = coefficients
    mixed = c0.unsqueeze(-1) * a[:, 0] + c1.unsqueeze(-1) * a[:, 1] + c2.unsqueeze(-1) * a[:, 2] + a[:, 3]
    return torch.remainder(torch.remainder(mixed, HASH_PRIME), num_embeddings)


class RangeMapping(nn.Module):
    """Ids are rows: an id outside [0, num_embeddings) is skipped. In training, each skipped id other than
    the padding id is counted in `out_of_range` (the trainer logs it): a raw id in a range table learns
    nothing, and the count says so."""

    def __init__(self, num_embeddings: int, padding_id: int | None):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.padding_id = padding_id
        self.num_hashes = 1
        self.out_of_range = 0  # since the process started; not in checkpoints

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        in_range = (ids >= 0) & (ids < self.num_embeddings)
        if self.padding_id is not None:
            in_range &= ids != self.padding_id
        if self.training and not torch.compiler.is_compiling():
            outside = ~in_range if self.padding_id is None else ~in_range & (ids != self.padding_id)
            self.out_of_range += int(outside.sum())
        return torch.where(in_range, ids, 0).unsqueeze(-1), in_range


class HashMapping(nn.Module):
    """k fixed hashes of any int64 id into num_embeddings rows (`hash_ids`); the padding id is skipped.
    The coefficients are a buffer, so a checkpoint and an export carry the hashing they were trained with."""

    def __init__(self, num_embeddings: int, num_hashes: int, padding_id: int | None):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.num_hashes = num_hashes
        self.padding_id = padding_id
        self.register_buffer("coefficients", hash_coefficients(num_hashes))

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = torch.ones_like(ids, dtype=torch.bool) if self.padding_id is None else ids != self.padding_id
        return hash_ids(ids, self.coefficients, self.num_embeddings), valid


def build_id_mapping(table: TableConfig, padding_id: int | None) -> nn.Module:
    """The mapping `table.id_mapping` names, for a table of table.num_embeddings rows."""
    match table.id_mapping:
        case IdMapping.RANGE:
            return RangeMapping(table.num_embeddings, padding_id)
        case IdMapping.HASH:
            return HashMapping(table.num_embeddings, table.num_hashes, padding_id)
        case IdMapping.MANAGED:
            return ManagedMapping(table.num_embeddings, table.min_count, table.eviction, padding_id)
