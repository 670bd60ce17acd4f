"""Throughput of each data source on the same rows, side by side in one run: local TFRecord (gzip) against
local Parquet (pyarrow's defaults: snappy, dictionary pages), both read by RecapDataset as
configs/local_prod.yaml reads its training data (files interleaved, shuffle buffer 1024, batches of 128,
truncate to 2117/59, torch tensors out).

Writes seed-schema data with bench/data_throughput.py's writer, converts it to Parquet with `heavyranker
data convert` (a row group per 1024 rows), then measures each source with one reader and one decoder thread,
and with the default parallelism, alternating the sources every round, best of --rounds. Prints the CPU and
the arguments, examples per CPU-second (CPU time of the whole process, all threads) and per wall second,
and Parquet / TFRecord per CPU-second. Aim: Parquet >= 1.0x (it needs no protobuf decoding, and reads only
the columns the config wants). The summary goes to bench/results/source_throughput.json (--results).

    .venv/bin/python bench/source_throughput.py [--examples 20000] [--files 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from data_throughput import CONFIG, pipeline, write_data  # noqa: E402
from results import add_results_option, machine, write_results  # noqa: E402

from heavyranker.config import load_config  # noqa: E402
from heavyranker.data.convert import convert_files  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="measure each this many times, keep the best")
    parser.add_argument("--warmup", type=int, default=16, help="batches read before measuring")
    add_results_option(parser, "source_throughput")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    about = machine()
    print(f"cpu: {about['cpu']}, {about['cpus']} CPUs; arguments: {vars(args)}")

    with tempfile.TemporaryDirectory(prefix="heavyranker-bench-") as folder:
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
        runs = {}
        for kind, data in (("tfrecord", tfrecord), ("parquet", parquet)):
            single = data.model_copy(update={"map_num_parallel_calls": 1, "interleave_num_parallel_calls": 1})
            runs[f"{kind}, 1 reader + 1 decoder"] = single
            runs[f"{kind}, default parallelism"] = data
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.rounds):  # alternating, so that every source sees the same machine load
            for name, data in runs.items():
                examples, wall, cpu = pipeline(data, args.examples, args.warmup)
                per_cpu, per_wall = examples / cpu, examples / wall
                if name not in best or per_cpu > best[name][0]:
                    best[name] = (per_cpu, per_wall)

    for name, (per_cpu, per_wall) in best.items():
        print(f"{name:34s} {per_cpu:9,.0f} examples/CPU-s {per_wall:9,.0f} examples/s wall")
    ratios = {
        reading: best[f"parquet, {reading}"][0] / best[f"tfrecord, {reading}"][0]
        for reading in ("1 reader + 1 decoder", "default parallelism")
    }
    print("Parquet / TFRecord, per CPU-second: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    figures = {
        "examples_per_cpu_second": {name: round(v[0]) for name, v in best.items()},
        "examples_per_wall_second": {name: round(v[1]) for name, v in best.items()},
        "parquet_over_tfrecord_per_cpu_second": {k: round(v, 3) for k, v in ratios.items()},
        "kib_per_example": {k: round(v, 2) for k, v in sizes.items()},
    }
    write_results("source_throughput", figures, args)


if __name__ == "__main__":
    main()
