"""Training and evaluation on 2 CPU processes (gloo) against one process on the same examples, on a tiny
model and tiny files made here. The ranks run as torchrun's workers do: processes with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set, calling the library (forked from a server that imported it
once, to keep the tests fast); one test runs the real `heavyranker train --nproc 2` (torchrun).

Why 2 ranks and one process see the same examples: no shuffle buffer, 2 training files of which rank r
reads file r in batches of 4, while one process interleaves both files in blocks of 4 in batches of 8, so
its batch k is the union of the ranks' batches k. Files hold 64 examples each, enough for every run here."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml

from heavyranker.checkpoint import load_checkpoint
from heavyranker.config import load_config
from heavyranker.data.columns import feature_specs
from heavyranker.data.sources.files import check_sharding
from heavyranker.data.sources.tfrecord import write_records
from heavyranker.data.tf_example import encode_example
from heavyranker.errors import UserError
from heavyranker.eval.evaluator import evaluate_command
from heavyranker.model import build_model
from heavyranker.run_folder import RunFolder
from heavyranker.train.loop import train

SCHEMA = [
    ("cont", "float_list", 6),
    ("bin", "int64_list", 3),
    ("disc", "int64_list", 2),
    ("label_a", "int64_list", 1),
    ("label_b", "int64_list", 1),
]
TASKS = ["label_a", "label_b"]
VALIDATION_SIZES = [37, 20, 11]  # uneven shares, partial last batches
TIMEOUT_S = 120  # far above a normal run: reaching it means a hang


@pytest.fixture(autouse=True)
def _cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """One process compares with 2 gloo ranks on the CPU, also on a machine with a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def examples(n: int, seed: int) -> list[bytes]:
    """Labels that depend on the features, so the model learns something."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        cont = rng.normal(size=6).astype(np.float32) * 3
        disc = rng.integers(0, 4, size=2)
        p_a, p_b = 1 / (1 + np.exp(-cont[0])), 1 / (1 + np.exp(2 - cont[1] - disc[0]))
        records.append(
            encode_example(
                {
                    "cont": cont,
                    "bin": rng.integers(0, 2, size=3),
                    "disc": disc,
                    "label_a": [int(rng.random() < p_a)],
                    "label_b": [int(rng.random() < p_b)],
                }
            )
        )
    return records


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    schema = [{"feature_name": n, "dtype": d, "length": k} for n, d, k in SCHEMA]
    (folder / "schema.json").write_text(json.dumps({"schema": schema}))
    for split, sizes in (("train", [64, 64]), ("validation", VALIDATION_SIZES)):
        (folder / split).mkdir()
        for i, size in enumerate(sizes):
            write_records(str(folder / split / f"part-{i}.gz"), examples(size, seed=100 * i + len(split)))
    return folder


def write_config(data: Path, run: Path, *, batch_norm: bool = False, **training: object) -> Path:
    """The tiny model's config (save_dir `run`); `training` overrides the training section."""
    section = {
        "seg_dense_schema": {
            "schema_path": str(data / "schema.json"),
            "renamed_features": {"continuous": "cont", "binary": "bin", "discrete": "disc"},
        },
        "tasks": {t: {} for t in TASKS},
        "examples_shuffle_buffer_size": 0,
    }
    tower = {"layer_sizes": [8, 1], **({"batch_norm": {"affine": False}} if batch_norm else {})}
    config = {
        "training": {
            "save_dir": str(run),
            "num_train_steps": 2,
            "checkpoint_every_n": 1,
            "train_log_every_n": 1,
            "eval_log_every_n": 1000,
            "num_eval_steps": -1,
            "seed": 0,
            **training,
        },
        "model": {
            "multi_task_type": "share_all",
            "featurization_config": {"double_norm_log_config": {"layer_norm_config": {"epsilon": 1e-3}}},
            "small_embeddings": {
                "tables": [{"name": "d0", "num_embeddings": 4, "embedding_dim": 3, "index": 0}]
            },
            "backbone": {"mlp_config": {"layer_sizes": [16], "final_layer_activation": True}},
            "tasks": {t: {"mlp_config": tower} for t in TASKS},
            "stratifiers": [{"name": "d1_is_2", "index": 1, "value": 2}],
        },
        "train_data": {
            **section,
            "inputs": str(data / "train/*.gz"),
            "global_batch_size": 8,
            "file_batch_size": 2,
        },
        "validation_data": {
            "validation": {
                **section,
                "inputs": str(data / "validation/*.gz"),
                "global_batch_size": 16,
                "file_batch_size": 1,
            }
        },
        # Adam's epsilon far above the gradients makes its step proportional to the gradient, as SGD's:
        # the comparisons see the gradients' size, not only their signs. The rate drops at step 2, so a
        # resumed run must restore the schedule.
        "optimizer": {
            "adam": {"epsilon": 1.0},
            "single_task_learning_rate": {
                "piecewise_constant": {"learning_rate_boundaries": [2], "learning_rate_values": [1.0, 0.5]}
            },
        },
    }
    path = run.with_suffix(".yaml")
    run.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def launch(*args: str) -> subprocess.CompletedProcess:
    """`heavyranker <args>` in a fresh process group on the CPU; the whole group is killed on a hang."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "heavyranker", *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"heavyranker {' '.join(args)} hung for {TIMEOUT_S} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def on_two_ranks(function: Callable, *args: object, logs: Path) -> None:
    """function(*args) on ranks 0 and 1 of a gloo group; fails with a rank's log if one fails or hangs."""
    context = multiprocessing.get_context("forkserver")
    # The server imports once what each rank would import again (torch._dynamo: the optimizer imports it).
    context.set_forkserver_preload([__name__, "torch._dynamo", "torch.utils.tensorboard"])
    # The group's store lives here, on a port it holds from the start (as torchrun's agent hosts it): a free
    # port found and closed first could be taken by another test's process before rank 0 binds it.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ranks = [context.Process(target=_rank, args=(r, store.port, logs, function, args)) for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(TIMEOUT_S)
    for rank, process in enumerate(ranks):
        if process.exitcode != 0:
            for other in ranks:
                other.kill()
            log = (logs / f"rank_{rank}.log").read_text()[-3000:]
            pytest.fail(f"rank {rank} {'hung' if process.exitcode is None else 'failed'}:\n{log}")


def _rank(rank: int, port: int, logs: Path, function: Callable, args: tuple) -> None:
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"rank_{rank}.log", "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_USE_AGENT_STORE="True",  # both ranks join the parent's store as clients
        CUDA_VISIBLE_DEVICES="",
    )
    torch.set_num_threads(1)
    function(*args)


def train_config(path: Path) -> None:
    train(load_config(path))


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / f"step_{step}.pt")["model"]


def log_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def resume_from(source: Path, step: int, run: Path) -> None:
    """A new run folder holding only `source`'s checkpoint of `step` (and its shards, where it has any)."""
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(source / "checkpoints" / f"step_{step}.pt", run / "checkpoints")
    shards = RunFolder(source).shards(step)
    if shards.is_dir():
        shutil.copytree(shards, RunFolder(run).shards(step))


def test_ddp_steps_equal_one_process_on_the_whole_batch_and_resume_across_world_sizes(data, tmp_path):
    # No batch norm here: with it, each rank normalises its own half batch (DDP's batch norm is per rank).
    on_two_ranks(train_config, write_config(data, tmp_path / "ddp"), logs=tmp_path / "logs")
    train(load_config(write_config(data, tmp_path / "single")))
    assert_close(weights(tmp_path / "ddp", 1), weights(tmp_path / "single", 1))
    assert_close(weights(tmp_path / "ddp", 2), weights(tmp_path / "single", 2))
    torch.manual_seed(0)  # the trainer's initialisation
    config = load_config(tmp_path / "ddp.yaml")
    specs = feature_specs(config.train_data)
    initial = build_model(config.model, specs, config.train_data.tasks).state_dict()
    assert not torch.allclose(
        initial["backbone.layers.0.weight"], weights(tmp_path / "ddp", 1)["backbone.layers.0.weight"]
    )
    for ddp, single in zip(log_lines(tmp_path / "ddp"), log_lines(tmp_path / "single"), strict=True):
        for key in ("loss", *(f"loss/{t}" for t in TASKS)):  # rank 0 logs the loss of the global batch
            assert ddp[key] == pytest.approx(single[key], rel=1e-5), key

    # The 2-rank checkpoint of step 1, resumed by one process: its step 2 is the 2-rank run's step 2.
    resume_from(tmp_path / "ddp", 1, tmp_path / "resumed")
    train(load_config(write_config(data, tmp_path / "resumed")))
    assert [line["step"] for line in log_lines(tmp_path / "resumed")] == [2]
    assert_close(weights(tmp_path / "resumed", 2), weights(tmp_path / "ddp", 2))


def test_gradient_accumulation_on_two_ranks_equals_one_process(data, tmp_path):
    """2 micro-batches per step: DDP averages the gradients only after the second (no_sync on the first)."""
    for run in ("ddp", "single"):
        write_config(data, tmp_path / run, num_train_steps=1, gradient_accumulation=2)
    on_two_ranks(train_config, tmp_path / "ddp.yaml", logs=tmp_path / "logs")
    train(load_config(tmp_path / "single.yaml"))
    assert_close(weights(tmp_path / "ddp", 1), weights(tmp_path / "single", 1))


@pytest.fixture(scope="module")
def two_rank_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 steps on 2 ranks with batch norm in the towers, checkpoints at 2 and 4, evaluated at 4."""
    run = tmp_path_factory.mktemp("runs") / "two_ranks"
    config = write_config(
        data, run, batch_norm=True, num_train_steps=4, checkpoint_every_n=2, eval_log_every_n=4
    )
    on_two_ranks(train_config, config, logs=run.parent / "logs")
    return run


def test_only_rank_0_writes(two_rank_run):
    lines = log_lines(two_rank_run)
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    for line in lines:  # examples of the global batch: 2 ranks x 4
        assert line["examples_per_s"] / line["steps_per_s"] == pytest.approx(8)
    assert sorted(p.name for p in (two_rank_run / "checkpoints").iterdir()) == ["step_2.pt", "step_4.pt"]
    assert [p.name for p in (two_rank_run / "eval" / "validation").iterdir()] == ["step_4.json"]


def test_two_ranks_resume_exactly(two_rank_run, data, tmp_path):
    resume_from(two_rank_run, 2, tmp_path / "resumed")
    config = write_config(
        data, tmp_path / "resumed", batch_norm=True, num_train_steps=4, checkpoint_every_n=2
    )
    on_two_ranks(train_config, config, logs=tmp_path / "logs")
    resumed = log_lines(tmp_path / "resumed")
    assert [line["step"] for line in resumed] == [3, 4]
    for straight, again in zip(log_lines(two_rank_run)[2:], resumed, strict=True):  # losses, learning rates
        assert {k: v for k, v in again.items() if "_per_s" not in k} == {
            k: v for k, v in straight.items() if "_per_s" not in k
        }
    for name, tensor in weights(two_rank_run, 4).items():
        assert torch.equal(tensor, weights(tmp_path / "resumed", 4)[name]), name


def evaluate_checkpoint(config: Path, checkpoint: Path) -> None:
    evaluate_command(load_config(config), checkpoint=str(checkpoint), watch=False, split=None)


def test_two_rank_evaluation_equals_one_process(two_rank_run, tmp_path):
    """The evaluation during training (after a step that left each rank with its own batch-norm statistics)
    and `heavyranker evaluate` on 2 ranks, against one process evaluating the checkpoint."""
    result = two_rank_run / "eval" / "validation" / "step_4.json"
    during_training = json.loads(result.read_text())["metrics"]
    config, checkpoint = two_rank_run.with_suffix(".yaml"), two_rank_run / "checkpoints" / "step_4.pt"
    result.unlink()
    on_two_ranks(evaluate_checkpoint, config, checkpoint, logs=tmp_path / "logs")
    evaluated = json.loads(result.read_text())["metrics"]
    one = evaluate_command(load_config(config), checkpoint=str(checkpoint), watch=False, split=None)[
        "validation"
    ]
    assert one.keys() == {*TASKS, *(f"{t}/d1_is_2" for t in TASKS)}
    assert one["label_a"]["num_examples"] == sum(VALIDATION_SIZES)
    for two_ranks in (during_training, evaluated):
        assert two_ranks.keys() == one.keys()
        for task, metrics in one.items():
            for name, value in metrics.items():
                # The same examples; a forward on another batch composition may round differently.
                assert two_ranks[task][name] == pytest.approx(value, rel=1e-6, abs=1e-9), (task, name)


def watch_is_refused(config: Path) -> None:
    with pytest.raises(UserError, match="^watch runs in one process"):
        evaluate_command(load_config(config), checkpoint=None, watch=True, split=None)


def test_watch_needs_one_process(two_rank_run, tmp_path):
    on_two_ranks(watch_is_refused, two_rank_run.with_suffix(".yaml"), logs=tmp_path / "logs")


def test_a_rank_that_raises_takes_the_job_down(data, tmp_path):
    """`heavyranker train --nproc 2`: rank 1 meets a damaged record at step 7 while rank 0 waits for it in
    the gradient all-reduce. The job stops with the error in view, and rank 0 alone logged steps 1-6. A
    config warning is logged once (it was by the launcher and again by each rank)."""
    (tmp_path / "train").mkdir()
    shutil.copy(data / "train" / "part-0.gz", tmp_path / "train")
    write_records(str(tmp_path / "train" / "part-1.gz"), [*examples(24, seed=1), b"not a tf.Example"])
    config = write_config(data, tmp_path / "run", num_train_steps=20, checkpoint_every_n=100)
    no_effect = "train_data.dataset_service_compression=AUTO"
    launched = launch(
        "train", "--config", str(config), "--set", f"train_data.inputs={tmp_path}/train/*.gz", "--nproc", "2",
        "--set", no_effect,
    )  # fmt: skip
    assert launched.returncode != 0
    assert launched.stderr.count("dataset_service_compression: accepted for compatibility") == 1
    assert f"{tmp_path}/train/part-1.gz" in launched.stderr and "record 24" in launched.stderr
    assert [line["step"] for line in log_lines(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    assert launched.stderr.count("step 6: loss") == 1


def test_batch_not_divisible_by_the_world_size_is_a_config_error(data, tmp_path):
    config = load_config(write_config(data, tmp_path / "run"))
    check_sharding(config.data_sections, 2)
    with pytest.raises(
        UserError, match=r"train_data.global_batch_size: 8 is not divisible by the world size 3"
    ):
        check_sharding(config.data_sections, 3)
    with pytest.raises(UserError, match=r"validation_data.validation.global_batch_size: 16 is not divisible"):
        check_sharding(config.validation_sections, 3)


def test_fewer_files_than_ranks_asks_for_more_files(data, tmp_path):
    config = load_config(write_config(data, tmp_path / "run"))
    with pytest.raises(
        UserError,
        match=r"train_data: 2 data file\(s\) .*part-0.gz.* for 4 processes; .* at "
        r"least 4 files",
    ):
        check_sharding(config.data_sections, 4)
    with pytest.raises(UserError, match=r"validation_data.validation: 3 data file\(s\) .* for 4 processes"):
        check_sharding(config.validation_sections, 4)


def test_a_rank_killed_mid_run_stops_the_other_with_one_line(data, tmp_path):
    """SIGKILL to rank 1 of `heavyranker train --nproc 2` after its first checkpoint: rank 0 does not wait
    for it (its next collective fails at once, and torchrun's agent stops it), and says so in one line, not
    with gloo's traceback."""
    config = write_config(data, tmp_path / "run", num_train_steps=10**6, checkpoint_every_n=5)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "heavyranker", "train", "--config", str(config), "--nproc", "2"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + TIMEOUT_S  # a bound against a hang
        while not list((tmp_path / "run" / "checkpoints").glob("step_*.pt")):
            assert process.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.2)
        # torchrun replaced the launching process: its workers are its children.
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        rank_1 = next(
            int(p) for p in children if b"RANK=1" in Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
        )
        os.kill(rank_1, signal.SIGKILL)
        process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"rank 0 did not stop within {TIMEOUT_S} s")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    errors = (tmp_path / "stderr").read_text()
    assert process.returncode != 0
    assert "error: rank 0 of 2: another rank of this job is gone (" in errors, errors[-3000:]
    assert "[rank0]: Traceback" not in errors
