"""Large tables sharded with torchrec (training.embedding_sharding: torchrec) on 2 gloo processes against one
process with replicated tables on the same examples (tests/test_runtime.py explains why both see the same
batches): the same losses, the same table rows, and checkpoints in the replicated layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from heavyranker.checkpoint import save_checkpoint
from heavyranker.config import load_config
from heavyranker.data.columns import feature_specs
from heavyranker.data.sources.tfrecord import write_records
from heavyranker.data.tf_example import encode_example
from heavyranker.errors import UserError
from heavyranker.model import build_model
from heavyranker.run_folder import RunFolder
from heavyranker.runtime import distributed_runtime
from heavyranker.train.loop import train
from heavyranker.train.optim import build_optimizer
from heavyranker.train.sharding import PINS, ShardedTables, version_problem
from tests.test_runtime import (  # _cpu: autouse, the CPU also on a machine with a GPU
    SCHEMA,
    TASKS,
    _cpu,  # noqa: F401
    assert_close,
    log_lines,
    on_two_ranks,
    resume_from,
    train_config,
    weights,
    write_config,
)

pytest.importorskip("torchrec", reason="the torchrec extra (docs/sharding.md)")

STEPS = 20
USERS, AUTHORS = 40, 30  # rows; some ids fall outside, as padding


def _examples(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        user_ids, author = rng.integers(-2, USERS + 3, size=3), rng.integers(0, AUTHORS, size=1)
        cont = rng.normal(size=6).astype(np.float32)
        p = 1 / (1 + np.exp(-cont[0] - (author[0] % 3 - 1)))
        records.append(
            encode_example(
                {
                    "cont": cont,
                    "bin": rng.integers(0, 2, size=3),
                    "disc": rng.integers(0, 4, size=2),
                    "user_ids": user_ids,
                    "author_id": author,
                    "label_a": [int(rng.random() < p)],
                    "label_b": [int(rng.random() < 0.3)],
                }
            )
        )
    return records


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ids_data")
    schema = [*SCHEMA, ("user_ids", "int64_list", 3), ("author_id", "int64_list", 1)]
    fields = [{"feature_name": n, "dtype": d, "length": k} for n, d, k in schema]
    (folder / "schema.json").write_text(json.dumps({"schema": fields}))
    (folder / "train").mkdir()
    for i in range(2):
        write_records(str(folder / "train" / f"part-{i}.gz"), _examples(64, seed=7 + i))
    return folder


def _config(data: Path, run: Path, sharding: str) -> Path:
    path = write_config(data, run, num_train_steps=STEPS, checkpoint_every_n=10)
    config = yaml.safe_load(path.read_text())
    del config["validation_data"]
    config["train_data"]["seg_dense_schema"]["features"] = ["user_ids", "author_id"]
    config["training"]["embedding_sharding"] = sharding
    config["model"]["large_embeddings"] = {
        "tables": [
            {"name": "users", "num_embeddings": USERS, "embedding_dim": 8, "feature_name": "user_ids"},
            {"name": "authors", "num_embeddings": AUTHORS, "embedding_dim": 6, "feature_name": "author_id"},
        ]
    }
    # Adam's epsilon far above the gradients: steps proportional to them (as in test_runtime), so a
    # gradient of the wrong size (summed over the ranks instead of averaged) shows.
    config["optimizer"] = {"adam": {"epsilon": 1.0}, "single_task_learning_rate": {"constant": 1.0}}
    path.write_text(yaml.safe_dump(config))
    return path


def test_sharded_run_equals_replicated_run_and_its_checkpoints_load_into_one_process(data, tmp_path):
    on_two_ranks(train_config, _config(data, tmp_path / "sharded", "torchrec"), logs=tmp_path / "logs")
    train(load_config(_config(data, tmp_path / "replicated", "replicated")))
    sharded, replicated = log_lines(tmp_path / "sharded"), log_lines(tmp_path / "replicated")
    assert len(sharded) == len(replicated) == STEPS
    for a, b in zip(sharded, replicated, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for step in (10, 20):
        got, want = weights(tmp_path / "sharded", step), weights(tmp_path / "replicated", step)
        assert got.keys() == want.keys()  # the replicated layout
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    table = "large_embeddings.users.embedding.weight"
    assert not torch.allclose(
        weights(tmp_path / "sharded", 10)[table], weights(tmp_path / "sharded", 20)[table]
    )

    # Either mode resumes from the other's checkpoint of step 10 (weights, Adam's state) to the same step 20.
    resume_from(tmp_path / "sharded", 10, tmp_path / "replicated_from_sharded")
    train(load_config(_config(data, tmp_path / "replicated_from_sharded", "replicated")))
    resume_from(tmp_path / "replicated", 10, tmp_path / "sharded_from_replicated")
    config = _config(data, tmp_path / "sharded_from_replicated", "torchrec")
    on_two_ranks(train_config, config, logs=tmp_path / "logs_resumed")
    for run in ("replicated_from_sharded", "sharded_from_replicated"):
        assert [line["step"] for line in log_lines(tmp_path / run)] == list(range(11, STEPS + 1))
        assert_close(weights(tmp_path / run, 20), weights(tmp_path / "replicated", 20))


def _evaluating(data: Path, run: Path, sharding: str) -> Path:
    """_config with a validation split (the training files) evaluated at steps 5 and 10, and keep_best: the
    first evaluation's checkpoint is saved by keep_best alone (checkpoint_every_n is above the run)."""
    path = _config(data, run, sharding)
    config = yaml.safe_load(path.read_text())
    config["training"].update(num_train_steps=10, eval_log_every_n=5, checkpoint_every_n=100)
    config["training"]["keep_best"] = {"split": "held", "metric": "auroc"}
    config["validation_data"] = {"held": {**config["train_data"], "global_batch_size": 16}}
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_sharded_run_evaluates_and_keeps_its_best_as_a_replicated_run(data, tmp_path):
    """Each rank evaluates its file on its shards (train/sharded_eval.py), as the replicated run's 2 ranks
    do. Same examples, same weights: the same metrics, and keep_best marks and keeps the same step."""
    for sharding in ("torchrec", "replicated"):
        on_two_ranks(train_config, _evaluating(data, tmp_path / sharding, sharding), logs=tmp_path / "logs")
    sharded, replicated = RunFolder(tmp_path / "torchrec"), RunFolder(tmp_path / "replicated")
    for step in (5, 10):
        got, want = (json.loads(run.result("held", step).read_text()) for run in (sharded, replicated))
        assert got["metrics"].keys() == want["metrics"].keys() and got["metrics"]
        assert [want["metrics"][task]["num_examples"] for task in TASKS] == [128] * len(TASKS)  # both files
        for task, metrics in want["metrics"].items():
            for name, value in metrics.items():
                assert got["metrics"][task][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (
                    step,
                    task,
                    name,
                )
    best, replicated_best = sharded.read_best(), replicated.read_best()
    assert best is not None and replicated_best is not None
    assert best.step == replicated_best.step and best.value == pytest.approx(replicated_best.value, rel=1e-4)
    assert_close(weights(tmp_path / "torchrec", best.step), weights(tmp_path / "replicated", best.step))
    assert sharded.checkpoint(5).exists()  # saved by keep_best at the first evaluation, every rank gathering


def test_version_check_names_what_to_install():
    assert version_problem("2.13.0+cpu", "1.8.0", "1.8.0") is None
    assert version_problem("2.13.1", "1.8.0", "1.8.0") is None
    mismatch = version_problem("2.13.0+cpu", "1.8.0", "1.7.0")
    assert mismatch is not None and "fbgemm 1.7.0" in mismatch and "fbgemm-gpu-cpu==1.8.0" in mismatch
    old_torch = version_problem("2.12.0", "1.8.0", "1.8.0")
    assert old_torch is not None and "torch 2.12.0" in old_torch
    missing = version_problem("2.13.0", None, "1.8.0")
    assert missing is not None and "needs torchrec, which is not installed" in missing
    assert PINS["torchrec"] == PINS["fbgemm"]
    assert "\n" not in mismatch + missing


def test_a_missing_extra_is_one_line(data, tmp_path):
    """torchrec made unimportable (a None in sys.modules): train says what to install, no traceback."""
    config = _config(data, tmp_path / "run", "torchrec")
    code = (
        "import sys; sys.modules['torchrec'] = None\n"
        "from heavyranker.cli import main\n"
        f"sys.exit(main(['train', '--config', {str(config)!r}]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "torchrec" in line]
    assert len(lines) == 1 and "cannot import torchrec" in lines[0] and "pip install" in lines[0]


def test_one_process_is_refused(data, tmp_path):
    with pytest.raises(UserError, match="run `train --nproc N`"):
        train(load_config(_config(data, tmp_path / "run", "torchrec")))


def _batch(specs: dict, step: int, rows: slice) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Global batch `step` of 8 examples (ids partly outside the tables), cut to `rows`."""
    generator = torch.Generator().manual_seed(step)
    features = {}
    for name, spec in specs.items():
        shape = (8, *spec.shape)
        if name == "user_ids":
            features[name] = torch.randint(-2, USERS + 3, shape, generator=generator)
        elif name == "author_id":
            features[name] = torch.randint(0, AUTHORS, shape, generator=generator)
        elif spec.dtype == torch.int64:
            features[name] = torch.randint(0, 4, shape, generator=generator)
        else:
            features[name] = torch.randn(shape, generator=generator).to(spec.dtype)
    labels = (torch.rand(8, len(TASKS), generator=generator) < 0.4).float()
    return {k: v[rows] for k, v in features.items()}, labels[rows]


def _steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, specs: dict, rows: slice) -> list:
    losses = []
    for step in range(STEPS):
        features, labels = _batch(specs, step, rows)
        loss = F.binary_cross_entropy_with_logits(model(features)["logits"], labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def _fresh_model(config_path: Path) -> tuple:
    config = load_config(config_path)
    specs = feature_specs(config.train_data)
    torch.manual_seed(0)
    return config, specs, build_model(config.model, specs, config.train_data.tasks)


def _pinned_sharded_steps(config_path: Path, out: Path) -> None:
    """On each of 2 ranks: users column-wise (half the columns per rank), authors table-wise."""
    config, specs, model = _fresh_model(config_path)
    with distributed_runtime() as runtime:
        sharded = ShardedTables(
            model, runtime, sharding_types={"users": "column_wise", "authors": "table_wise"}
        )
        plans = runtime.gather(
            sorted((n, len(w.local_shards())) for n, w in sharded.sharded_weights().items())
        )
        optimizer, _ = build_optimizer(config.optimizer, sharded.optimizer_view)
        half = slice(4 * runtime.rank, 4 * runtime.rank + 4)
        losses = [runtime.mean(loss) for loss in _steps(sharded.module, optimizer, specs, half)]
        from tests.train.test_sharded_checkpoint import saved_state  # the checkpoint, read back whole

        model_state, optimizer_state = saved_state(sharded, optimizer, out.parent / "checkpoints")
        # The checkpoint's optimizer state cut back to this rank is this rank's state.
        local = sharded.local_optimizer_state(optimizer, runtime.broadcast(optimizer_state))
        assert_state_is(local, optimizer)
        if runtime.is_main:
            torch.save(
                {"plans": plans, "losses": losses, "model": model_state, "optimizer": optimizer_state}, out
            )


def test_column_wise_and_table_wise_shards_train_as_replicated_tables(data, tmp_path):
    config_path = _config(data, tmp_path / "run", "torchrec")
    on_two_ranks(_pinned_sharded_steps, config_path, tmp_path / "sharded.pt", logs=tmp_path / "logs")
    sharded = torch.load(tmp_path / "sharded.pt", weights_only=True)
    # users: split in 2 column shards (the planner places them); authors: one whole table on one rank
    shards = {name: sum(dict(plan)[name] for plan in sharded["plans"]) for name in ("users", "authors")}
    assert shards == {"users": 2, "authors": 1}
    config, specs, model = _fresh_model(config_path)
    optimizer, _ = build_optimizer(config.optimizer, model)
    losses = _steps(model, optimizer, specs, slice(0, 8))
    torch.testing.assert_close(torch.stack(sharded["losses"]), torch.stack(losses), rtol=1e-5, atol=1e-6)
    want = model.state_dict()
    assert sharded["model"].keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(sharded["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    want_state = optimizer.state_dict()["state"]
    assert sharded["optimizer"]["state"].keys() == want_state.keys()
    for index, entry in want_state.items():
        for key, value in entry.items():
            torch.testing.assert_close(sharded["optimizer"]["state"][index][key], value, rtol=1e-4, atol=1e-6)


def _refuses_a_damaged_checkpoint(path: Path) -> None:
    from heavyranker.train.loop import Trainer

    trainer = Trainer(load_config(path))
    with pytest.raises(UserError, match=r"step_1\.pt: its 'model' is not a dict of tensors"):
        trainer.restore()


def test_a_sharded_resume_checks_the_checkpoint_as_a_replicated_one_does(data, tmp_path):
    # Was "does not fit this model: missing large_embeddings...": the sharded path read the checkpoint's
    # "model" without restore_weights' checks (nor its first-layout completion of managed tables, nor the
    # hint at save_dir).
    config = _config(data, tmp_path / "run", "torchrec")
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, {"model": [1, 2], "step": 1})
    on_two_ranks(_refuses_a_damaged_checkpoint, config, logs=tmp_path / "logs")


def assert_state_is(local: dict, optimizer: torch.optim.Optimizer) -> None:
    """`local` (an optimizer state_dict cut back to this rank) holds exactly `optimizer`'s state."""
    own = optimizer.state_dict()["state"]
    assert local["state"].keys() == own.keys()
    for index, entry in own.items():
        for key, value in entry.items():
            torch.testing.assert_close(local["state"][index][key], value, rtol=0, atol=0)
