"""A training batch that cannot fit in memory is refused at start in one line, from an estimate checked here
against hand counts; an out-of-memory that still happens is one line naming the setting to lower."""

import pytest
import torch
from torch import nn

from heavyranker.cli import main
from heavyranker.data.batch import Spec
from heavyranker.data.columns import feature_specs
from heavyranker.errors import UserError
from heavyranker.train import loop, memory_fit
from heavyranker.train.memory_fit import activation_bytes, check_batch_fits, example_bytes, state_bytes
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


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.layers = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 1))

    def forward(self, features):
        return {"logits": self.layers(self.norm(features["continuous"]))}


# Leaf outputs per example: LayerNorm 6, Linear 5, ReLU 5, Linear 1 float32 values.
TOY_ACTIVATIONS = (6 + 5 + 5 + 1) * 4
# Parameters: LayerNorm 6 + 6, Linear 6 x 5 + 5, Linear 5 + 1; held 4 times (weights, gradients, Adam's 2).
TOY_STATE = (12 + 35 + 6) * 4 * 4


def test_the_estimate_is_the_hand_count(tmp_path):
    assert feature_specs(data_config(tmp_path)) == SPECS
    assert example_bytes(SPECS, tasks=2) == EXAMPLE_BYTES
    toy = Toy().train()
    assert activation_bytes(toy, SPECS) == TOY_ACTIVATIONS
    assert toy.training  # the measuring forward left the mode as it was
    assert state_bytes(toy) == TOY_STATE


def test_a_batch_over_the_limit_is_refused_naming_the_setting():
    need = TOY_STATE + 10 * (EXAMPLE_BYTES + TOY_ACTIVATIONS)
    check_batch_fits(SPECS, 2, Toy(), batch_size=10, limit=(need, "a test limit"))
    with pytest.raises(UserError) as e:
        check_batch_fits(SPECS, 2, Toy(), batch_size=10, world_size=2, limit=(need - 1, "a test limit"))
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


def test_an_out_of_memory_in_an_evaluation_is_one_line(small_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "evaluate_splits", failing_allocation)
    overrides = ("training.num_train_steps=2", "training.eval_log_every_n=1")
    assert train(small_data, tmp_path, "small", *overrides) == 2
    assert last_line(capsys) == (
        "error: out of memory evaluating at step 1; lower validation_data.<split>.global_batch_size"
    )
