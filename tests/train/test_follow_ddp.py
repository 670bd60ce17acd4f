"""`train --follow` on 2 gloo ranks (CPU processes, as torchrun's workers): each rank takes its own files of
each new folder, and a rank left without data waits outside the step's collectives, so a stop signal that
reaches the ranks at different moments still stops both at the same step, with one checkpoint."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from heavyranker.checkpoint import load_checkpoint
from heavyranker.train.loop import train

from ..data.test_follow import hour, hours_config
from ..test_runtime import on_two_ranks


@pytest.fixture(autouse=True)
def _cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


NEWER = (1000.0, 3000.0, 2000.0)  # seconds after the test's start: the planted times of hour 01's files


def follow_on_a_rank(root: Path, run: Path, stop_file: Path) -> None:
    """A rank's follow run, stopped by SIGTERM after stop_file appears: rank 1 1.5 s after rank 0."""
    delay = 1.5 * int(os.environ["RANK"])

    def stop_when_asked() -> None:
        while not stop_file.exists():
            time.sleep(0.1)
        time.sleep(delay)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_asked, daemon=True).start()
    config = hours_config(
        root,
        "train_data.global_batch_size=8",
        "train_data.follow_complete=marker",
        f"training.save_dir={run}",
        "training.checkpoint_every_n=2",
        "training.follow=true",
    )
    train(config)


def wait_for(path: Path, limit: float = 100) -> None:
    deadline = time.monotonic() + limit  # a bound on a hang, not a timing assertion
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)


def test_ranks_share_new_files_and_stop_together_while_one_waits(tmp_path):
    root, run, stop_file = tmp_path / "data", tmp_path / "run", tmp_path / "stop"
    # Hour 00: two files of 8 records, one per rank: 2 steps of 4 records a rank.
    (hour(root, "2026/01/01/00", 0, per_file=8) / "_SUCCESS").touch()

    def write() -> None:
        wait_for(run / "checkpoints" / "step_2.pt")
        # Hour 01: three files; rank 0 takes files 0 and 2 (16 records), rank 1 file 1 (8): after 2 more steps
        # rank 1 has nothing, and rank 0 waits with it for data, its next batch ready.
        folder = hour(root, "2026/01/01/01", 16, per_file=8, files=3)
        for k, newer in enumerate(NEWER):  # rank 1's file the newest: rank 0 alone would not know it
            os.utime(folder / f"part-{k}.gz", (start + newer, start + newer))
        (folder / "_SUCCESS").touch()
        wait_for(run / "checkpoints" / "step_4.pt")
        time.sleep(2)  # some polls: both ranks wait
        stop_file.touch()

    start = time.time()
    writer = threading.Thread(target=write)
    writer.start()
    on_two_ranks(follow_on_a_rank, root, run, stop_file, logs=tmp_path / "logs")
    writer.join()
    newest = sorted((run / "checkpoints").glob("step_*.pt"), key=lambda p: int(p.stem[5:]))[-1]
    state = load_checkpoint(newest)
    assert state["step"] == 4
    files = {
        str(Path(p).relative_to(root)): (e["next"], e["done"])
        for p, e in state["data_position"]["files"].items()
    }
    assert files == {
        "2026/01/01/00/part-0.gz": (8, True),
        "2026/01/01/00/part-1.gz": (8, True),
        "2026/01/01/01/part-0.gz": (8, True),
        "2026/01/01/01/part-1.gz": (8, True),
    }  # 01/part-2.gz: rank 0's next batch, ready and not trained on
    # The newest file any rank has read: rank 1's part-1 (rank 0 has opened part-0 and part-2).
    assert state["newest_data_time"] == pytest.approx(start + NEWER[1], abs=1e-3)
