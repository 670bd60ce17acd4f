"""Throughput of the data pipeline, against the floor under any reader: inflating the same files.

Writes seed-schema data (configs/segdense.json: 6000 continuous, 512 binary, 320 discrete, 3x200 embedding
values; rows like the reference's random data: uniform floats, small integers, 63-bit ids, about 24 KB per
example gzipped) to a temporary folder, then measures in the same run:

  pipeline  RecapDataset as configs/local_prod.yaml reads its training data: files interleaved, shuffle
            buffer 1024, batches of 128, read + inflate + CRC + decode + truncate to 2117/59 + torch;
            once with one reader and one decoder thread, once with the default parallelism
  inflate   only inflating the same files with isal (streamed, as the reader does)

and prints examples per CPU-second (CPU time of the whole process, all threads: steadier than wall time on
a shared machine), examples/s wall, and the ratio pipeline / inflate per CPU-second. Best of --rounds.
The summary goes to bench/results/data_throughput.json (--results).

    .venv/bin/python bench/data_throughput.py [--examples 20000] [--files 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from isal import igzip

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from results import add_results_option, write_results  # noqa: E402

from heavyranker.config import load_config  # noqa: E402
from heavyranker.data.dataset import RecapDataset  # noqa: E402
from heavyranker.data.tf_example import encode_example  # noqa: E402
from heavyranker.data.tfrecord import write_records  # noqa: E402
from heavyranker.schema import load_schema  # noqa: E402

CONFIG = REPO / "configs" / "local_prod.yaml"


def write_data(folder: str, examples: int, files: int, distinct: int = 2000, seed: int = 0) -> None:
    """`examples` rows in `files` files. Encoding a row costs milliseconds, so `distinct` rows are made and
    reused in a different order in each file: a row repeats far beyond gzip's 32 KiB window, so the files
    cost as much to inflate and decode as if every row were new."""
    specs = load_schema(str(REPO / "configs" / "segdense.json"))
    rng = np.random.default_rng(seed)
    distinct = min(distinct, examples)
    columns = {
        name: _random_column(name, spec.dtype, distinct, spec.length, rng) for name, spec in specs.items()
    }
    rows = [encode_example({name: values[i] for name, values in columns.items()}) for i in range(distinct)]
    for f in range(files):
        n = examples // files + (f < examples % files)
        order = rng.integers(0, distinct, n)
        write_records(os.path.join(folder, f"part-{f:05d}.gz"), (rows[i] for i in order))


def _random_column(name: str, dtype: str, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    if dtype == "float_list":
        return rng.random((n, length), dtype=np.float32)
    if name.startswith("meta."):
        return rng.integers(0, 2**63 - 1, (n, length))
    if name.startswith("recap.engagement."):
        return (rng.random((n, length)) < 0.1).astype(np.int64)
    return rng.integers(0, 10, (n, length))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def inflate_only(paths: list[str], examples: int) -> tuple[int, float, float]:
    """(examples, wall seconds, CPU seconds) of inflating every file, which holds `examples` in all."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    for path in paths:
        with igzip.open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    return examples, time.perf_counter() - wall, cpu_seconds() - cpu


def pipeline(data, examples: int, warmup: int) -> tuple[int, float, float]:
    """Reads `warmup` batches (filling the shuffle buffer and the prefetch queues), then `examples` more,
    which are measured: the steady state of a long training run."""
    dataset = RecapDataset(data, seed=0, training=True)
    batches = iter(dataset)
    for _ in range(warmup):
        next(batches)
    seen = 0
    wall, cpu = time.perf_counter(), cpu_seconds()
    while seen < examples:
        seen += len(next(batches))
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    dataset.close()
    return seen, wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="measure each this many times, keep the best")
    parser.add_argument("--warmup", type=int, default=16, help="batches read before measuring")
    add_results_option(parser, "data_throughput")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="heavyranker-bench-") as folder:
        t = time.perf_counter()
        write_data(folder, args.examples, args.files)
        paths = sorted(glob.glob(os.path.join(folder, "*.gz")))
        size = sum(os.path.getsize(p) for p in paths)
        per_example = size / args.examples / 1024
        print(
            f"data: {args.examples} examples in {len(paths)} files, {per_example:.1f} KiB/example gzipped "
            f"(written in {time.perf_counter() - t:.0f} s); {len(os.sched_getaffinity(0))} CPUs"
        )

        data = load_config(CONFIG).train_data.model_copy(update={"inputs": os.path.join(folder, "*.gz")})
        single = data.model_copy(update={"map_num_parallel_calls": 1, "interleave_num_parallel_calls": 1})
        runs = {
            "inflate only (isal)": lambda: inflate_only(paths, args.examples),
            "pipeline, 1 reader + 1 decoder": lambda: pipeline(single, args.examples, args.warmup),
            "pipeline, default parallelism": lambda: pipeline(data, args.examples, args.warmup),
        }
        best: dict[str, tuple[float, float]] = {}  # name -> (examples per CPU-second, examples/s wall)
        for _ in range(args.rounds):
            for name, work in runs.items():
                n, wall, cpu = work()
                per_cpu, per_wall = best.get(name, (0.0, 0.0))
                best[name] = (max(per_cpu, n / cpu), max(per_wall, n / wall))

    for name, (per_cpu, per_wall) in best.items():
        print(f"{name:34s} {per_cpu:9,.0f} examples/CPU-s {per_wall:9,.0f} examples/s wall")
    floor = best["inflate only (isal)"][0]
    ratios = {name.removeprefix("pipeline, "): best[name][0] / floor for name in list(runs)[1:]}
    print(
        "pipeline / inflate-only, per CPU-second: "
        + ", ".join(f"{name} {ratio:.2f}" for name, ratio in ratios.items())
    )
    figures = {
        "kib_per_example_gzipped": per_example,
        "examples_per_cpu_s": {name: per_cpu for name, (per_cpu, _) in best.items()},
        "examples_per_s_wall": {name: per_wall for name, (_, per_wall) in best.items()},
        "pipeline_over_inflate_per_cpu_s": ratios,
    }
    write_results("data_throughput", figures, args)


if __name__ == "__main__":
    main()
