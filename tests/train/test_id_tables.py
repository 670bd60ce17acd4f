"""Id tables in training: a range table's skipped ids are counted in metrics.jsonl, and a managed table
killed with SIGKILL mid-run resumes with the map and the rows of an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import torch

from heavyranker.checkpoint import load_checkpoint
from heavyranker.train.loop import Trainer
from tests.conftest import CONFIGS, SMALL_SPLITS, small_config

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
