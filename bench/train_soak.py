"""Train soak: what a follow run (`train --follow`) holds as the data it has read grows.

State (the stream alone, no training): for each of --days, a tree of that many days of hour folders (and the
next hour, not complete yet) of --files-per-folder empty files, read to its end by the stream of dated folders
(sources/follow.py). Side by side: the checkpoint's data state (torch.save of data_position) as it was kept
before the watermark (every file ever read) and as it is kept now (the files from the watermark's day on);
the seconds of one poll's listing of a running stream, and of a restart's first listing with the old state
(it lists every folder since the first hour) and with the watermark (from its day on); and the seconds of
position() on every step, over every file read and over those past the watermark.

Run: `train --follow` on configs/local_small.yaml (tests/train/kafka_train_run.py) while a writer adds an
hour folder of --files-per-hour files every --interval seconds for --seconds, with a checkpoint every
--checkpoint-every steps (checkpoint_max_to_keep 3, keep_best), an evaluation every 2 checkpoints and a
promotion into a local repository every 4 (keep_versions 2). The trainer's VmRSS, open file descriptors and
threads (/proc) are sampled every 0.5 s; at the end, what the run folder and the repository hold; then a
restart's seconds to its first listening step.

python bench/train_soak.py [--days 1,7,28] [--files-per-folder 100] [--seconds 120] [--interval 1.0]
    [--files-per-hour 4] [--checkpoint-every 5] [--threads 1] [--src SRC]"""

from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
from results import add_results_option, write_results  # noqa: E402

from heavyranker.checkpoint import load_checkpoint  # noqa: E402
from heavyranker.config import load_config  # noqa: E402
from heavyranker.data.synthetic import generate_for_config  # noqa: E402
from heavyranker.run_folder import RunFolder  # noqa: E402
from tests.data.test_follow import hour, hours_config  # noqa: E402
from tests.train import kafka_train_run  # noqa: E402
from tests.train.kafka_train_run import trained_ids  # noqa: E402
from tests.train.test_kafka_training import SRC, listening, wait_for  # noqa: E402

FIRST = datetime(2026, 1, 1)
RECORDS_PER_FILE = 8


def start(log: Path, overrides: list[str], errors: Path, src: Path) -> subprocess.Popen:
    """This file's --child: a run of tests/train/kafka_train_run.py that promotes, importing heavyranker from
    `src`, its log lines into the file `errors` (a pipe nobody reads while it runs would fill and stop it)."""
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, __file__, "--child", str(log), *overrides]
    with open(errors, "a") as stderr:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def child(log: str, overrides: list[str]) -> None:
    """kafka_train_run.main (which logs each step's ids) with training.promote's Promoter, as `train` has."""
    from heavyranker.release.follow import Promoter
    from heavyranker.train import loop

    train = loop.train
    loop.train = lambda config: train(config, on_checkpoint=Promoter(config))
    kafka_train_run.main(log, overrides)


def stop(run: subprocess.Popen, errors: Path) -> None:
    run.send_signal(signal.SIGTERM)
    if run.wait(timeout=300) != 0:
        raise SystemExit(f"the run exited {run.returncode}: {errors.read_text()[-3000:]}")


def seconds(call, repeat: int = 1) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        call()
    return (time.perf_counter() - started) / repeat


def saved_bytes(position: dict | None) -> int:
    buffer = io.BytesIO()
    torch.save({"data_position": position}, buffer)
    return buffer.tell()


def tree(root: Path, days: int, per_folder: int) -> int:
    """days x 24 hour folders of per_folder empty files, and the next hour's folder (not complete yet)."""
    for index in range(days * 24 + 1):
        folder = root / (FIRST + timedelta(hours=index)).strftime("%Y/%m/%d/%H")
        folder.mkdir(parents=True)
        for k in range(per_folder if index < days * 24 else 0):
            (folder / f"part-{k:04d}.gz").touch()
    return days * 24 * per_folder


def read_to_the_end(files: Any, total: int) -> dict[str, int]:
    """The stream's progress (path -> records handed out) once every one of the `total` files is read: an
    empty file stands for one record (state and listing do not depend on what a file holds)."""
    progress: dict[str, int] = {}
    for _, path, index in files.records(lambda path: iter([(None, path, 0)])):
        progress[path] = index + 1
        if len(progress) == total:
            break
    return progress


def state(root: Path, days: int, per_folder: int) -> dict:
    # Imported here: the --child of a run with --src imports that heavyranker, maybe one without these.
    from heavyranker.data.sources.follow import FollowedFiles, checkpoint_position, without_days_before

    total = tree(root, days, per_folder)
    data = hours_config(root, end=FIRST.strftime("%Y-%m-%dT%H")).train_data
    place = {"rank": 0, "world_size": 1, "where": "train_data"}
    files = FollowedFiles(data, resume={}, **place)
    progress = read_to_the_end(files, total)
    everything = files.position(progress)  # what a checkpoint kept before the watermark
    done_before = files.done_before(progress)
    kept = without_days_before(everything, done_before, data)
    old_state = saved_bytes(checkpoint_position(data, everything, True))
    new_state = saved_bytes(checkpoint_position(data, kept, True, done_before))
    old_restart = FollowedFiles(data, resume=everything, **place)
    new_restart = FollowedFiles(data, resume=kept, done_before=done_before, **place)
    kept_progress = without_days_before(progress, done_before, data)
    return {
        "files_read": total,
        "hour_folders": days * 24,
        "state_bytes_every_file": old_state,
        "state_bytes_every_file_per_file": round(old_state / total, 1),
        "state_bytes_past_watermark": new_state,
        "files_past_watermark": len(kept),
        # _new_files is one poll's listing and what it takes of it (nothing new here)
        "poll_seconds_running": seconds(files._new_files, repeat=5),
        "restart_poll_seconds_every_file": seconds(old_restart._new_files),
        "restart_poll_seconds_watermark": seconds(new_restart._new_files),
        "position_ms_per_step_every_file": 1000 * seconds(lambda: files.position(progress), repeat=5),
        "position_ms_per_step_watermark": 1000 * seconds(lambda: files.position(kept_progress), repeat=5),
    }


def sample(pid: int) -> tuple[float, int, int]:
    """VmRSS (MiB), open file descriptors and threads of process `pid`."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def folder_bytes(path: Path) -> tuple[int, int]:
    """Files and bytes under `path`."""
    sizes = [p.stat().st_size for p in path.rglob("*") if p.is_file()] if path.exists() else []
    return len(sizes), sum(sizes)


def run_overrides(work: Path, args: argparse.Namespace) -> list[str]:
    splits = ("validation", "validation_downsampled")
    every = args.checkpoint_every
    dated = f"{{data_root: '{work / 'hours'}', end_datetime: '2026-01-01T00', hours: 1}}"
    promote = f"{{repository: '{work / 'repo'}', model_name: ranker, format: pt2, every_steps: {4 * every}}}"
    return [
        "train_data.inputs=null",
        f"train_data.explicit_datetime_inputs={dated}",
        "train_data.follow_poll_seconds=0.2",
        f"train_data.global_batch_size={RECORDS_PER_FILE * args.files_per_hour}",  # an hour a step
        f"training.save_dir={work / 'run'}",
        "training.follow=true",
        f"training.checkpoint_every_n={every}",
        "training.checkpoint_max_to_keep=3",
        f"training.eval_log_every_n={2 * every}",
        f"training.train_log_every_n={every}",
        "training.num_eval_steps=2",
        "training.keep_best={split: validation}",
        f"training.promote={promote}",
        *(f"validation_data.{s}.inputs={work / 'eval' / s}/*.gz" for s in splits),
        *(f"validation_data.{s}.global_batch_size=64" for s in splits),
    ]


def soak(work: Path, args: argparse.Namespace) -> dict:
    config = load_config(ROOT / "configs" / "local_small.yaml")
    generate_for_config(config, out=str(work / "eval"), examples=512, files=1, seed=0)
    log, overrides, errors = work / "trained.log", run_overrides(work, args), work / "train.err"
    folders = work / "hours"
    written, done = [0], threading.Event()

    def write() -> None:  # an hour folder every --interval seconds; each one step's records
        while not done.is_set():
            when = FIRST + timedelta(hours=written[0] // args.files_per_hour)
            first = written[0] * RECORDS_PER_FILE
            hour(folders, when.strftime("%Y/%m/%d/%H"), first, RECORDS_PER_FILE, args.files_per_hour)
            written[0] += args.files_per_hour
            done.wait(args.interval)

    run = start(log, overrides, errors, args.src or SRC)
    try:
        writer = threading.Thread(target=write)
        writer.start()
        samples = []
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline and run.poll() is None:
            samples.append(sample(run.pid))
            time.sleep(0.5)
        done.set()
        writer.join()
        last = FIRST + timedelta(hours=written[0] // args.files_per_hour)
        (folders / last.strftime("%Y/%m/%d/%H")).mkdir(parents=True)  # the last hour written is complete
        total = written[0] * RECORDS_PER_FILE
        try:
            wait_for(lambda: len(trained_ids(log)) >= total or run.poll() is not None, "the run to catch up")
        except AssertionError as e:
            raise SystemExit(f"{e}: {errors.read_text()[-3000:]}") from None
        samples.append(sample(run.pid))
        stop(run, errors)
        before, started = listening(log), time.monotonic()
        run = start(log, overrides, errors, args.src or SRC)
        wait_for(lambda: listening(log) > before or run.poll() is not None, "the restart")
        restart_seconds = time.monotonic() - started
        stop(run, errors)
    finally:
        if run.poll() is None:
            run.kill()
    return {
        "hours_written": written[0] // args.files_per_hour,
        "files_written": written[0],
        **held(work, args, samples),
        "restart_seconds_to_training": round(restart_seconds, 2),
    }


def held(work: Path, args: argparse.Namespace, samples: list[tuple[float, int, int]]) -> dict:
    """What the run held over time (/proc samples, the first quarter left out of the minimums: start-up)
    and what its run folder and repository hold at its end."""
    folder, repository = RunFolder(work / "run"), work / "repo" / "ranker"
    newest = load_checkpoint(folder.newest_checkpoint())
    quarter = max(1, len(samples) // 4)
    return {
        "steps": int(newest["step"]),
        "checkpoints_written": int(newest["step"]) // args.checkpoint_every,
        "rss_mib_by_quarter": [round(s[0], 1) for s in samples[quarter - 1 :: quarter]],
        "fds_min_max": [min(s[1] for s in samples[quarter:]), max(s[1] for s in samples)],
        "threads_min_max": [min(s[2] for s in samples[quarter:]), max(s[2] for s in samples)],
        "checkpoint_files_entries": len(newest["data_position"]["files"]),
        "checkpoint_data_state_bytes": saved_bytes(newest["data_position"]),
        "checkpoints_kept": len(folder.list_checkpoints()),
        "metrics_jsonl_lines": len(folder.metrics.read_text().splitlines()),
        "metrics_jsonl_bytes": folder.metrics.stat().st_size,
        "tensorboard_files_bytes": list(folder_bytes(folder.tensorboard)),
        "eval_files_bytes": list(folder_bytes(folder.evaluations)),
        "repository_versions": len([p for p in repository.iterdir() if p.name.isdigit()]),
        "promotions_jsonl_lines": len((repository / "promotions.jsonl").read_text().splitlines()),
    }


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--days", default="1,7,28", help="days of hour folders, comma-separated")
    parser.add_argument("--files-per-folder", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=120.0, help="how long the writer writes (run)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between hour folders (run)")
    parser.add_argument("--files-per-hour", type=int, default=4)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    parser.add_argument(
        "--src",
        type=Path,
        default=None,
        help="the heavyranker sources the run imports (a base commit's: before)",
    )
    add_results_option(parser, "train_soak")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    figures: dict = {"state": {}}
    with tempfile.TemporaryDirectory(prefix="train_soak_") as work:
        for days in (int(d) for d in args.days.split(",")):
            figures["state"][f"{days} days"] = found = state(
                Path(work) / f"tree{days}", days, args.files_per_folder
            )
            print(f"{days} days: {found}")
        figures["run"] = soak(Path(work) / "soak", args)
        print(f"run: {figures['run']}")
    write_results("train_soak", figures, args)


if __name__ == "__main__":
    main()
