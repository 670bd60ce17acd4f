"""Sharded tables (training.embedding_sharding: torchrec) trained by their own optimizer (optimizer.embedding)
on 2 gloo processes, against one process with replicated tables and the same optimizer on the same examples
(tests/train/test_sharding.py explains why both see the same batches): the same losses, weights and table
optimizer state, checkpointed in the shard files and resumed in either mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from heavyranker.checkpoint import SHARDED_TABLES, load_checkpoint, save_checkpoint
from heavyranker.config import load_config
from heavyranker.runtime import distributed_runtime
from heavyranker.train.loop import train
from heavyranker.train.optim import build_optimizer
from heavyranker.train.sharded_checkpoint import write_shards
from heavyranker.train.sharding import ShardedTables
from heavyranker.train.table_optim import build_table_optimizer
from tests.test_runtime import (  # _cpu: autouse, the CPU also on a machine with a GPU
    _cpu,  # noqa: F401
    log_lines,
    on_two_ranks,
    resume_from,
    train_config,
)
from tests.train.test_sharded_checkpoint import _from_files, _index
from tests.train.test_sharding import (
    _config,
    _fresh_model,
    _steps,
    assert_state_is,
    data,  # noqa: F401  (the module's examples, a fixture)
)

pytest.importorskip("torchrec", reason="the torchrec extra (docs/sharding.md)")

OPTIMIZERS = ["rowwise_adagrad", "adagrad", "sgd", "adam"]
SHORT = 6  # steps of a run here, a checkpoint at 3 and 6


def _table_config(data: Path, run: Path, sharding: str, kind: str) -> Path:  # noqa: F811 (the fixture)
    """test_sharding's config, SHORT steps, the tables trained by `kind` with weight decay (which touches
    the rows looked up only, for row-wise Adagrad)."""
    path = _config(data, run, sharding)
    config = yaml.safe_load(path.read_text())
    config["training"].update(num_train_steps=SHORT, checkpoint_every_n=SHORT // 2)
    config["optimizer"]["embedding"] = {"type": kind, "learning_rate": 0.1, "weight_decay": 0.01}
    path.write_text(yaml.safe_dump(config))
    return path


def _close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key, value in want.items():
        if isinstance(value, dict):
            _close(got[key], value, f"{what}.{key}")
        elif torch.is_tensor(value):
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6, msg=f"{what}.{key}")
        else:
            assert got[key] == value, f"{what}.{key}"


def _state(run: Path, step: int) -> dict:
    """A checkpoint's weights and both optimizers' state, in the replicated layout."""
    state = load_checkpoint(run / "checkpoints" / f"step_{step}.pt")
    return {part: state[part] for part in ("model", "optimizer", "table_optimizer")}


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_sharded_tables_train_and_resume_with_their_own_optimizer_as_replicated_ones(data, tmp_path, kind):  # noqa: F811 (the fixture)
    on_two_ranks(
        train_config, _table_config(data, tmp_path / "sharded", "torchrec", kind), logs=tmp_path / "l"
    )
    train(load_config(_table_config(data, tmp_path / "replicated", "replicated", kind)))
    sharded, replicated = log_lines(tmp_path / "sharded"), log_lines(tmp_path / "replicated")
    assert len(sharded) == len(replicated) == SHORT
    for a, b in zip(sharded, replicated, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["lr/embedding_tables"] == b["lr/embedding_tables"] == 0.1
    index = _index(tmp_path / "sharded" / "checkpoints" / f"step_{SHORT}.pt")
    if kind != "sgd":  # its state is empty: no momentum
        assert {record["optimizer"]["in"] for record in index.values()} == {"table_optimizer"}
    straight = _state(tmp_path / "replicated", SHORT)
    _close(_state(tmp_path / "sharded", SHORT), straight, kind)

    # From the sharded checkpoint of step 3: a sharded resume and a replicated one reach the same step 6.
    resume_from(tmp_path / "sharded", SHORT // 2, tmp_path / "resumed")
    config = _table_config(data, tmp_path / "resumed", "torchrec", kind)
    on_two_ranks(train_config, config, logs=tmp_path / "l2")
    resume_from(tmp_path / "sharded", SHORT // 2, tmp_path / "replicated_from_sharded")
    train(load_config(_table_config(data, tmp_path / "replicated_from_sharded", "replicated", kind)))
    for run in ("resumed", "replicated_from_sharded"):
        assert [line["step"] for line in log_lines(tmp_path / run)] == list(range(SHORT // 2 + 1, SHORT + 1))
        _close(_state(tmp_path / run, SHORT), straight, run)
    uninterrupted, again = _state(tmp_path / "sharded", SHORT), _state(tmp_path / "resumed", SHORT)
    assert torch.equal(
        again["model"]["large_embeddings.users.embedding.weight"],
        uninterrupted["model"]["large_embeddings.users.embedding.weight"],
    )


def test_a_sharded_run_resumes_from_a_replicated_checkpoint_of_row_wise_adagrad(data, tmp_path):  # noqa: F811 (the fixture)
    kind = "rowwise_adagrad"
    train(load_config(_table_config(data, tmp_path / "replicated", "replicated", kind)))
    resume_from(tmp_path / "replicated", SHORT // 2, tmp_path / "sharded_from_replicated")
    config = _table_config(data, tmp_path / "sharded_from_replicated", "torchrec", kind)
    on_two_ranks(train_config, config, logs=tmp_path / "l")
    _index(tmp_path / "sharded_from_replicated" / "checkpoints" / f"step_{SHORT}.pt")
    _close(_state(tmp_path / "sharded_from_replicated", SHORT), _state(tmp_path / "replicated", SHORT), kind)


class _Both:
    """The dense Adam and the tables' optimizer stepped together, as Trainer.train_step does."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad()


def _column_wise_steps(config_path: Path, out: Path) -> None:
    """On each of 2 ranks: users column-wise (half of each row's columns per rank), authors table-wise,
    both trained by optimizer.embedding's optimizer; a checkpoint of the end, read back whole on rank 0 and
    cut back to each rank's shards."""
    config, specs, model = _fresh_model(config_path)
    with distributed_runtime() as runtime:
        plan = {"users": "column_wise", "authors": "table_wise"}
        sharded = ShardedTables(model, runtime, sharding_types=plan)
        optimizer, _ = build_optimizer(config.optimizer, sharded.optimizer_view)
        tables = sharded.optimizer_view.table_parameters()
        table_optimizer = build_table_optimizer(config.optimizer, tables, sharded.column_splits())
        half = slice(4 * runtime.rank, 4 * runtime.rank + 4)
        both = _Both(optimizer, table_optimizer)
        losses = [runtime.mean(loss) for loss in _steps(sharded.module, both, specs, half)]
        checkpoints = out.parent / "checkpoints"
        shards = write_shards(sharded, optimizer, checkpoints, 1, table_optimizer)
        if runtime.is_main:
            state = {"model": shards.model, "optimizer": shards.optimizer, SHARDED_TABLES: shards.index}
            save_checkpoint(checkpoints, 1, state | {"table_optimizer": shards.table_optimizer})
        runtime.broadcast(None)  # step_1.pt is written
        # The shard files' state cut back to this rank is this rank's state.
        raw = load_checkpoint(checkpoints / "step_1.pt", assemble=False)
        local = sharded.local_optimizer_state(
            table_optimizer, raw["table_optimizer"], raw[SHARDED_TABLES], kind="table_optimizer"
        )
        assert_state_is(local, table_optimizer)
        if runtime.is_main:
            torch.save({"losses": losses}, out)


def test_column_wise_tables_train_with_row_wise_adagrad_as_one_process(data, tmp_path):  # noqa: F811 (the fixture)
    # Each rank holds half of a users row's columns: the row's mean of g^2 is over both halves, and a row is
    # stepped (its weight decayed) where either half has a gradient.
    config_path = _table_config(data, tmp_path / "run", "torchrec", "rowwise_adagrad")
    on_two_ranks(_column_wise_steps, config_path, tmp_path / "sharded.pt", logs=tmp_path / "logs")
    sharded = torch.load(tmp_path / "sharded.pt", weights_only=True)
    config, specs, model = _fresh_model(config_path)
    optimizer, _ = build_optimizer(config.optimizer, model)
    table_optimizer = build_table_optimizer(config.optimizer, model.table_parameters())
    losses = _steps(model, _Both(optimizer, table_optimizer), specs, slice(0, 8))
    torch.testing.assert_close(torch.stack(sharded["losses"]), torch.stack(losses), rtol=1e-5, atol=1e-6)
    checkpoint = tmp_path / "checkpoints" / "step_1.pt"
    assert len(_index(checkpoint)["users"]["shards"]) == 2
    state = load_checkpoint(checkpoint)
    _close(state["model"], model.state_dict(), "model")
    _close(state["table_optimizer"]["state"], table_optimizer.state_dict()["state"], "table_optimizer")
    # the users' sums, a value per row, in both column shards' files
    users = _index(checkpoint)["users"]
    assert users["optimizer"]["one_per_row"] == ["sum"]
    sums = table_optimizer.state[model.large_embeddings["users"].embedding.weight]["sum"]
    for shard in users["shards"]:
        content = torch.load(checkpoint.parent / shard["file"], weights_only=True)
        got = content[f"users@{shard['offsets'][0]},{shard['offsets'][1]}"]["sum"]
        torch.testing.assert_close(got, sums, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        _from_files(checkpoint, "users", "weight"),
        model.state_dict()["large_embeddings.users.embedding.weight"],
        rtol=1e-4,
        atol=1e-5,
    )
