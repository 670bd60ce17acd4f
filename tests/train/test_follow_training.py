"""`train --follow` on dated hour folders and a Kafka topic together: each file's position and each
partition's offset are in every checkpoint, so runs killed at random moments and restarted train on every
record exactly once, while a writer adds folders and messages."""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from functools import partial
from pathlib import Path

from heavyranker.checkpoint import load_checkpoint
from heavyranker.run_folder import RunFolder

from ..data.test_follow import hour
from ..kafka_broker import broker  # noqa: F401  (a fixture)
from ..kafka_data import example, kafka_overrides
from .kafka_train_run import trained_ids
from .test_kafka_training import last_run_trains_each_once, start, wait_for

BATCH = 8
PER_FILE = 12  # two files an hour: 24 records, three steps


def overrides(root: Path, save_dir: Path, *more: str) -> list[str]:
    dated = f"{{data_root: '{root}', end_datetime: '2026-01-01T00', hours: 1}}"
    return [
        "train_data.inputs=null",
        f"train_data.explicit_datetime_inputs={dated}",
        "train_data.follow_poll_seconds=0.2",
        f"training.save_dir={save_dir}",
        "validation_data={}",
        f"train_data.global_batch_size={BATCH}",
        "training.checkpoint_every_n=3",
        "training.train_log_every_n=5",
        "training.follow=true",
        *more,
    ]


def folder(index: int) -> str:
    """The index-th hour from 2026-01-01 00:00, as its folder."""
    return time.strftime("%Y/%m/%d/%H", time.gmtime(1767225600 + 3600 * index))


def lines(log: Path, kind: str) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith(kind)] if log.exists() else []


def steps_after_resume(log: Path, resumed: list[str]) -> int:
    """The steps logged after the run that follows `resumed` (the resume lines before it started) restored."""
    if len(lines(log, "resume")) <= len(resumed):
        return 0
    text = log.read_text().splitlines()
    last = max(i for i, line in enumerate(text) if line.startswith("resume"))
    return sum(1 for line in text[last + 1 :] if line.startswith("step"))


def got_somewhere(run: subprocess.Popen, log: Path, resumed: list[str], steps: int, total: int) -> bool:
    """The run made `steps` steps since its restore, or there is nothing left to train on, or it ended."""
    return (
        steps_after_resume(log, resumed) >= steps or len(trained_ids(log)) >= total or run.poll() is not None
    )


def test_every_record_of_new_hour_folders_and_kafka_batches_is_trained_on_once_across_kills(
    broker,  # noqa: F811
    tmp_path,
):
    """One follow run reads dated hour folders and a topic together. A writer adds an hour folder, then a
    batch of messages, every second, while the run is SIGKILLed 20 times at random moments and restarted;
    at the end (SIGTERM: exit 0), the steps in the final state hold every record of both exactly once, and
    the checkpoint holds both positions."""
    hours, partitions = 20, 2
    per_hour = 2 * PER_FILE  # records of an hour folder; as many messages follow it
    root, log = tmp_path / "data", tmp_path / "trained.log"
    broker.create_topic("stream", partitions)
    args = overrides(root, tmp_path / "run", *kafka_overrides(broker.bootstrap, "stream", poll_seconds=0.2))

    def write() -> None:
        for index in range(hours):
            first = index * 2 * per_hour
            hour(root, folder(index), first, per_file=PER_FILE)
            time.sleep(0.5)
            messages = [example(i) for i in range(first + per_hour, first + 2 * per_hour)]
            broker.produce("stream", {p: messages[p::partitions] for p in range(partitions)})
            time.sleep(0.5)
        (root / folder(hours)).mkdir(parents=True)  # the next folder: the last hour is complete

    writer = threading.Thread(target=write)
    writer.start()
    rng = random.Random(0)
    total = hours * 2 * per_hour
    for _ in range(20):
        resumed = lines(log, "resume")
        run = start(log, args)
        # Killed 1 to 5 steps after its restore, then at a random moment within 0.2 s (a few steps here):
        # whatever the machine's load, every run gets somewhere, and the kills fall anywhere between and in
        # checkpoints. Within a second, a quiet machine trained 20-30 steps a run: 4 runs took the whole
        # stream, too few restores mid-stream (the assertion below).
        steps = rng.randint(1, 5)
        wait_for(partial(got_somewhere, run, log, resumed, steps, total), "the run's steps")
        time.sleep(rng.uniform(0.0, 0.2))
        run.send_signal(signal.SIGKILL)
        run.wait()
    writer.join()
    assert len({int(line.split()[1]) for line in lines(log, "resume")} - {0}) >= 5  # restores mid-stream
    errors = last_run_trains_each_once(log, args, total)
    position = load_checkpoint(RunFolder(tmp_path / "run").newest_checkpoint())["data_position"]
    assert position["source"] == f"dated folders {root}"
    assert len(position["files"]) == 2 * hours
    assert {(e["next"], e["done"]) for e in position["files"].values()} == {(PER_FILE, True)}
    assert position["topic"] == "stream"
    assert position["offsets"] == {p: hours * per_hour // partitions for p in range(partitions)}
    # Logged at the stop; its newest folder is the one listed by then (tests/data/test_follow.py checks it),
    # which a stop right after a restore at the end may come before.
    assert "follow: 0 files behind, newest" in errors
