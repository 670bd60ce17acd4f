"""Every benchmark on a tiny setting, so that none of them rots: it exits 0 and writes its summary where
--results says, with the figures docs/benchmarks.md is generated from. Nothing here checks a figure's
value."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, SMALL_SPLITS

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
            "checksums",
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
        | {"candidates_per_s_over_bare_batched", "precision"},
    ),
    "serve_swap": (
        ["--config", SMALL, "--candidates", "4", "--clients", "2", "--steady-s", "2", "--swaps", "2"]
        + ["--threads", "1"],
        {"threads", "steady", "during_swaps", "p99_during_swaps_over_steady", "failed_requests", "swaps"}
        | {"swap_window_s_median", "server_rss_mib_one_version", "server_peak_rss_mib"},
    ),
    "onnx_forward": (
        ["--config", SMALL, "--candidates", "4", "--threads", "1", "--rounds", "2"],
        {"parameters", "forward", "precision"},
    ),
    "freshness": (
        ["--arrivals", "3", "--validation-examples", "200", "--every-steps", "2", "--poll-seconds", "0.5"],
        {"freshness_seconds", "landed_to_trained_seconds", "trained_to_published_seconds"}
        | {"published_to_served_seconds", "promotion_seconds", "promotions", "records", "load_average_1min"},
    ),
    "follow_latency": (  # the folders source: the Kafka one needs a broker
        ["--source", "folders", "--arrivals", "3", "--interval", "0.2", "--batch", "2", "--poll", "0.2"],
        {"folders_seconds"},
    ),
    "embedding_scale": (
        ["--config", SMALL, "--rows", "1000", "--steps", "2", "--batch", "16"],
        {"threads_per_rank", "ranks"}
        | {f"1,000 rows, {mode}" for mode in ("replicated", "sharded", "sharded over replicated")},
    ),
    # Without CUDA it measures nothing and writes nothing.
    "gpu_train": (["--config", SMALL, "--batch", "8", "--steps", "2"], {"gpu", "batch 8"}),
}


# The same benches in another mode: (bench, arguments, the keys of its figures)
MODES = {
    "model_step --precision bf16": (
        "model_step",
        [*BENCHES["model_step"][0], "--precision", "bf16"],
        BENCHES["model_step"][1] | {"bf16_over_fp32"},
    ),
}


@pytest.mark.parametrize("name", list(BENCHES))
def test_bench_runs_and_writes_its_summary(name, tmp_path):
    _run_bench(name, *BENCHES[name], tmp_path)


@pytest.mark.parametrize("mode", list(MODES))
def test_bench_in_another_mode_runs_and_writes_its_summary(mode, tmp_path):
    _run_bench(*MODES[mode], tmp_path)


def test_precision_quality_runs_and_writes_its_summary(small_data, tmp_path):
    sets = [f"train_data.inputs={small_data}/train/*.gz"]
    sets += [f"validation_data.{s}.inputs={small_data}/{s}/*.gz" for s in SMALL_SPLITS]
    arguments = ["--config", SMALL, *(a for value in sets for a in ("--set", value))]
    _run_bench("precision_quality", arguments, {"split", "examples", "tasks", "against_fp32"}, tmp_path)


def _run_bench(name: str, arguments: list[str], figures: set[str], tmp_path) -> None:
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
    assert summary["machine"].keys() == {"cpu", "cpu_flags", "cpus", "torch", "python"}
    assert summary["machine"]["torch"] == torch.__version__
    assert "results" not in summary["arguments"] and summary["arguments"]  # the settings, not the output
    assert summary["figures"].keys() == figures


def test_multitask_bench_trains_compares_and_writes_its_summary(small_data, tmp_path):
    """On the 4,000 rows of small_data, a few steps: its own runs and stats file under --runs."""
    data = [f"train_data.inputs={small_data}/train/*.gz"]
    data += [
        f"validation_data.{s}.inputs={small_data}/{s}/*.gz" for s in ("validation", "validation_downsampled")
    ]
    arguments = ["--config", SMALL, "--seeds", "0", "--variants", "mmoe", "piecewise_linear"]
    arguments += ["--runs", str(tmp_path / "runs"), "--resamples", "100", "--baseline-rows", "2000"]
    arguments += [
        f"--set={o}" for o in [*data, "training.num_train_steps=3", "training.checkpoint_every_n=3"]
    ]
    results = tmp_path / "multitask.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "multitask.py"), *arguments, "--results", str(results)],
        capture_output=True,
        text=True,
        env=env | {"OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads(results.read_text())
    assert summary["bench"] == "multitask"
    assert summary["figures"].keys() == {
        "seeds",
        "logistic_regression_rce",
        "rce_mean_over_seeds",
        "rce_lowest_seed",
        "runs_below_logistic_regression",
        "seeds_better_worse_than_shipped",
        "rce_minus_shipped_by_seed",
    }
    assert summary["figures"]["rce_mean_over_seeds"].keys() == {"shipped", "mmoe", "piecewise_linear"}
    assert (tmp_path / "runs" / "stats_16_bins.json").is_file()


def test_numeric_wide_bench_measures_each_world_in_its_own_runs_folder(small_data, tmp_path):
    """Both variants on one world (small_data's 4,000 rows, a few steps): the multitask figures under the
    world's name, its runs under --runs/NAME, beside the other worlds the results file already held."""
    arguments = ["--config", SMALL, "--seeds", "0", "--world", f"tiny={small_data}"]
    arguments += ["--runs", str(tmp_path / "runs"), "--resamples", "100", "--baseline-rows", "2000"]
    arguments += [f"--set={o}" for o in ["training.num_train_steps=3", "training.checkpoint_every_n=3"]]
    results = tmp_path / "numeric_wide.json"
    earlier = {"worlds": {"other": "/data/other", "tiny": "/data/old"}, "other": {"seeds": 3}, "tiny": {}}
    results.write_text(json.dumps({"bench": "numeric_wide", "figures": earlier}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "numeric_wide.py"), *arguments, "--results", str(results)],
        capture_output=True,
        text=True,
        env=env | {"OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads(results.read_text())
    assert summary["bench"] == "numeric_wide"
    assert summary["figures"].keys() == {"worlds", "tiny", "other"}
    assert summary["figures"]["worlds"] == {"other": "/data/other", "tiny": str(small_data)}
    assert summary["figures"]["other"] == {"seeds": 3}
    tiny = summary["figures"]["tiny"]
    assert tiny["rce_mean_over_seeds"].keys() == {"shipped", "periodic", "wide"}
    assert tiny["rce_minus_shipped_by_seed"].keys() == {"periodic", "wide"}
    assert {p.name for p in (tmp_path / "runs" / "tiny").iterdir()} == {
        "shipped_s0",
        "periodic_s0",
        "wide_s0",
    }
