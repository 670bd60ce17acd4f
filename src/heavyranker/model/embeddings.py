"""Learned embeddings appended to the featurized input: small tables over columns of the discrete tensor,
large tables over id features (mean-pooled bags), and the position-debiasing embedding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _init_table(weight: torch.Tensor) -> None:
    # TorchRec's default for embedding tables (the reference's large embeddings): U(-1/sqrt(n), 1/sqrt(n)).
    bound = 1.0 / math.sqrt(weight.shape[0])
    nn.init.uniform_(weight, -bound, bound)


class SmallEmbedding(nn.Module):
    """A table over column `column` of the discrete tensor. Row `num_embeddings` is reserved for ids outside
    [0, num_embeddings), so unseen or corrupt ids get a learned vector instead of an index error."""

    def __init__(self, num_embeddings: int, embedding_dim: int, column: int):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings + 1, embedding_dim)
        _init_table(self.embedding.weight)
        self.num_embeddings = num_embeddings
        self.column = column
        self.out_features = embedding_dim

    def forward(self, discrete: torch.Tensor) -> torch.Tensor:
        ids = discrete[:, self.column]
        ids = torch.where((ids >= 0) & (ids < self.num_embeddings), ids, self.num_embeddings)
        return self.embedding(ids)


class LargeEmbedding(nn.Module):
    """A table over a fixed-length id feature [B, L] (or [B]): the mean of the vectors of each example's ids.
    Ids outside [0, num_embeddings) are padding: left out of the mean (an example with none gets zeros).
    The table has exactly num_embeddings rows, as the reference's TorchRec tables."""

    def __init__(self, num_embeddings: int, embedding_dim: int, feature_name: str):
        super().__init__()
        self.embedding = nn.EmbeddingBag(num_embeddings, embedding_dim, mode="sum")
        _init_table(self.embedding.weight)
        self.num_embeddings = num_embeddings
        self.feature_name = feature_name
        self.out_features = embedding_dim

    def bag(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows each example's vectors come from [B, L'] and their weights (0: padding): everything before
        the table, so that a sharded table (train/sharding.py) looks up the same bags."""
        ids = ids.reshape(ids.shape[0], -1)
        valid = (ids >= 0) & (ids < self.num_embeddings)
        return torch.where(valid, ids, 0), valid.to(torch.float32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids, weights = self.bag(ids)
        weights = weights.to(self.embedding.weight.dtype)
        if torch.compiler.is_compiling():  # also true while torch.export traces for an export
            # ONNX has no EmbeddingBag: its exporter writes a loop over the candidates, 2.5x torch's time at
            # 1,000 local_small candidates. A gather and a weighted sum is the same mean, one op each.
            summed = (F.embedding(ids, self.embedding.weight) * weights.unsqueeze(-1)).sum(dim=1)
        else:
            summed = F.embedding_bag(ids, self.embedding.weight, per_sample_weights=weights, mode="sum")
        return bag_mean(summed, weights)


def bag_mean(summed: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted sum of a bag's vectors [B, D] over its total weight: the mean (zeros for an empty bag)."""
    return summed / weights.sum(dim=1, keepdim=True).clamp(min=1.0)


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
