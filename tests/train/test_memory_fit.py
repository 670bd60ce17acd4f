"""A training batch that cannot fit in memory is refused at start in one line, from an estimate checked here
against hand counts; an out-of-memory that still happens is one line naming the setting to lower."""

import pytest
import torch
from torch import nn

from heavyranker.cli import main
from heavyranker.config.loader import load_config
from heavyranker.config.optimizer import TableOptimizerConfig
from heavyranker.data.batch import Spec
from heavyranker.data.columns import feature_specs
from heavyranker.errors import UserError
from heavyranker.model import build_model
from heavyranker.train import loop, memory_fit
from heavyranker.train.memory_fit import (
    activation_bytes,
    check_batch_fits,
    check_model_fits,
    example_bytes,
    state_bytes,
)
from tests.conftest import CONFIGS, SMALL_SPLITS
from tests.data.test_dataset import data_config

SPECS = {  # tests/data/test_dataset.py's features as its batches hold them
    "continuous": Spec((6,), torch.float32),
    "binary": Spec((4,), torch.float32),
    "discrete": Spec((3,), torch.int64),
    "meta__id": Spec((), torch.int64),
}
# 6 x 4 + 4 x 4 + 3 x 8 + 8 bytes of features, and a float32 label and weight for each of 2 tasks.
EXAMPLE_BYTES = 24 + 16 + 24 + 8 + 2 * 2 * 4


class ToyTable(nn.Module):
    def __init__(self, rows: int = 10, columns: int = 3, device: str = "cpu"):
        super().__init__()
        self.embedding = nn.EmbeddingBag(rows, columns, mode="sum", device=device)


class Toy(nn.Module):
    """What state_bytes reads of a Ranker: parameters, buffers, an id table (not in the forward)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.layers = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 1))
        self.large_embeddings = nn.ModuleDict({"users": ToyTable()})
        self.register_buffer("seen", torch.zeros(7, dtype=torch.int64))

    def table_parameters(self):
        return [self.large_embeddings["users"].embedding.weight]

    def forward(self, features):
        return {"logits": self.layers(self.norm(features["continuous"]))}


# Leaf outputs per example: LayerNorm 6, Linear 5, ReLU 5, Linear 1 float32 values.
TOY_ACTIVATIONS = (6 + 5 + 5 + 1) * 4
# Dense parameters: LayerNorm 6 + 6, Linear 6 x 5 + 5, Linear 5 + 1, held 4 times (weights, gradients, Adam's
# 2); the table's 10 x 3 weights as well (Adam trains them without optimizer.embedding); the buffer's 7 int64.
DENSE_STATE = (12 + 35 + 6) * 4 * 4
TABLE_WEIGHTS = 10 * 3 * 4
TOY_STATE = DENSE_STATE + 4 * TABLE_WEIGHTS + 7 * 8


def test_the_estimate_is_the_hand_count(tmp_path):
    assert feature_specs(data_config(tmp_path)) == SPECS
    assert example_bytes(SPECS, tasks=2) == EXAMPLE_BYTES
    toy = Toy().train()
    assert activation_bytes(toy, SPECS) == TOY_ACTIVATIONS
    assert toy.training  # the measuring forward left the mode as it was
    assert state_bytes(toy, OPTIMIZER) == TOY_STATE


OPTIMIZER = load_config(CONFIGS / "local_small.yaml").optimizer
assert OPTIMIZER.embedding is None


def with_table_optimizer(kind: str):
    return OPTIMIZER.model_copy(update={"embedding": TableOptimizerConfig(type=kind, learning_rate=0.1)})


@pytest.mark.parametrize(
    ("kind", "table_shards", "table_state"),
    [
        # weights and gradients, and one float32 a row for each of the 10 rows
        ("rowwise_adagrad", 1, 2 * TABLE_WEIGHTS + 10 * 4),
        ("adagrad", 1, 3 * TABLE_WEIGHTS),  # and its sum of squares
        ("sgd", 1, 2 * TABLE_WEIGHTS),
        ("adam", 1, 4 * TABLE_WEIGHTS),
        # split over 2 processes: half of the 4 copies; over 4, a quarter and, at start, one block of rows
        # beside it while it is filled: the whole 10-row table (a block has 65,536 rows)
        ("adam", 2, 2 * TABLE_WEIGHTS),
        ("adam", 4, TABLE_WEIGHTS // 4 + TABLE_WEIGHTS),
        ("rowwise_adagrad", 2, TABLE_WEIGHTS // 2 + TABLE_WEIGHTS + 10 * 4),
    ],
)
def test_the_tables_state_is_what_their_optimizer_keeps(kind, table_shards, table_state):
    state = state_bytes(Toy(), with_table_optimizer(kind), table_shards)
    assert state == DENSE_STATE + table_state + 7 * 8


@pytest.mark.parametrize(
    ("table_shards", "table_state"),
    [
        # 1,000,000 x 8 float32 (32,000,000 bytes) over 8 processes: Adam's 4 copies of an eighth, no whole
        # table (the whole table until the shards were filled by block)
        (8, 4 * 32_000_000 // 8),
        # over 64: at start its 500,000 bytes and a block of 65,536 rows x 8 float32 beside them while it
        # fills them, more than the 4 copies of its share (2,000,000)
        (64, 500_000 + 65_536 * 8 * 4),
    ],
)
def test_a_sharded_table_is_counted_as_its_share_and_one_block_of_rows(table_shards, table_state):
    toy = Toy()
    toy.large_embeddings["users"] = ToyTable(1_000_000, 8, device="meta")  # shapes only
    assert state_bytes(toy, OPTIMIZER, table_shards) == DENSE_STATE + table_state + 7 * 8


def test_the_model_is_measured_without_memory_and_refused_naming_its_largest_table():
    config = load_config(CONFIGS / "local_small_ids.yaml")
    specs = feature_specs(config.train_data)
    built = build_model(config.model, specs)
    state = state_bytes(built, config.optimizer)
    assert check_model_fits(config.model, specs, config.optimizer, limit=(state, "a test limit")) == state
    with pytest.raises(UserError) as e:
        check_model_fits(config.model, specs, config.optimizer, limit=(state - 1, "a test limit"))
    assert str(e.value).startswith("model: its weights, gradients and optimizer state need at least 0.0 GiB")
    # users: 2,500 x 16 float32; authors: 1,250 x 16
    assert str(e.value).endswith(
        "of a test limit; the largest id table, model.large_embeddings.tables[0] (users), holds 0.0 GiB of "
        "weights: lower its num_embeddings"
    )


def test_a_batch_over_the_limit_is_refused_naming_the_setting():
    need = TOY_STATE + 10 * (EXAMPLE_BYTES + TOY_ACTIVATIONS)
    check_batch_fits(SPECS, 2, Toy(), batch_size=10, state=TOY_STATE, limit=(need, "a test limit"))
    with pytest.raises(UserError) as e:
        check_batch_fits(SPECS, 2, Toy(), 10, TOY_STATE, world_size=2, limit=(need - 1, "a test limit"))
    assert str(e.value).startswith("train_data.global_batch_size: 20 examples need at least 0.0 GiB")
    # 9 examples fit in each of the 2 processes: the global batch may be 18.
    assert str(e.value).endswith("lower train_data.global_batch_size (this estimate allows at most 18)")


def train(small_data, tmp_path, config: str, *overrides: str) -> int:
    sets = [f"train_data.inputs={small_data}/train/*.gz", f"training.save_dir={tmp_path}", *overrides]
    sets += [f"validation_data.{s}.inputs={small_data}/{s}/*.gz" for s in SMALL_SPLITS if config == "small"]
    argv = ["train", "--config", str(CONFIGS / f"local_{config}.yaml")]
    return main([*argv, *(arg for value in sets for arg in ("--set", value))])


def test_local_prod_at_the_largest_batch_is_refused_at_start(small_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory_fit, "memory_limit", lambda: (64 * 2**30, "a test limit"))
    assert train(small_data, tmp_path, "prod", f"train_data.global_batch_size={2**20}") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train_data.global_batch_size: 1,048,576 examples need at least ")
    assert "more than the 64.0 GiB of a test limit; lower train_data.global_batch_size" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "checkpoints").exists()


def test_a_model_over_the_limit_is_refused_before_it_is_built(small_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory_fit, "memory_limit", lambda: (2**20, "a test limit"))
    monkeypatch.setattr(loop, "build_model", failing_allocation)  # the real build must not be reached
    assert train(small_data, tmp_path, "small") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model: its weights, gradients and optimizer state need at least ")
    assert err.endswith("GiB per process, more than the 0.0 GiB of a test limit\n")
    assert not (tmp_path / "checkpoints").exists()


def test_the_processes_on_one_host_share_its_memory(small_data, tmp_path, monkeypatch, capsys):
    config = load_config(CONFIGS / "local_small.yaml")
    state = check_model_fits(config.model, feature_specs(config.train_data), config.optimizer)
    # One process fits; torchrun's 4 processes on this host (LOCAL_WORLD_SIZE) do not.
    monkeypatch.setattr(memory_fit, "memory_limit", lambda: (3 * state, "a test limit"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert train(small_data, tmp_path, "small") == 2
    need = f"{4 * state / 2**30:.1f}"
    assert capsys.readouterr().err == (
        "error: model: its weights, gradients and optimizer state need at least "
        f"{need} GiB for the 4 processes on this host, more than the 0.0 GiB of a test limit\n"
    )


def last_line(capsys) -> str:
    """stderr's last line, after the progress bar's, which must not be a traceback's."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()[-1]


def failing_allocation(*args, **kwargs):
    return torch.empty(2**50)  # 4 PiB: the allocator refuses it at once


def test_an_out_of_memory_in_a_step_is_one_line(small_data, tmp_path, monkeypatch, capsys):
    build = loop.build_model

    def model_that_runs_out(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_hook(lambda module, i, o: failing_allocation() if module.training else None)
        return model

    monkeypatch.setattr(loop, "build_model", model_that_runs_out)
    assert train(small_data, tmp_path, "small", "training.num_train_steps=2") == 2
    assert last_line(capsys) == "error: out of memory at step 1; lower train_data.global_batch_size"


def test_an_out_of_memory_building_the_model_is_one_line(small_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "build_model", failing_allocation)
    assert train(small_data, tmp_path, "small") == 2
    assert last_line(capsys) == (
        "error: out of memory building the model; lower the id tables' num_embeddings or the layers' sizes "
        "(model)"
    )


def test_an_out_of_memory_in_any_command_is_one_line(small_data, tmp_path, monkeypatch, capsys):
    assert train(small_data, tmp_path, "small", "training.num_train_steps=1") == 0
    capsys.readouterr()
    monkeypatch.setattr("heavyranker.eval.evaluator.build_model", failing_allocation)
    argv = [
        "evaluate",
        "--config",
        str(CONFIGS / "local_small.yaml"),
        "--set",
        f"training.save_dir={tmp_path}",
    ]
    argv += [
        arg for s in SMALL_SPLITS for arg in ("--set", f"validation_data.{s}.inputs={small_data}/{s}/*.gz")
    ]
    assert main(argv) == 2
    # torch.empty(2**50) asks for 2**52 bytes
    assert last_line(capsys) == (
        "error: out of memory (an allocation of 4,294,967,296.0 MiB failed) in `heavyranker evaluate`"
    )


def test_an_out_of_memory_in_an_evaluation_is_one_line(small_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "evaluate_splits", failing_allocation)
    overrides = ("training.num_train_steps=2", "training.eval_log_every_n=1")
    assert train(small_data, tmp_path, "small", *overrides) == 2
    assert last_line(capsys) == (
        "error: out of memory evaluating at step 1; lower validation_data.<split>.global_batch_size"
    )
