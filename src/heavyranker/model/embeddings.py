"""Learned embeddings appended to the featurized input: small tables over columns of the discrete tensor,
large tables over id features (mean-pooled bags), and the position-debiasing embedding."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .id_mapping import RangeMapping

# A large table's rows are drawn block by block, each block of this many rows from its own generator, so that
# any part of the table (a shard) is computed alone with one block of memory beside it (init_rows).
INIT_BLOCK_ROWS = 65_536


def _init_table(weight: torch.Tensor) -> None:
    # TorchRec's default for embedding tables (the reference's large embeddings): U(-1/sqrt(n), 1/sqrt(n)).
    bound = 1.0 / math.sqrt(weight.shape[0])
    nn.init.uniform_(weight, -bound, bound)


def table_seed() -> int | None:
    """A large table's seed: one draw from torch's global RNG, so that what is built after the table draws as
    deterministically as before; None on the meta device (shapes only), where nn.init draws nothing either."""
    if torch.get_default_device().type == "meta":
        return None
    # 32 bits: torch's CPU generator keeps no more of a seed
    return int(torch.randint(2**32, (), device="cpu"))


def block_seed(seed: int, block: int) -> int:
    """The seed of a table's block of rows: (seed, block) mixed by numpy's SeedSequence, not seed + block,
    under which a table whose seed is another's + k would start with that table's rows from block k on."""
    return int(np.random.SeedSequence((seed, block)).generate_state(1)[0])


@torch.no_grad()
def init_rows(out: torch.Tensor, seed: int, shape: tuple[int, int], row: int = 0, column: int = 0) -> None:
    """Fills `out` with its part of the initial table of `seed` and `shape` (rows, columns): the rows from
    `row` and the columns from `column`, as many as `out` has. The table is _init_table's distribution,
    U(-1/sqrt(rows), 1/sqrt(rows)), drawn in blocks of INIT_BLOCK_ROWS full rows, block b from a generator
    seeded by block_seed(seed, b); only the blocks `out` overlaps are drawn, one at a time."""
    rows, columns = out.shape
    bound = 1.0 / math.sqrt(shape[0])
    generator = torch.Generator()
    # One buffer for every block: a tensor per block left ~45 MiB more in the heap at 4M x 32 rows
    buffer = torch.empty(min(INIT_BLOCK_ROWS, shape[0]), shape[1])
    for block in range(row // INIT_BLOCK_ROWS, -(-(row + rows) // INIT_BLOCK_ROWS)):
        start = block * INIT_BLOCK_ROWS
        values = buffer[: min(INIT_BLOCK_ROWS, shape[0] - start)]
        values.uniform_(-bound, bound, generator=generator.manual_seed(block_seed(seed, block)))
        first, last = max(row, start), min(row + rows, start + len(values))
        out[first - row : last - row].copy_(values[first - start : last - start, column : column + columns])


class SmallEmbedding(nn.Module):
    """A table over column `column` of the discrete tensor. With the default range mapping, row
    `num_embeddings` is reserved for ids outside [0, num_embeddings), so unseen or corrupt ids get a learned
    vector instead of an index error (they are counted, see RangeMapping). With `mapping` (hash or managed)
    every value is an id, mapped to one of num_embeddings rows."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        column: int,
        mapping: nn.Module | None = None,
        mean: bool = False,
    ):
        super().__init__()
        reserved = mapping is None or isinstance(mapping, RangeMapping)
        self.mapping = RangeMapping(num_embeddings, None) if mapping is None else mapping
        self.embedding = nn.Embedding(num_embeddings + int(reserved), embedding_dim)
        _init_table(self.embedding.weight)
        self.num_embeddings = num_embeddings
        self.column = column
        self.mean = mean  # combine an id's num_hashes vectors by their mean, not their sum
        self.out_features = embedding_dim

    def forward(self, discrete: torch.Tensor) -> torch.Tensor:
        rows, valid = self.mapping(discrete[:, self.column : self.column + 1])
        if isinstance(self.mapping, RangeMapping):
            rows = torch.where(valid.unsqueeze(-1), rows, self.num_embeddings)
        vectors = self.embedding(rows[:, 0]).sum(dim=1)  # [B, k, D] -> [B, D]
        return vectors / rows.shape[-1] if self.mean else vectors


class LargeEmbedding(nn.Module):
    """A table over a fixed-length id feature [B, L] (or [B]): the mean over each example's ids of the
    id's vector (the sum or mean of its num_hashes rows). `mapping` turns raw ids into rows (default:
    range, ids outside [0, num_embeddings) skipped as padding); the places it masks are left out of the mean
    (an example with none gets zeros). The table has exactly num_embeddings rows, as the reference's TorchRec
    tables; its initial rows are init_rows' for its `seed`. `allocate` False builds it without its rows
    (`embedding` None): train/sharding.py allocates them as shards over the ranks and fills each so."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        feature_name: str,
        mapping: nn.Module | None = None,
        mean: bool = False,
        allocate: bool = True,
    ):
        super().__init__()
        self.mapping = RangeMapping(num_embeddings, -1) if mapping is None else mapping
        self.seed = table_seed()
        self.embedding = None
        if allocate:
            weight = torch.empty(num_embeddings, embedding_dim)
            if self.seed is not None:
                init_rows(weight, self.seed, (num_embeddings, embedding_dim))
            self.embedding = nn.EmbeddingBag(num_embeddings, embedding_dim, mode="sum", _weight=weight)
        self.num_embeddings = num_embeddings
        self.feature_name = feature_name
        self.mean = mean  # combine an id's num_hashes vectors by their mean, not their sum
        self.out_features = embedding_dim

    def bag(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything before the table, so that a sharded table (train/sharding.py) looks up the same bags:
        the rows each example's vectors come from [B, L * k], their weights (0: a place the mapping masks;
        1 / k each with mean) and the ids counted [B, 1], what the weighted sum is divided by."""
        rows, valid = self.mapping(per_example(ids))  # [B, L, k], [B, L]
        hashes = rows.shape[-1]
        per_id = valid.to(torch.float32)
        weights = (per_id / hashes if self.mean else per_id).unsqueeze(-1).expand(rows.shape)
        return rows.flatten(1), weights.flatten(1), per_id.sum(dim=1, keepdim=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows, weights, counted = self.bag(ids)
        table = self.embedding
        if isinstance(table, nn.EmbeddingBag) and not torch.compiler.is_compiling():
            weights = weights.to(table.weight.dtype)
            summed = F.embedding_bag(rows, table.weight, per_sample_weights=weights, mode="sum")
        else:
            # While torch.export traces (for an export): ONNX has no EmbeddingBag, and its exporter writes a
            # loop over the candidates, 2.5x torch's time at 1,000 local_small candidates; a gather and a
            # weighted sum is the same mean, one op each. An exported table of 8-bit rows
            # (serve/table_precision.py) gathers and dequantizes its rows itself.
            vectors = F.embedding(rows, table.weight) if isinstance(table, nn.EmbeddingBag) else table(rows)
            summed = (vectors * weights.to(vectors.dtype).unsqueeze(-1)).sum(dim=1)
        return bag_mean(summed, counted)


def per_example(values: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B, values per example]; not reshape(B, -1), which a batch of no rows cannot resolve."""
    return values.unsqueeze(1) if values.dim() == 1 else values.flatten(1)


def bag_mean(summed: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """A bag's weighted sum [B, D] over the ids counted in it [B, 1]: the mean (zeros for an empty bag)."""
    return summed / counted.to(summed.dtype).clamp(min=1.0)


class PositionDebias(nn.Module):
    """An embedding of the position column of the discrete tensor. Rows 0..max_position-1 are positions,
    row max_position is shared by every later position, row max_position + 1 means "position unknown": it
    replaces the position with drop_probability in training and always at inference (and for negative
    positions), so the model learns what it would predict without the position and serves that."""

    def __init__(self, max_position: int, num_dims: int, drop_probability: float, column: int):
        super().__init__()
        self.embedding = nn.Embedding(max_position + 2, num_dims)
        _init_table(self.embedding.weight)
        self.max_position = max_position
        self.drop_probability = drop_probability
        self.column = column
        self.out_features = num_dims

    def forward(self, discrete: torch.Tensor) -> torch.Tensor:
        positions = discrete[:, self.column]
        unknown = self.max_position + 1
        if not self.training:
            return self.embedding(torch.full_like(positions, unknown))
        dropped = (positions < 0) | (
            torch.rand(positions.shape, device=positions.device) < self.drop_probability
        )
        return self.embedding(torch.where(dropped, unknown, positions.clamp(max=self.max_position)))
