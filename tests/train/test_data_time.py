"""The time of the newest training data reaches the checkpoint: a file source's newest file's modification
time, a Kafka source's newest message's broker time (a real broker: tests/kafka_broker.py)."""

from __future__ import annotations

import os
import shutil
import time

from heavyranker.checkpoint import load_checkpoint
from heavyranker.train.loop import Trainer
from tests.conftest import small_config

from ..kafka_broker import broker  # noqa: F401  (a fixture)
from ..kafka_data import example, kafka_config

PLANTED = 1_700_000_000.0  # 2023-11-14: a time no file of the test has by chance
TWO_STEPS = ("training.num_train_steps=2", "train_data.global_batch_size=8", "training.checkpoint_every_n=2")


def test_a_checkpoint_holds_the_newest_files_modification_time(small_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    files = sorted((data / "train").glob("*.gz"))
    for i, path in enumerate(files):
        os.utime(path, (PLANTED + 100 * i, PLANTED + 100 * i))
    config = small_config(data, tmp_path / "run", *TWO_STEPS, "validation_data={}")
    Trainer(config).run()
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_2.pt")
    assert state["newest_data_time"] == PLANTED + 100 * (len(files) - 1)


def test_a_checkpoint_holds_the_newest_kafka_messages_time(broker, tmp_path):  # noqa: F811
    broker.create_topic("timed", 1)
    before = time.time()
    broker.produce("timed", {0: [example(i) for i in range(16)]})
    after = time.time()
    config = kafka_config(broker.bootstrap, "timed", tmp_path / "run", *TWO_STEPS, poll_seconds=0.2)
    Trainer(config).run()
    newest = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_2.pt")["newest_data_time"]
    # The broker keeps the producer's time, in milliseconds.
    assert before - 0.001 <= newest <= after + 0.001
