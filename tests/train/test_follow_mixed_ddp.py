"""`train --follow` on dated hour folders and a Kafka topic together, on 2 gloo ranks (CPU processes, as
torchrun's workers; a real broker: tests/kafka_broker.py). Each rank logs the ids it trains on
(kafka_train_run.py): every record of both streams is trained once across the ranks, each rank on its own
share (its files of each folder, its partitions); the checkpoint holds both streams' positions, every rank's
together, and a restarted 2-rank run goes on from there; a stop stops both ranks at the same step."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from heavyranker.checkpoint import load_checkpoint
from heavyranker.config import load_config
from heavyranker.errors import UserError
from heavyranker.train.loop import train

from ..data.test_follow import hour
from ..data.test_kafka import produce_ids
from ..kafka_broker import broker  # noqa: F401  (a fixture)
from ..kafka_data import kafka_overrides
from ..test_runtime import on_two_ranks
from . import kafka_train_run
from .kafka_train_run import trained_ids
from .test_kafka_training import wait_for

BATCH = 8  # 4 records a rank


@pytest.fixture(autouse=True)
def _cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def overrides(root: Path, run: Path, bootstrap: str, topic: str) -> list[str]:
    dated = f"{{data_root: '{root}', end_datetime: '2026-01-01T00', hours: 1}}"
    return [
        *kafka_overrides(bootstrap, topic, poll_seconds=0.2),
        f"train_data.explicit_datetime_inputs={dated}",
        "train_data.follow_complete=marker",
        "train_data.follow_poll_seconds=0.1",
        f"train_data.global_batch_size={BATCH}",
        "validation_data={}",
        f"training.save_dir={run}",
        "training.checkpoint_every_n=2",
        "training.follow=true",
    ]


def trained_log(logs: Path, rank: int) -> Path:
    return logs / f"trained_{rank}.log"


def follow_on_a_rank(logs: Path, stop_file: Path, delays: tuple[float, float], args: list[str]) -> None:
    """A rank's follow run, logging what it trains (kafka_train_run.py), stopped by SIGTERM delays[rank]
    seconds after stop_file appears."""
    rank = int(os.environ["RANK"])

    def stop_when_asked() -> None:
        while not stop_file.exists():
            time.sleep(0.1)
        time.sleep(delays[rank])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_asked, daemon=True).start()
    kafka_train_run.main(str(trained_log(logs, rank)), args)


def steps(log: Path) -> list[int]:
    return [int(line.split()[1]) for line in log.read_text().splitlines() if line.startswith("step ")]


def both_listening(logs: Path, runs: int) -> bool:
    """Both ranks of the `runs`-th run have their SIGTERM handler in place."""
    return all(kafka_train_run.listening(trained_log(logs, rank)) >= runs for rank in (0, 1))


def position_of_what_was_trained(state: dict, root: Path, trained: set[int]) -> None:
    """The checkpoint's position is that of the records `trained`, independently of how far reading got: a
    partition's next offset is the count of its messages trained (offsets 0, 1, ... in order; absent: none),
    a file's `next` the count of its records trained, done when that is all of them."""
    position = state["data_position"]
    assert position["topic"] == "both" and position["source"] == f"dated folders {root}"
    for partition, first in ((0, 100), (1, 200)):
        taken = sorted(i for i in trained if first <= i < first + 100)
        assert taken == list(range(first, first + len(taken)))  # each partition trained in offset order
        assert position["offsets"].get(partition, 0) == len(taken)
    files = {
        "2026/01/01/00/part-0.gz": range(0, 4),
        "2026/01/01/00/part-1.gz": range(4, 8),
        "2026/01/01/00/part-2.gz": range(8, 12),
        "2026/01/01/01/part-0.gz": range(12, 20),
        "2026/01/01/01/part-1.gz": range(20, 28),
    }
    held = {str(Path(path).relative_to(root)): entry for path, entry in position["files"].items()}
    for name, ids in files.items():
        taken = len(trained & set(ids))
        if taken:
            assert (held[name]["next"], held[name]["done"]) == (taken, taken == len(ids)), name
        else:
            assert name not in held


def test_two_ranks_train_each_record_of_files_and_topic_once_across_a_stop_and_restart(
    broker,  # noqa: F811
    tmp_path,
):
    """Run 1: hour 00's files (rank 0: part-0 and part-2, rank 1: part-1) and 8 messages in partition 0, 4 in
    partition 1 arrive: rank 1 has 8 records, two steps; rank 0 has 16. After 2 steps both wait (rank 0 with
    its next batch ready); a stop reaching rank 0 first stops both at step 2. Run 2 resumes from that
    checkpoint while hour 01 and more messages arrive: 20 records left for each rank, 5 steps; a stop reaching
    rank 1 first stops both at step 7."""
    root, run, logs = tmp_path / "data", tmp_path / "run", tmp_path / "logs"
    broker.create_topic("both", 2)
    args = overrides(root, run, broker.bootstrap, "both")

    def run_while_writing(attempt: int, write: Callable[[], None], last_step: int, delays: tuple) -> None:
        """Run `attempt` of the two ranks: `write` once both listen; the stop once both trained `last_step`
        and polled a while (both wait then, one with a batch ready), reaching rank r delays[r] s later."""

        def write_then_stop() -> None:
            wait_for(lambda: both_listening(logs, attempt), f"run {attempt} to listen")
            write()
            wait_for(
                lambda: all(last_step in steps(trained_log(logs, r)) for r in (0, 1)),
                f"run {attempt}'s step {last_step}",
            )
            time.sleep(1)
            (tmp_path / f"stop_{attempt}").touch()

        writer = threading.Thread(target=write_then_stop)
        writer.start()
        on_two_ranks(follow_on_a_rank, logs, tmp_path / f"stop_{attempt}", delays, args, logs=logs)
        writer.join()

    def write_first() -> None:
        (hour(root, "2026/01/01/00", 0, per_file=4, files=3) / "_SUCCESS").touch()
        produce_ids(broker, "both", {0: range(100, 108), 1: range(200, 204)})

    run_while_writing(1, write_first, last_step=2, delays=(0.0, 1.5))
    state = load_checkpoint(run / "checkpoints" / "step_2.pt")
    assert sorted((run / "checkpoints").glob("step_*.pt")) == [run / "checkpoints" / "step_2.pt"]
    assert [steps(trained_log(logs, r)) for r in (0, 1)] == [[1, 2], [1, 2]]  # none stopped early or late
    first = {rank: trained_ids(trained_log(logs, rank)) for rank in (0, 1)}
    assert sorted(first[1]) == [*range(4, 8), *range(200, 204)]  # all of rank 1's share
    assert len(set(first[0])) == 8 and set(first[0]) <= {*range(0, 4), *range(8, 12), *range(100, 108)}
    position_of_what_was_trained(state, root, set(first[0]) | set(first[1]))

    def write_second() -> None:
        (hour(root, "2026/01/01/01", 12, per_file=8) / "_SUCCESS").touch()
        produce_ids(broker, "both", {0: range(108, 112), 1: range(204, 216)})

    run_while_writing(2, write_second, last_step=7, delays=(1.5, 0.0))
    state = load_checkpoint(run / "checkpoints" / "step_7.pt")
    assert [steps(trained_log(logs, r)) for r in (0, 1)] == [[1, 2, 3, 4, 5, 6, 7]] * 2
    trained = {rank: trained_ids(trained_log(logs, rank)) for rank in (0, 1)}
    assert set(trained[0]) == {*range(0, 4), *range(8, 20), *range(100, 112)}  # rank 0's share
    assert set(trained[1]) == {*range(4, 8), *range(20, 28), *range(200, 216)}  # rank 1's
    counts = Counter(trained[0] + trained[1])
    assert set(counts.values()) == {1}  # none twice, across the restart and the ranks
    assert state["data_position"]["offsets"] == {0: 12, 1: 16}
    position_of_what_was_trained(state, root, set(counts))


def refused_on_a_rank(root: Path, run: Path, errors: Path, bootstrap: str) -> None:
    """A rank's follow run of files and a 1-partition topic: the UserError it ends with, into errors/RANK."""
    config = load_config(kafka_train_run.CONFIG, overrides(root, run, bootstrap, "single"))
    try:
        train(config)
    except UserError as error:
        errors.mkdir(exist_ok=True)
        (errors / os.environ["RANK"]).write_text(str(error))


def test_more_ranks_than_partitions_is_refused_on_every_rank_before_training(broker, tmp_path):  # noqa: F811
    """With 1 partition for 2 ranks, rank 1 would have files and no partition: each rank reads its own
    partitions as it would alone, so both refuse in one line, and neither hangs or trains anything."""
    root, run, errors = tmp_path / "data", tmp_path / "run", tmp_path / "errors"
    broker.create_topic("single", 1)
    produce_ids(broker, "single", {0: range(100, 108)})
    (hour(root, "2026/01/01/00", 0, per_file=4) / "_SUCCESS").touch()
    on_two_ranks(refused_on_a_rank, root, run, errors, broker.bootstrap, logs=tmp_path / "logs")
    expected = (
        "train_data.kafka: 1 partition(s) of topic single for 2 processes; each process reads its own "
        "partitions, so the topic needs at least 2"
    )
    assert [(errors / rank).read_text() for rank in ("0", "1")] == [expected, expected]
    assert not list(run.glob("checkpoints/step_*.pt"))
