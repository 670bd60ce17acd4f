"""`heavyranker train` on local_small reading a Kafka topic, in its own process, for the kill-and-restart
tests (and bench/follow_latency.py): it appends to LOG a line `resume S` when it has restored step S, and
`step N TIME id id ...` with the time (time.time()) step N ended and the tweet ids of every record it trained
on (written before the step's checkpoint is saved), and `listening S` once its SIGTERM handler is in place
(a SIGTERM before that ends the process as the default action does, not with a checkpoint and exit 0).

python kafka_train_run.py LOG OVERRIDE..."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from heavyranker.config import load_config
from heavyranker.train import loop

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "local_small.yaml"


def main(log_path: str, overrides: list[str]) -> None:
    faulthandler.register(signal.SIGUSR1)  # the tests dump the threads of a run that does not stop
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def write(line: str) -> None:
        os.write(log, (line + "\n").encode())  # one write: a kill leaves a whole line or none

    restore, train_step = loop.Trainer.restore, loop.Trainer.train_step
    stop_on_signals = loop.Trainer._stop_on_signals

    def logged_restore(self) -> None:
        restore(self)
        write(f"resume {self.step}")

    def logged_train_step(self, batches):
        taken: list[int] = []

        def recording():
            for batch in batches:
                taken.extend(batch.features["meta__tweet_id"].reshape(-1).tolist())
                yield batch

        result = train_step(self, recording())
        write(f"step {self.step + 1} {time.time():.6f} " + " ".join(map(str, taken)))
        return result

    @contextmanager
    def logged_stop_on_signals(self):
        with stop_on_signals(self):
            write(f"listening {self.step}")
            yield

    loop.Trainer.restore, loop.Trainer.train_step = logged_restore, logged_train_step
    loop.Trainer._stop_on_signals = logged_stop_on_signals
    loop.train(load_config(CONFIG, overrides))


def trained_ids(log_path: Path) -> list[int]:
    """The ids of the steps that the last run's state holds: each `resume S` drops the steps after S."""
    steps: list[tuple[int, list[int]]] = []
    if not log_path.exists():  # no run has got that far
        return []
    for line in log_path.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # cut by a kill
        kind, number, *rest = line.split()
        if kind == "listening":
            continue
        if kind == "resume":
            steps = [(n, i) for n, i in steps if n <= int(number)]
        else:
            steps.append((int(number), [int(i) for i in rest[1:]]))
    return [i for _, ids in steps for i in ids]


def listening(log_path: Path) -> int:
    """How many runs have had their SIGTERM handler in place."""
    return log_path.read_text().count("listening ") if log_path.exists() else 0


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
