"""Every benchmark on a tiny setting, so that none of them rots: it exits 0 and writes its summary where
--results says, with the figures docs/benchmarks.md is generated from. Nothing here checks a figure's
value."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

SMALL = str(REPO / "configs" / "local_small.yaml")
# bench -> (arguments for a run of a few seconds, the keys of its figures)
BENCHES = {
    "data_throughput": (
        ["--examples", "128", "--files", "2", "--rounds", "1", "--warmup", "1", "--s3-block-mib", "1"],
        {
            "kib_per_example_gzipped",
            "examples_per_cpu_s",
            "examples_per_s_wall",
            "pipeline_over_inflate_per_cpu_s",
            "cache_over_gzip_per_cpu_s",
            "cache_kib_per_example",
            "cache_verified_over_unverified_per_cpu_s",
            "crc32c",
            "s3_over_local",
            "s3_over_local_by_block_mib",
            "gil_share",
            "pipeline_examples_per_s_wall_by_readers",
            "pipeline_by_readers_over_1",
            "cache_building_examples_per_s_wall",
            "cache_building_over_1_worker",
        },
    ),
    "decode_micro": (
        ["--examples", "16", "--batch", "8", "--rounds", "1"],
        {"compiled_fast_path", "stages", "summary"},
    ),
    "model_step": (
        ["--config", SMALL, "--batch", "8", "--inference-batch", "8", "--rounds", "1", "--threads", "1"]
        + ["--matmul-size", "64"],
        {"parameters", "training_mflop_per_example", "threads", "large_matmul_gflops", "train", "ceiling"}
        | {"inference"},
    ),
    "train_throughput": (
        ["--config", SMALL, "--steps", "1", "--rounds", "1", "--examples", "256"],
        {"threads", "examples_per_s", "examples_per_s_rounds", "peak_rss_mib", "streamed_over_in_memory"}
        | {"streamed_over_in_memory_rounds"},
    ),
    "serve_latency": (
        [
            "--config",
            SMALL,
            "--candidates",
            "2,4",
            "--concurrency",
            "1,3",
            "--requests",
            "2",
            "--threads",
            "1",
        ],
        {"threads", "request_mb", "bare forward", "served", "p50_over_bare_forward"}
        | {"candidates_per_s_over_bare_batched"},
    ),
    "serve_swap": (
        ["--config", SMALL, "--candidates", "4", "--clients", "2", "--steady-s", "2", "--swaps", "2"]
        + ["--threads", "1"],
        {"threads", "steady", "during_swaps", "p99_during_swaps_over_steady", "failed_requests", "swaps"}
        | {"swap_window_s_median", "server_rss_mib_one_version", "server_peak_rss_mib"},
    ),
    "onnx_forward": (
        ["--config", SMALL, "--candidates", "4", "--threads", "1", "--rounds", "2"],
        {"parameters", "forward"},
    ),
    "embedding_scale": (
        ["--config", SMALL, "--rows", "1000", "--steps", "2", "--batch", "16"],
        {"threads_per_rank", "ranks"}
        | {f"1,000 rows, {mode}" for mode in ("replicated", "sharded", "sharded over replicated")},
    ),
    # Without CUDA it measures nothing and writes nothing.
    "gpu_train": (["--config", SMALL, "--batch", "8", "--steps", "2"], {"gpu", "batch 8"}),
}


@pytest.mark.parametrize("name", list(BENCHES))
def test_bench_runs_and_writes_its_summary(name, tmp_path):
    arguments, figures = BENCHES[name]
    results = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / f"{name}.py"), *arguments, "--results", str(results)],
        capture_output=True,
        text=True,
        env=env | {"OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
        timeout=600,  # a hang fails rather than stalls the suite
    )
    assert run.returncode == 0, run.stdout + run.stderr
    if name == "gpu_train" and not torch.cuda.is_available():
        assert not results.exists()
        return
    assert f"results: {results}" in run.stdout
    summary = json.loads(results.read_text())
    assert summary.keys() == {"bench", "date", "machine", "arguments", "figures"}
    assert summary["bench"] == name
    assert summary["machine"].keys() == {"cpu", "cpus", "torch", "python"}
    assert summary["machine"]["torch"] == torch.__version__
    assert "results" not in summary["arguments"] and summary["arguments"]  # the settings, not the output
    assert summary["figures"].keys() == figures
