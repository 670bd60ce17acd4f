"""Training on a Kafka topic (a real broker: tests/kafka_broker.py): the offsets are in every checkpoint. The
kill-and-restart test, a topic read together with hour folders, is tests/train/test_follow_training.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from heavyranker.checkpoint import load_checkpoint
from heavyranker.run_folder import RunFolder

from ..kafka_broker import broker  # noqa: F401  (a fixture)
from ..kafka_data import example, kafka_overrides, produce_messages
from .kafka_train_run import listening, trained_ids

RUN = Path(__file__).with_name("kafka_train_run.py")
SRC = Path(__file__).resolve().parents[2] / "src"
BATCH = 8


def start(log: Path, overrides: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, str(RUN), str(log), *overrides],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def overrides(bootstrap: str, topic: str, save_dir: Path, *more: str) -> list[str]:
    return [
        *kafka_overrides(bootstrap, topic, poll_seconds=0.2),
        f"training.save_dir={save_dir}",
        "validation_data={}",
        f"train_data.global_batch_size={BATCH}",
        "training.checkpoint_every_n=3",
        "training.train_log_every_n=5",
        *more,
    ]


def stopped(run: subprocess.Popen) -> str:
    """The stderr of `run` once it has exited; if it does not within 120 s, its threads' stacks, then kill."""
    try:
        return run.communicate(timeout=120)[1]
    except subprocess.TimeoutExpired:
        run.send_signal(signal.SIGUSR1)
        time.sleep(2)
        run.kill()
        raise AssertionError(f"the run did not stop: {run.communicate()[1][-6000:]}") from None


def wait_for(condition, what: str, limit: float = 300) -> None:
    """Polls `condition` (a bound against a hang, not a timing assertion)."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


def last_run_trains_each_once(log: Path, args: list[str], total: int) -> str:
    """After a kill loop: one more run, stopped by SIGTERM once it has caught up; it must exit 0, and the
    steps in the final state hold each of ids 0..total-1 exactly once. Returns the run's stderr."""
    before = listening(log)
    run = start(log, args)
    # Caught up, and listening: a killed run's steps count until the next run's resume drops them, so the ids
    # may all be there before the last run has its SIGTERM handler.
    wait_for(
        lambda: (listening(log) > before and len(trained_ids(log)) >= total) or run.poll() is not None,
        "the last run to catch up",
    )
    run.send_signal(signal.SIGTERM)
    errors = stopped(run)
    assert run.returncode == 0, errors[-2000:]
    counts = Counter(trained_ids(log))
    assert sorted(counts) == list(range(total))
    assert set(counts.values()) == {1}
    return errors


def test_without_follow_it_trains_to_num_train_steps_and_saves_the_offsets(broker, tmp_path):  # noqa: F811
    broker.create_topic("bounded", 1)
    broker.produce("bounded", {0: [example(i) for i in range(100)]})
    log = tmp_path / "trained.log"
    run = start(log, overrides(broker.bootstrap, "bounded", tmp_path / "run", "training.num_train_steps=5"))
    _, errors = run.communicate(timeout=300)
    assert run.returncode == 0, errors[-2000:]
    assert trained_ids(log) == list(range(5 * BATCH))
    assert f"kafka: {100 - 5 * BATCH} records behind, newest message 20" in errors  # at step 5's log line
    newest = load_checkpoint(RunFolder(tmp_path / "run").newest_checkpoint())
    assert newest["step"] == 5
    assert newest["data_position"] == {"topic": "bounded", "offsets": {0: 5 * BATCH}}
    run = start(log, overrides(broker.bootstrap, "bounded", tmp_path / "run", "training.num_train_steps=7"))
    _, errors = run.communicate(timeout=300)
    assert run.returncode == 0, errors[-2000:]
    assert trained_ids(log) == list(range(7 * BATCH))  # resumed at message 40


def test_sigterm_while_waiting_for_messages(broker, tmp_path):  # noqa: F811
    """A follow run that has trained on everything waits; SIGTERM then saves and exits 0."""
    broker.create_topic("quiet", 1)
    broker.produce("quiet", {0: [example(i) for i in range(2 * BATCH)]})
    log = tmp_path / "trained.log"
    run = start(
        log,
        overrides(
            broker.bootstrap, "quiet", tmp_path / "run", "training.follow=true", "training.num_train_steps=1"
        ),
    )
    wait_for(lambda: len(trained_ids(log)) == 2 * BATCH or run.poll() is not None, "two steps")
    run.send_signal(signal.SIGTERM)
    _, errors = run.communicate(timeout=120)
    assert run.returncode == 0, errors[-2000:]
    assert "past num_train_steps (1)" in errors  # the schedule's constant tail, warned once
    assert errors.count("past num_train_steps") == 1
    newest = load_checkpoint(RunFolder(tmp_path / "run").newest_checkpoint())
    assert newest["step"] == 2
    assert newest["data_position"]["offsets"] == {0: 2 * BATCH}


def test_tombstones_are_not_trained_and_a_restart_goes_on_past_them(broker, tmp_path):  # noqa: F811
    """Messages without a value (deletes by key) among the records, a whole batch's worth of them and a
    trailing one: the steps train exactly the other records, once; the checkpoint's offset is past the
    last message (lag 0), and a restart trains only what came after."""
    broker.create_topic("deletes", 1)
    deleted = {i for i in range(40) if i % 5 == 3 or 16 <= i < 24 or i == 39}
    produce_messages(broker.bootstrap, "deletes", 0, [None if i in deleted else i for i in range(40)])
    log = tmp_path / "trained.log"
    steps = overrides(broker.bootstrap, "deletes", tmp_path / "run", "training.train_log_every_n=2")
    # 40 messages in runs of 8; the run of offsets 16..23 holds tombstones alone: 4 steps
    run = start(log, [*steps, "training.num_train_steps=4"])
    _, errors = run.communicate(timeout=300)
    assert run.returncode == 0, errors[-2000:]
    assert trained_ids(log) == [i for i in range(40) if i not in deleted]
    assert "kafka: 0 records behind" in errors
    assert f", {len(deleted)} tombstones skipped" in errors  # at step 4
    newest = load_checkpoint(RunFolder(tmp_path / "run").newest_checkpoint())
    assert (newest["step"], newest["data_position"]["offsets"]) == (4, {0: 40})

    produce_messages(broker.bootstrap, "deletes", 0, list(range(40, 56)))
    run = start(log, [*steps, "training.num_train_steps=6"])
    _, errors = run.communicate(timeout=300)
    assert run.returncode == 0, errors[-2000:]
    assert trained_ids(log) == [*(i for i in range(40) if i not in deleted), *range(40, 56)]
    assert ", 0 tombstones skipped" in errors  # at step 6: none read again
