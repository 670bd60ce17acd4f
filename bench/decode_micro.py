"""Reading and decoding speed on seed-schema records, in examples per CPU-second, against inflate alone.

    .venv/bin/python bench/decode_micro.py [--examples 2000] [--batch 128] [--rounds 3]

Writes one GZIP TFRecord file of realistic seed-schema rows (6000 continuous, 512 binary, 320 discrete,
3x200 embedding floats, 13 labels, 3 ids; about 22 KB gzipped each) under /tmp, then times each stage in
rounds that alternate the stages, so that all see the same machine load; process CPU time, best round:
  inflate   ISA-L inflate of the file alone, 64 KiB at a time: the floor under any reader
  read      read_records: inflate, framing and both CRC32C checks
  decode    ExampleDecoder.decode_batch of every feature, records already in memory: with the compiled
            fast path (data/tf_example/_wire.c) and with the pure-Python parser it replaces
  pipeline  read_records, then decode_batch every --batch records
Prints examples per CPU-second, microseconds and minor page faults per example, and pipeline / inflate;
the summary goes to bench/results/decode_micro.json (--results).

Each stage runs under two malloc settings (mallopt mmap / trim thresholds). glibc starts at 128 KiB /
128 KiB: every larger block is mmapped, and page-faulted in again when the next batch reuses the memory
(glibc raises the mmap threshold to the largest block freed, yet a block of that very size, as every
batch's is, is still mmapped). On this machine (a VM) a fault costs about 3 us per 4 KiB page: a batch's
arrays fault more than decoding costs. "raised" (32 MiB / 256 MiB) keeps such blocks in the heap, as the
process that reads data should.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from isal import igzip
from results import add_results_option, write_results

from heavyranker.data.sources.tfrecord import read_records, write_records
from heavyranker.data.tf_example import ExampleDecoder, encode_example
from heavyranker.data.tf_example import decode as decoder_module
from heavyranker.schema import load_schema

REPO = Path(__file__).resolve().parents[1]


def seed_like_row(specs, rng: np.random.Generator) -> dict[str, np.ndarray]:
    row = {}
    for name, spec in specs.items():
        n = spec.length
        if "cont" in name:  # heavy-tailed non-negative, many zeros, some whole counts
            values = rng.lognormal(0.0, 2.0, n) * (rng.random(n) < 0.8)
            row[name] = np.where(rng.random(n) < 0.1, np.round(values), values).astype(np.float32)
        elif "binary" in name:
            row[name] = (rng.random(n) < 0.1).astype(np.int64)
        elif "discrete" in name:  # small categories, a few large values
            row[name] = np.where(rng.random(n) < 0.03, rng.integers(1000, 10**9, n), rng.integers(0, 50, n))
        elif name.startswith("meta."):
            row[name] = rng.integers(0, 2**62, n)
        elif spec.dtype == "float_list":
            row[name] = rng.normal(0.0, 0.1, n).astype(np.float32)
        else:
            row[name] = (rng.random(n) < 0.1).astype(np.int64)
    return row


MALLOC = {"128 KiB": (128 << 10, 128 << 10), "raised": (32 << 20, 256 << 20)}  # mmap, trim thresholds


def set_malloc(mmap_threshold: int, trim_threshold: int) -> None:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if not (mallopt(M_MMAP_THRESHOLD, mmap_threshold) and mallopt(M_TRIM_THRESHOLD, trim_threshold)):
        raise SystemExit("mallopt refused the thresholds")


def measure(stage) -> tuple[float, float]:
    """CPU seconds and minor page faults per example."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.process_time()
    count = stage()
    seconds = time.process_time() - start
    return seconds / count, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--schema", default=str(REPO / "configs" / "segdense.json"))
    add_results_option(parser, "decode_micro")
    args = parser.parse_args()

    specs = load_schema(args.schema)
    rng = np.random.default_rng(0)
    records = [encode_example(seed_like_row(specs, rng)) for _ in range(args.examples)]
    folder = tempfile.mkdtemp(prefix="decode_micro_")
    path = os.path.join(folder, "part-0.gz")
    write_records(path, records)
    print(
        f"{args.examples} records, {sum(map(len, records)) / len(records) / 1e3:.1f} KB each, "
        f"{os.path.getsize(path) / len(records) / 1e3:.1f} KB gzipped; compiled fast path "
        f"{'built' if decoder_module._wire is not None else 'NOT BUILT'}; batches of {args.batch}"
    )

    fast = ExampleDecoder(specs, specs)
    built, decoder_module._wire = decoder_module._wire, None
    python = ExampleDecoder(specs, specs)  # the general parser for every record
    decoder_module._wire = built

    def inflate() -> int:
        with igzip.open(path, "rb") as f:
            while f.read(1 << 16):  # 64 KiB at a time: larger reads page-fault under glibc's defaults
                pass
        return len(records)

    def read() -> int:
        return sum(1 for _ in read_records(path))

    def decode(decoder: ExampleDecoder, sample: list[bytes]):
        def run() -> int:
            for i in range(0, len(sample), args.batch):
                decoder.decode_batch(sample[i : i + args.batch])
            return len(sample)

        return run

    def pipeline() -> int:
        batch, count = [], 0
        for record in read_records(path):
            batch.append(record)
            if len(batch) == args.batch:
                count += len(fast.decode_batch(batch)["meta.user_id"])
                batch = []
        return count + (len(fast.decode_batch(batch)["meta.user_id"]) if batch else 0)

    stages = {
        "inflate": inflate,
        "read": read,
        "decode (compiled)": decode(fast, records),
        "decode (python)": decode(python, records[: 4 * args.batch]),
        "pipeline": pipeline,
    }
    if built is None:
        del stages["decode (compiled)"]
    times: dict[tuple[str, str], list] = {(m, s): [] for m in MALLOC for s in stages}
    for _ in range(args.rounds):
        for setting, thresholds in MALLOC.items():
            set_malloc(*thresholds)
            for name, stage in stages.items():
                times[setting, name].append(measure(stage))
    best = {key: min(values) for key, values in times.items()}
    os.remove(path)
    os.rmdir(folder)
    per_stage = {
        setting: {
            name: {
                "examples_per_cpu_s": 1 / best[setting, name][0],
                "us": best[setting, name][0] * 1e6,
                "minor_faults": best[setting, name][1],
            }
            for name in stages
        }
        for setting in MALLOC
    }
    summary = {}
    for setting in MALLOC:
        inflate_s, read_s, pipe_s = (best[setting, name][0] for name in ("inflate", "read", "pipeline"))
        summary[setting] = {
            "pipeline_over_inflate": inflate_s / pipe_s,
            "framing_and_crc_us": (read_s - inflate_s) * 1e6,
            "decoding_us": (pipe_s - read_s) * 1e6,
        }

    print(f"{'':18s}" + "".join(f"{setting + ' malloc':>42s}" for setting in MALLOC))
    for name in stages:
        cells = [
            f"{s['examples_per_cpu_s']:10,.0f} ex/CPU-s {s['us']:6.1f} us {s['minor_faults']:5.1f} faults"
            for s in (per_stage[setting][name] for setting in MALLOC)
        ]
        print(f"{name:18s}" + "".join(cells))
    print(
        "summary (us per example):",
        "; ".join(
            f"{setting} malloc: pipeline/inflate {s['pipeline_over_inflate']:.2f}, framing+CRC "
            f"{s['framing_and_crc_us']:.1f} us, decoding {s['decoding_us']:.1f} us"
            for setting, s in summary.items()
        ),
    )
    figures = {"compiled_fast_path": built is not None, "stages": per_stage, "summary": summary}
    write_results("decode_micro", figures, args)


if __name__ == "__main__":
    main()
