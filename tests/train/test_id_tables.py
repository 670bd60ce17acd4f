"""Id tables in training: a range table's skipped ids are counted in metrics.jsonl, and a managed table
killed with SIGKILL mid-run resumes with the map and the rows of an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import torch
import yaml
from torch import nn

from heavyranker.checkpoint import load_checkpoint
from heavyranker.config import load_config
from heavyranker.train.loop import Trainer, train
from heavyranker.train.table_optim import RowWiseAdagrad
from tests.conftest import CONFIGS, SMALL_SPLITS, small_config
from tests.test_runtime import _cpu, assert_close, data, on_two_ranks, train_config, weights, write_config  # noqa: F401 (fixtures: CPU only, the tiny data set)

FAST = (
    "train_data.global_batch_size=64",
    "training.train_log_every_n=1",
    "training.eval_log_every_n=1000",
    "training.checkpoint_max_to_keep=null",
)
# 4,000 rows of ~500 users (raw ids from 2**20 to 2**62): a table of 32 rows evicts at every step.
MANAGED = (
    "model.large_embeddings={tables: [{name: users, num_embeddings: 32, embedding_dim: 4, "
    "feature_name: meta__user_id, id_mapping: managed, min_count: 2, eviction: lru}]}"
)
RANGE = (
    "model.large_embeddings={tables: [{name: authors, num_embeddings: 100, embedding_dim: 4, "
    "feature_name: meta__author_id}]}"
)
TRAIN_SCRIPT = """
import sys
import torch
from heavyranker.cli import main
torch.set_num_threads(1)  # as the tests' own process: the same sums in the same order
sys.exit(main(["train", "--config", sys.argv[1], *sum((["--set", s] for s in sys.argv[2:]), [])]))
"""


def test_ids_outside_a_range_table_are_counted_in_the_training_log(small_data, tmp_path, caplog):
    Trainer(small_config(small_data, tmp_path, *FAST, RANGE, "training.num_train_steps=3")).run()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Every author id is at least 2**20: each example's one id is outside the 100 rows.
    assert [line["data/ids_out_of_range/authors"] for line in lines] == [64, 128, 192]
    assert "ids outside their table's rows, skipped" in caplog.text and "authors=192" in caplog.text


def test_a_managed_table_killed_mid_run_resumes_with_the_same_map_and_rows(small_data, tmp_path):
    steps = ("training.num_train_steps=14", "training.checkpoint_every_n=2")
    Trainer(small_config(small_data, tmp_path / "straight", *FAST, MANAGED, *steps)).run()

    killed = tmp_path / "killed"
    overrides = [f"train_data.inputs={small_data}/train/*.gz", f"training.save_dir={killed}", *FAST, MANAGED]
    overrides += [f"validation_data.{s}.inputs={small_data}/{s}/*.gz" for s in SMALL_SPLITS]
    child = subprocess.Popen(
        [sys.executable, "-c", TRAIN_SCRIPT, str(CONFIGS / "local_small.yaml"), *overrides, *steps],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300  # a bound against a hang, not a timing assertion
    while not (killed / "checkpoints/step_6.pt").exists():
        assert child.poll() is None, child.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (killed / "checkpoints/step_14.pt").exists()
    Trainer(small_config(small_data, killed, *FAST, MANAGED, *steps)).run()

    straight = load_checkpoint(tmp_path / "straight/checkpoints/step_14.pt")["model"]
    resumed = load_checkpoint(killed / "checkpoints/step_14.pt")["model"]
    prefix = "large_embeddings.users."
    assert int(straight[prefix + "mapping.num_resident"]) == 31  # full: rows 1..31 hold ids
    assert int(straight[prefix + "mapping.tick"]) == 14
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key


def test_rowwise_adagrad_updates_the_rows_looked_up_by_their_own_accumulator():
    weight = nn.Parameter(torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
    optimizer = RowWiseAdagrad([weight], lr=0.1, weight_decay=0.5, eps=0.0)
    weight.grad = torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.0, 3.0]])
    optimizer.step()
    # row 0: g = (1, 2) + 0.5 * (1, 1) = (1.5, 2.5), sum = (2.25 + 6.25) / 2 = 4.25
    # row 1: not looked up: no decay, no update; row 2: g = (1.5, 4.5), sum = (2.25 + 20.25) / 2 = 11.25
    expected = [
        [1 - 0.1 * 1.5 / 4.25**0.5, 1 - 0.1 * 2.5 / 4.25**0.5],
        [2.0, 2.0],
        [3 - 0.1 * 1.5 / 11.25**0.5, 3 - 0.1 * 4.5 / 11.25**0.5],
    ]
    torch.testing.assert_close(weight.detach(), torch.tensor(expected))
    weight.grad = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    optimizer.step()  # row 2's sum grows: 11.25 + mean((1 + 0.5 * w)^2)
    w2 = torch.tensor(expected[2])
    g2 = 1 + 0.5 * w2
    torch.testing.assert_close(weight.detach()[2], w2 - 0.1 * g2 / (11.25 + g2.square().mean()).sqrt())


def test_tables_with_their_own_optimizer_leave_the_adam_groups_and_resume_exactly(small_data, tmp_path):
    own = ("optimizer.embedding={type: rowwise_adagrad, learning_rate: 0.05, weight_decay: 0.001}",)
    trainer = Trainer(
        small_config(small_data, tmp_path / "straight", *FAST, MANAGED, *own, "training.num_train_steps=4")
    )
    table = trainer.model.large_embeddings["users"].embedding.weight
    assert all(p is not table for group in trainer.optimizer.param_groups for p in group["params"])
    trainer.run()
    lines = [json.loads(line) for line in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["lr/embedding_tables"] == 0.05
    for steps in (2, 4):
        Trainer(
            small_config(
                small_data, tmp_path / "resumed", *FAST, MANAGED, *own, f"training.num_train_steps={steps}"
            )
        ).run()
    straight = load_checkpoint(tmp_path / "straight/checkpoints/step_4.pt")
    resumed = load_checkpoint(tmp_path / "resumed/checkpoints/step_4.pt")
    assert all(torch.equal(v, resumed["model"][k]) for k, v in straight["model"].items())
    [sums] = [s["sum"] for s in straight["table_optimizer"]["state"].values()]
    assert torch.equal(sums, resumed["table_optimizer"]["state"][0]["sum"]) and (sums > 0).any()


def test_a_managed_map_on_two_ranks_is_the_map_of_one_process_on_the_whole_batch(data, tmp_path):  # noqa: F811
    """Every rank counts the sightings of both ranks: the same admissions and evictions as one process."""
    configs = {}
    for run in ("ddp", "single"):
        path = write_config(data, tmp_path / run, num_train_steps=6, checkpoint_every_n=6)
        config = yaml.safe_load(path.read_text())
        config["model"]["large_embeddings"] = {
            "tables": [
                {"name": "d", "feature_name": "discrete", "num_embeddings": 3, "embedding_dim": 2}
                | {"id_mapping": "managed", "min_count": 2, "eviction": "lfu", "padding_id": None}
            ]
        }
        path.write_text(yaml.safe_dump(config))
        configs[run] = path
    on_two_ranks(train_config, configs["ddp"], logs=tmp_path / "logs")
    train(load_config(configs["single"]))
    ddp, single = weights(tmp_path / "ddp", 6), weights(tmp_path / "single", 6)
    mapping = {k: v for k, v in single.items() if ".mapping." in k}
    assert int(mapping["large_embeddings.d.mapping.num_resident"]) == 2
    assert int(mapping["large_embeddings.d.mapping.row_count"].sum()) > 0
    for key, value in mapping.items():
        assert torch.equal(ddp[key], value), key
    assert_close(ddp, single)
