"""Throughput of the data pipeline, against the floor under any reader: inflating the same files.

Writes seed-schema data (configs/segdense.json: 6000 continuous, 512 binary, 320 discrete, 3x200 embedding
values; rows like the reference's random data: uniform floats, small integers, 63-bit ids, but 0/1 flags as
binary features are; about 24 KB per example gzipped) to a temporary folder, then measures in the same run:

  pipeline  RecapDataset as configs/local_prod.yaml reads its training data: files interleaved, shuffle
            buffer 1024, batches of 128, read + inflate + CRC + decode + truncate to 2117/59 + torch;
            once with one reader and one decoder thread, once with the default parallelism
  inflate   only inflating the same files with isal (streamed, as the reader does)
  cache     the same pipeline reading the decoded cache (`cache: true`), built beforehand
  verify    the cache's first epoch from a new dataset, no warmup: every entry is mapped, and so its
            crc32 checksums and labels verified, within the measured time (as every epoch does for a
            split of more than 64 files; the steady state above maps its 8 entries during the warmup).
            Once as it reads, once with the verification left out: their ratio is what it costs
  s3        the gzip pipeline reading the same files as s3:// URLs from moto's S3 server, run in another
            process on loopback (its CPU is not counted), with the default block size and each of
            --s3-block-mib

and prints examples per CPU-second (CPU time of the whole process, all threads: steadier than wall time on
a shared machine), examples/s wall, and the ratios pipeline / inflate, cache / gzip, verified / unverified
cache and s3 / local, with the CPU's model, its flags that the checksums use, and on one core the speed of the
cache's crc32 (ISA-L) and of the crc32c that TFRecord framing uses.
Then three scaling measurements:

  gil       the share of reading (inflate + CRC + framing) and of decoding that holds the GIL: each done
            by 1 thread and by 2 threads (half the files each); with 2 free cores, wall(2) / wall(1) =
            (1 + f) / 2 for a share f held
  readers   the gzip pipeline with 1, 2, ... reading threads up to the CPUs (decoding threads: a quarter
            of that, at least 1, as by default): examples/s wall, as a ratio to 1 reader
  building  building the cache (one file per worker process) with 1, 2, ... workers up to the CPUs:
            examples/s wall, as a ratio to 1 worker

Best of --rounds. The summary goes to bench/results/data_throughput.json (--results).

    .venv/bin/python bench/data_throughput.py [--examples 20000] [--files 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import crc32c
import numpy as np
from isal import igzip

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from results import add_results_option, machine, write_results  # noqa: E402

from heavyranker.config import load_config  # noqa: E402
from heavyranker.data import storage  # noqa: E402
from heavyranker.data.cache import DecodedCache  # noqa: E402
from heavyranker.data.cache_entry import Entry  # noqa: E402
from heavyranker.data.cache_files import checksum  # noqa: E402
from heavyranker.data.dataset import RecapDataset  # noqa: E402
from heavyranker.data.sources.tfrecord import read_records, write_records  # noqa: E402
from heavyranker.data.tf_example import ExampleDecoder, encode_example  # noqa: E402
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
    if name.startswith("recap.engagement.") or "_binary_" in name:  # labels and flags: 0 or 1
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
    with RecapDataset(data, seed=0, shuffle=True, repeat=True, drop_last=True) as dataset:
        batches = iter(dataset)
        for _ in range(warmup):
            next(batches)
        seen = 0
        wall, cpu = time.perf_counter(), cpu_seconds()
        while seen < examples:
            seen += len(next(batches))
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return seen, wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="measure each this many times, keep the best")
    parser.add_argument("--warmup", type=int, default=16, help="batches read before measuring")
    parser.add_argument(
        "--s3-block-mib", type=int, nargs="*", default=[], help="also measure s3 with these block sizes"
    )
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
        cached = data.model_copy(update={"cache": True, "cache_dir": os.path.join(folder, "cache")})
        list(RecapDataset(cached))  # builds the cache, outside the measurements
        cache_files = Path(cached.cache_dir).rglob("*")
        cache_size = sum(f.stat().st_size for f in cache_files if f.is_file()) / args.examples / 1024
        print(f"decoded cache: {cache_size:.1f} KiB/example")
        crc = checksum_speed()
        print(
            f"CPU: {machine()['cpu']}; flags: {' '.join(crc['cpu_flags'])}; on one core, the cache's crc32: "
            f"{crc['crc32_gb_per_s']:.1f} GB/s, crc32c: {crc['crc32c_gb_per_s']:.1f} GB/s"
        )
        with s3_copy(folder, paths) as bucket:
            s3 = data.model_copy(update={"inputs": f"{bucket}/*.gz"})
            runs = {
                "inflate only (isal)": lambda: inflate_only(paths, args.examples),
                "pipeline, 1 reader + 1 decoder": lambda: pipeline(single, args.examples, args.warmup),
                "pipeline, default parallelism": lambda: pipeline(data, args.examples, args.warmup),
                "cache, default parallelism": lambda: pipeline(cached, args.examples, args.warmup),
                "cache, first epoch, verified": lambda: pipeline(cached, args.examples, 0),
                "cache, first epoch, not verified": lambda: unverified(cached, args.examples, 0),
                "s3 loopback, default parallelism": lambda: pipeline(s3, args.examples, args.warmup),
            }
            for mib in args.s3_block_mib:
                runs[f"s3 loopback, {mib} MiB blocks"] = functools.partial(s3_blocks, s3, mib, args)
            cpus = len(os.sched_getaffinity(0))
            for readers in range(2, cpus):  # 1: "1 reader + 1 decoder"; all CPUs: the default parallelism
                threads = data.model_copy(
                    update={
                        "interleave_num_parallel_calls": readers,
                        "map_num_parallel_calls": max(1, readers // 4),
                    }
                )
                runs[f"pipeline, {readers} readers"] = functools.partial(
                    pipeline, threads, args.examples, args.warmup
                )
            best = best_of(runs, args.rounds)
        records = [record for path in paths for record in read_records(path)]
        gil = {"read": gil_share(read_all, paths), "decode": gil_share(decode_all, records)}
        del records
        building = build_scaling(data, paths, folder, args.examples)

    for name, (per_cpu, per_wall) in best.items():
        print(f"{name:34s} {per_cpu:9,.0f} examples/CPU-s {per_wall:9,.0f} examples/s wall")
    floor, gzip = best["inflate only (isal)"][0], best["pipeline, default parallelism"]
    ratios = {name.removeprefix("pipeline, "): best[name][0] / floor for name in list(runs)[1:3]}
    cache = best["cache, default parallelism"][0] / gzip[0]
    verified = best["cache, first epoch, verified"][0] / best["cache, first epoch, not verified"][0]

    def over_gzip(name: str) -> list[float]:  # per CPU-second, per wall-second
        return [best[name][i] / gzip[i] for i in (0, 1)]

    s3_ratio = over_gzip("s3 loopback, default parallelism")
    print(
        "pipeline / inflate-only, per CPU-second: "
        + ", ".join(f"{name} {ratio:.2f}" for name, ratio in ratios.items())
    )
    print(f"cache / gzip, per CPU-second: {cache:.1f}")
    print(f"cache's first epoch, verified / not verified, per CPU-second: {verified:.3f}")
    print(f"s3 / local: {s3_ratio[0]:.2f} per CPU-second, {s3_ratio[1]:.2f} wall")
    by_block = {mib: over_gzip(f"s3 loopback, {mib} MiB blocks") for mib in args.s3_block_mib}
    for mib, (per_cpu, wall) in by_block.items():
        print(f"s3 / local with {mib} MiB blocks: {per_cpu:.2f} per CPU-second, {wall:.2f} wall")
    print("GIL held: " + ", ".join(f"{stage} {share:.2f}" for stage, share in gil.items()))
    readers = {1: best["pipeline, 1 reader + 1 decoder"][1]}
    readers |= {n: best[f"pipeline, {n} readers"][1] for n in range(2, cpus)}
    readers[cpus] = gzip[1]
    print(
        "the pipeline's threads, examples/s wall: "
        + ", ".join(f"{n} readers {rate:,.0f} ({rate / readers[1]:.2f}x)" for n, rate in readers.items())
    )
    one = building[1]
    print(
        "building the cache, examples/s wall: "
        + ", ".join(f"{w} workers {rate:,.0f} ({rate / one:.2f}x)" for w, rate in building.items())
    )
    figures = {
        "kib_per_example_gzipped": per_example,
        "examples_per_cpu_s": {name: per_cpu for name, (per_cpu, _) in best.items()},
        "examples_per_s_wall": {name: per_wall for name, (_, per_wall) in best.items()},
        "pipeline_over_inflate_per_cpu_s": ratios,
        "cache_over_gzip_per_cpu_s": cache,
        "cache_kib_per_example": cache_size,
        "cache_verified_over_unverified_per_cpu_s": verified,
        "checksums": crc,
        "s3_over_local": {"per_cpu_s": s3_ratio[0], "wall": s3_ratio[1]},
        "s3_over_local_by_block_mib": {m: {"per_cpu_s": r[0], "wall": r[1]} for m, r in by_block.items()},
        "gil_share": gil,
        "pipeline_examples_per_s_wall_by_readers": readers,
        "pipeline_by_readers_over_1": {n: rate / readers[1] for n, rate in readers.items()},
        "cache_building_examples_per_s_wall": building,
        "cache_building_over_1_worker": {w: rate / one for w, rate in building.items()},
    }
    write_results("data_throughput", figures, args)


def s3_blocks(s3, mib: int, args: argparse.Namespace) -> tuple[int, float, float]:
    """The s3 pipeline with remote files fetched `mib` MiB at a time (the default restored after)."""
    default = storage.BLOCK_SIZE
    storage.BLOCK_SIZE = mib << 20
    try:
        return pipeline(s3, args.examples, args.warmup)
    finally:
        storage.BLOCK_SIZE = default


def unverified(data, examples: int, warmup: int) -> tuple[int, float, float]:
    """The pipeline with every entry mapped unverified (checksums and labels), as if verified already."""
    load = Entry.load.__func__
    Entry.load = classmethod(lambda cls, folder, verify=True: load(cls, folder, verify=False))
    try:
        return pipeline(data, examples, warmup)
    finally:
        Entry.load = classmethod(load)


def checksum_speed() -> dict:
    """GB/s on one core over 256 MiB (best of 3) of the cache's checksum (crc32, ISA-L) and of crc32c (the
    TFRecord framing's), whether crc32c runs on the CPU's crc32 instruction, and the CPU flags that decide
    their speed."""
    data = np.random.default_rng(0).integers(0, 255, 2**28, dtype=np.uint8)
    crc32 = min(_timed(lambda: checksum(data)) for _ in range(3))
    castagnoli = min(_timed(lambda: crc32c.crc32c(data)) for _ in range(3))
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":")[1].split() for line in f if line.startswith("flags")), [])
    wanted = ("sse4_2", "pclmulqdq", "avx2", "avx512f", "vpclmulqdq")
    return {
        "crc32_gb_per_s": data.nbytes / crc32 / 1e9,
        "crc32c_gb_per_s": data.nbytes / castagnoli / 1e9,
        "crc32c_hardware": crc32c.hardware_based,
        "cpu_flags": [flag for flag in wanted if flag in flags],
    }


def _timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def best_of(runs: dict[str, Callable], rounds: int) -> dict[str, tuple[float, float]]:
    """name -> (examples per CPU-second, examples/s wall), the best of `rounds`, the runs interleaved."""
    best: dict[str, tuple[float, float]] = {}
    for _ in range(rounds):
        for name, work in runs.items():
            n, wall, cpu = work()
            per_cpu, per_wall = best.get(name, (0.0, 0.0))
            best[name] = (max(per_cpu, n / cpu), max(per_wall, n / wall))
    return best


@contextlib.contextmanager
def s3_copy(folder: str, paths: list[str]) -> Iterator[str]:
    """The files in a bucket of moto's S3 server, run in its own process on loopback; yields the bucket's
    URL, with the environment pointing s3fs at the server."""
    log = Path(folder) / "moto.log"
    with open(log, "w") as out:  # a file, not a pipe: nobody drains a pipe of the requests it logs
        # Port 0: the system's free port, bound by the server itself and named in its start line (a port
        # found free here first could be taken by another process before the server binds it).
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"], stdout=out, stderr=out
        )
    try:
        import fsspec

        port = None
        for _ in range(300):  # the server starts in a second or two
            if started := re.search(r"Running on http://127\.0\.0\.1:(\d+)", log.read_text()):
                port = int(started.group(1))
                break
            if server.poll() is not None:
                break
            time.sleep(0.1)
        if port is None:
            raise RuntimeError(f"moto's server did not start: {log.read_text()[-500:]}")
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench"}
        env |= {"AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
        os.environ.update(env)
        fs = fsspec.filesystem("s3")
        fs.mkdir("bench")
        for path in paths:
            fs.put(path, f"bench/{os.path.basename(path)}")
        yield "s3://bench"
    finally:
        server.terminate()
        server.wait()


def read_all(paths: list[str]) -> float:
    """Seconds to read every record of `paths` (inflate, CRC, framing)."""
    start = time.perf_counter()
    for path in paths:
        for _ in read_records(path):
            pass
    return time.perf_counter() - start


def decode_all(records: list[bytes]) -> float:
    """Seconds to decode `records` in batches of 128."""
    specs = load_schema(str(REPO / "configs" / "segdense.json"))
    decoder = ExampleDecoder(specs, specs.keys())
    start = time.perf_counter()
    for first in range(0, len(records), 128):
        decoder.decode_batch(records[first : first + 128], file="bench")
    return time.perf_counter() - start


def gil_share(work: Callable[[list], float], items: list) -> float:
    """The share of `work` that holds the GIL, from its wall time on 1 thread over `items` and on 2 threads
    over half of them each: wall(2) / wall(1) = (1 + f) / 2 on two free cores; clipped to [0, 1]."""

    def timed(parts: list[list]) -> float:
        times: list[float] = []
        threads = [threading.Thread(target=lambda p=p: times.append(work(p))) for p in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return max(times)

    one = min(timed([items]) for _ in range(2))
    two = min(timed([items[::2], items[1::2]]) for _ in range(2))
    return min(1.0, max(0.0, 2 * two / one - 1))


def build_scaling(data, paths: list[str], folder: str, examples: int) -> dict[int, float]:
    """workers -> examples/s wall of building the cache of every file from nothing."""
    rates = {}
    for workers in range(1, len(os.sched_getaffinity(0)) + 1):
        where = os.path.join(folder, f"cache-{workers}")
        config = data.model_copy(update={"cache": True, "cache_dir": where, "cache_workers": workers})
        cache = DecodedCache(config, True, "bench")
        start = time.perf_counter()
        cache.start(paths)
        for path in paths:
            cache.open(path)
        rates[workers] = examples / (time.perf_counter() - start)
        cache.close()
        shutil.rmtree(where)
    return rates


if __name__ == "__main__":
    main()
