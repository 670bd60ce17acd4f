"""A follow run on dated folders keeps in its checkpoints the files of the days from its watermark on only
(folders_done_before: every folder of an earlier day trained to its end), not every file it has ever read, and
a restart from it lists from that day on, training each record once."""

from __future__ import annotations

import signal

from heavyranker.checkpoint import load_checkpoint
from heavyranker.run_folder import RunFolder

from ..data.test_follow import hour
from .kafka_train_run import trained_ids
from .test_follow_training import PER_FILE, overrides
from .test_kafka_training import last_run_trains_each_once, listening, start, stopped, wait_for


def test_a_checkpoint_holds_the_files_past_the_watermark_and_a_restart_reads_each_record_once(tmp_path):
    root, log = tmp_path / "data", tmp_path / "trained.log"
    per_hour = 2 * PER_FILE
    for day in range(3):  # an hour folder a day; the third is the newest, not complete yet
        hour(root, f"2026/01/0{day + 1}/00", day * per_hour, per_file=PER_FILE)
    args = overrides(root, tmp_path / "run")
    run = start(log, args)
    wait_for(
        lambda: (listening(log) and len(trained_ids(log)) >= 2 * per_hour) or run.poll() is not None, "steps"
    )
    run.send_signal(signal.SIGTERM)
    errors = stopped(run)
    assert run.returncode == 0, errors[-2000:]
    position = load_checkpoint(RunFolder(tmp_path / "run").newest_checkpoint())["data_position"]
    # Was every file read (the 4 of 01-01 and 01-02), and no watermark: a week of hour folders of 100 files
    # each made 16,800 entries, in every checkpoint, and a restart listed every folder since the first hour.
    # The watermark a checkpoint holds is the one its step gathered, and the reader's thread publishes what
    # it listed a little after the records it hands out: 01-02 or 01-03 here, by timing alone.
    done = position["folders_done_before"]
    assert done in ("2026-01-02", "2026-01-03")
    assert all(path.split("/data/")[1][:10].replace("/", "-") >= done for path in position["files"])

    hour(
        root, "2026/01/01/05", 1000
    )  # late, behind the watermark: the running stream would not see it either
    hour(root, "2026/01/03/01", 3 * per_hour, per_file=PER_FILE)  # completes 01-03 00
    last_run_trains_each_once(log, args, 3 * per_hour)
    position = load_checkpoint(RunFolder(tmp_path / "run").newest_checkpoint())["data_position"]
    assert position["folders_done_before"] == "2026-01-03"
    assert sorted(path.split("/data/")[1] for path in position["files"]) == [
        "2026/01/03/00/part-0.gz",
        "2026/01/03/00/part-1.gz",
    ]
