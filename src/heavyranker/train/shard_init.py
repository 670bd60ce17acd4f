"""A sharded run's large tables start without a whole table on any rank: the ranker is built without their
rows (build_model's allocate_large_tables=False), DistributedModelParallel allocates each rank's shards, and
each shard is filled with its part of the table's initial rows (model/embeddings.py init_rows: the rows a
replicated build with the same seed starts from)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..model import Ranker
from ..model.embeddings import init_rows


def parameter_order(ranker: Ranker) -> list[str]:
    """The ranker's parameter names in named_parameters' order, each large table's weight at its place also
    where the table was built without its rows: a stand-in on the meta device (no memory) names it there."""
    unbuilt = [table for table in ranker.large_embeddings.values() if table.embedding is None]
    for table in unbuilt:
        table.embedding = nn.EmbeddingBag(table.num_embeddings, table.out_features, device="meta")
    try:
        return [name for name, _ in ranker.named_parameters()]
    finally:
        for table in unbuilt:
            table.embedding = None


def fill_shards(sharded: dict[str, Any], ranker: Ranker) -> None:
    """Each of this rank's shards of the large tables (table name -> its weight as a torchrec ShardedTensor)
    filled with the rows and columns it holds of the table's initial rows."""
    for name, weight in sharded.items():
        table = ranker.large_embeddings[name]
        for shard in weight.local_shards():
            row, column = shard.metadata.shard_offsets
            init_rows(shard.tensor, table.seed, (table.num_embeddings, table.out_features), row, column)
