"""A large table's initial rows are drawn block by block (model/embeddings.py init_rows), so that a sharded
run (train/shard_init.py) fills each rank's shards alone: no rank ever makes a tensor of a whole table it
does not hold, and the shards start as the same rows of a replicated build with the same seed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from heavyranker.config import load_config
from heavyranker.data.columns import feature_specs
from heavyranker.model import build_model, embeddings
from heavyranker.model.embeddings import LargeEmbedding, init_rows
from heavyranker.runtime import distributed_runtime
from heavyranker.train.loop import Trainer
from heavyranker.train.memory_fit import activation_bytes
from heavyranker.train.shard_init import parameter_order
from heavyranker.train.sharding import ShardedTables
from tests.conftest import CONFIGS
from tests.test_runtime import _cpu, on_two_ranks  # noqa: F401 (_cpu: autouse, the CPU also beside a GPU)
from tests.train.test_sharding import AUTHORS, USERS, _config, data  # noqa: F401 (data: the ids fixture)

pytest.importorskip("torchrec", reason="the torchrec extra (docs/sharding.md)")

TABLES = {"users": (USERS, 8), "authors": (AUTHORS, 6)}  # test_sharding's tables: rows, columns
BLOCK = 16  # rows per block in the 2-rank runs: users (40 rows) is 3 blocks, authors (30) 2


def whole_table(seed: int, rows: int, columns: int, block: int) -> torch.Tensor:
    """The definition, one block after the other: block b's rows from a generator seeded with (seed, b)
    mixed by numpy's SeedSequence, U(-1/sqrt(rows), 1/sqrt(rows))."""
    bound = 1 / math.sqrt(rows)
    blocks = []
    for b, start in enumerate(range(0, rows, block)):
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence((seed, b)).generate_state(1)[0]))
        blocks.append(
            torch.empty(min(block, rows - start), columns).uniform_(-bound, bound, generator=generator)
        )
    return torch.cat(blocks)


def test_any_block_of_rows_and_columns_is_that_block_of_the_whole_table(monkeypatch):
    monkeypatch.setattr(embeddings, "INIT_BLOCK_ROWS", 4)  # 10 rows: blocks of rows 0-3, 4-7, 8-9
    whole = whole_table(7, 10, 3, block=4)
    assert whole.abs().max() <= 1 / math.sqrt(10) and whole.abs().max() > 0.9 / math.sqrt(10)
    assert not torch.equal(whole[0:2], whole[4:6])  # each block its own draws
    for first in range(10):
        for last in range(first + 1, 11):
            for column in range(3):
                for end in range(column + 1, 4):
                    part = torch.full((last - first, end - column), float("nan"))
                    init_rows(part, 7, (10, 3), first, column)
                    assert torch.equal(part, whole[first:last, column:end]), (first, last, column, end)


def test_rows_across_the_real_blocks_boundaries():
    assert embeddings.INIT_BLOCK_ROWS == 65_536
    whole = whole_table(3, 140_000, 2, block=65_536)
    part = torch.empty(131_080 - 65_530, 1)
    init_rows(part, 3, (140_000, 2), 65_530, 1)  # the last rows of block 0, all of block 1, some of block 2
    assert torch.equal(part, whole[65_530:131_080, 1:])


def test_a_table_draws_one_seed_from_torchs_generator_and_starts_from_its_rows():
    torch.manual_seed(5)
    table = LargeEmbedding(10, 3, "ids")
    after = torch.rand(4)
    torch.manual_seed(5)
    assert table.seed == int(torch.randint(2**32, ()))
    assert torch.equal(torch.rand(4), after)  # what is built after the table draws as it would after one draw
    assert torch.equal(table.embedding.weight.detach(), whole_table(table.seed, 10, 3, block=10))
    unallocated = LargeEmbedding(10, 3, "ids", allocate=False)
    assert unallocated.embedding is None and unallocated.seed is not None


def test_a_ranker_without_its_tables_rows_is_otherwise_the_same_and_names_them_in_place():
    config = load_config(CONFIGS / "local_small_ids.yaml")
    specs = feature_specs(config.train_data)
    torch.manual_seed(0)
    full = build_model(config.model, specs)
    torch.manual_seed(0)
    without = build_model(config.model, specs, allocate_large_tables=False)
    assert parameter_order(without) == [name for name, _ in full.named_parameters()]
    assert all(table.embedding is None for table in without.large_embeddings.values())  # and stays so
    want = full.state_dict()
    got = without.state_dict()
    assert set(want) - set(got) == {f"large_embeddings.{n}.embedding.weight" for n in ("users", "authors")}
    for name, value in got.items():
        assert torch.equal(value, want[name]), name


def test_the_batch_estimate_of_a_ranker_without_its_tables_rows_is_the_one_with_them():
    """train checks a batch against a ranker built without the rows (sharded): its probe forward looks the
    tables up as zeros, after their id mappings, whose outputs count as a replicated ranker's do."""
    config = load_config(CONFIGS / "local_small_ids.yaml")
    specs = feature_specs(config.train_data)
    with_rows, without = (build_model(config.model, specs, allocate_large_tables=a) for a in (True, False))
    assert activation_bytes(without, specs) == activation_bytes(with_rows, specs) > 0


class Allocations(TorchDispatchMode):
    """The shapes of the tensors every op makes, off the meta device (which holds no memory) unless `meta`."""

    def __init__(self, meta: bool = False) -> None:
        super().__init__()
        self.meta = meta
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and (self.meta or not tensor.is_meta):
                self.shapes.add(tuple(tensor.shape))
        return out


def _holds_whole(sharded: ShardedTables) -> dict[str, bool]:
    """Table name -> whether this rank's shards of it are all of it (a table-wise shard, or every column)."""
    return {
        name: sum(math.prod(s.metadata.shard_sizes) for s in weight.local_shards()) == math.prod(TABLES[name])
        for name, weight in sharded.sharded_weights().items()
    }


def _column_wise_start(config_path: Path, out: Path) -> None:
    """On each of 2 ranks: the ranker built as train builds it, both tables split by columns."""
    embeddings.INIT_BLOCK_ROWS = BLOCK  # a fresh process: the tables are larger than a block
    config = load_config(config_path)
    specs = feature_specs(config.train_data)
    with distributed_runtime() as runtime:
        allocations = Allocations()
        with allocations:
            torch.manual_seed(0)
            model = build_model(config.model, specs, config.train_data.tasks, allocate_large_tables=False)
            sharded = ShardedTables(
                model, runtime, sharding_types={"users": "column_wise", "authors": "column_wise"}
            )
        shards = {
            name: [(list(s.metadata.shard_offsets), s.tensor.detach().clone()) for s in weight.local_shards()]
            for name, weight in sharded.sharded_weights().items()
        }
        got = {"shapes": allocations.shapes, "whole": _holds_whole(sharded), "shards": shards}
        torch.save(got | {"ranker": model.state_dict()}, out / f"rank_{runtime.rank}.pt")


def test_each_rank_makes_only_its_shards_and_they_start_as_a_replicated_build(data, tmp_path, monkeypatch):  # noqa: F811
    config_path = _config(data, tmp_path / "run", "torchrec")
    on_two_ranks(_column_wise_start, config_path, tmp_path, logs=tmp_path / "logs")
    monkeypatch.setattr(embeddings, "INIT_BLOCK_ROWS", BLOCK)
    config = load_config(config_path)
    torch.manual_seed(0)
    replicated = build_model(config.model, feature_specs(config.train_data), config.train_data.tasks)
    want = replicated.state_dict()
    covered = dict.fromkeys(TABLES, 0)
    wholes = []
    for rank in range(2):
        got = torch.load(tmp_path / f"rank_{rank}.pt", weights_only=False)
        for name, shape in TABLES.items():  # a tensor of a whole table only where its columns all are
            assert (shape in got["shapes"]) == got["whole"][name], (rank, name)
            wholes.append(got["whole"][name])
        assert (BLOCK, 8) in got["shapes"]  # a block it drew its users columns from
        for name, shards in got["shards"].items():
            full = want[f"large_embeddings.{name}.embedding.weight"]
            for (row, column), tensor in shards:
                rows, width = tensor.shape
                assert torch.equal(tensor, full[row : row + rows, column : column + width]), (rank, name)
                covered[name] += rows * width
        for name, value in got["ranker"].items():  # everything else: as the replicated build
            assert torch.equal(value, want[name]), name
    assert not all(wholes)  # a rank held part of a table: the check above could fail
    assert covered == {name: rows * columns for name, (rows, columns) in TABLES.items()}  # every row once


def _trainer_start(config_path: Path, out: Path) -> None:
    embeddings.INIT_BLOCK_ROWS = BLOCK
    allocations = Allocations()
    with allocations:
        trainer = Trainer(load_config(config_path))
    assert trainer.sharded is not None
    got = {"shapes": allocations.shapes, "whole": _holds_whole(trainer.sharded)}
    torch.save(got, out / f"trainer_{trainer.runtime.rank}.pt")


def test_a_trainer_makes_no_whole_table_that_its_rank_does_not_hold(data, tmp_path):  # noqa: F811
    """As the planner places them (table-wise here: one table on each rank), a table's shape is made on the
    rank that holds it only."""
    config_path = _config(data, tmp_path / "run", "torchrec")
    on_two_ranks(_trainer_start, config_path, tmp_path, logs=tmp_path / "logs")
    held = set()
    for rank in range(2):
        got = torch.load(tmp_path / f"trainer_{rank}.pt", weights_only=False)
        for name, shape in TABLES.items():
            assert (shape in got["shapes"]) == got["whole"][name], (rank, name)
            if got["whole"][name]:
                held.add(name)
    assert held == set(TABLES)
