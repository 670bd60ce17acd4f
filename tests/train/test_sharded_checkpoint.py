"""Checkpoints of a run with sharded tables (train/sharded_checkpoint.py) on 2 gloo processes: every rank
writes its own shards beside step_<N>.pt, which holds no table; one process reads them whole (evaluate,
export, a replicated resume), a sharded resume its own parts; retention removes them with their checkpoint.
The references are replicated runs of the same seed (tests/train/test_sharding.py explains why they match)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from heavyranker.checkpoint import load_checkpoint, load_model_weights
from heavyranker.config import load_config
from heavyranker.errors import UserError
from heavyranker.eval.evaluator import evaluate_command
from heavyranker.model import restore_weights
from heavyranker.run_folder import RunFolder
from heavyranker.runtime import distributed_runtime
from heavyranker.serve.export import export_model
from heavyranker.serve.scorer import Scorer
from heavyranker.train.loop import train
from heavyranker.train.optim import build_optimizer, load_optimizer_state
from heavyranker.train.sharding import ShardedTables
from tests.conftest import FullDisk
from tests.test_runtime import (  # _cpu: autouse, the CPU also on a machine with a GPU
    _cpu,  # noqa: F401
    assert_close,
    log_lines,
    on_two_ranks,
    resume_from,
    train_config,
    weights,
)
from tests.train.test_sharding import (
    STEPS,
    _batch,
    _config,
    _evaluating,
    _fresh_model,
    _steps,
    data,  # noqa: F401  (the module's examples, a fixture)
)

pytest.importorskip("torchrec", reason="the torchrec extra (docs/sharding.md)")

TABLES = {
    "users": "large_embeddings.users.embedding.weight",
    "authors": "large_embeddings.authors.embedding.weight",
}


@pytest.fixture(scope="module")
def runs(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811 (the fixture)
    """A sharded run and a replicated run of the same seed, STEPS steps, checkpoints at 10 and 20."""
    folder = tmp_path_factory.mktemp("runs")
    on_two_ranks(train_config, _config(data, folder / "sharded", "torchrec"), logs=folder / "logs")
    train(load_config(_config(data, folder / "replicated", "replicated")))
    return folder


def _raw(checkpoint: Path) -> dict:
    """step_<N>.pt as written, its tables left where they are."""
    return torch.load(checkpoint, map_location="cpu", weights_only=True)


def _index(checkpoint: Path) -> dict:
    from heavyranker.checkpoint import SHARDED_TABLES

    raw = _raw(checkpoint)
    assert SHARDED_TABLES in raw, f"{checkpoint} holds its tables: {sorted(raw['model'])}"
    return raw[SHARDED_TABLES]


def _from_files(checkpoint: Path, table: str, key: str) -> torch.Tensor:
    """Table `table`'s tensor `key` put together from the shard files by hand, NaN where no shard has it."""
    record = _index(checkpoint)[table]
    full = torch.full(record["shape"], float("nan"))
    for shard in record["shards"]:
        content = torch.load(checkpoint.parent / shard["file"], weights_only=True)
        (row, column), (rows, columns) = shard["offsets"], shard["sizes"]
        full[row : row + rows, column : column + columns] = content[f"{table}@{row},{column}"][key]
    return full


def test_each_rank_writes_its_shards_and_one_process_reads_them_whole(runs, data, tmp_path):  # noqa: F811 (the fixture)
    for step in (10, 20):
        checkpoint, replicated = (
            runs / run / "checkpoints" / f"step_{step}.pt" for run in ("sharded", "replicated")
        )
        raw, want = _raw(checkpoint), _raw(replicated)
        assert set(raw["model"]) == set(want["model"]) - set(TABLES.values())  # no table in step_<N>.pt
        table_sizes = {tuple(w.shape) for key, w in want["model"].items() if key in TABLES.values()}
        assert not any(
            tuple(v.shape) in table_sizes for e in raw["optimizer"]["state"].values() for v in e.values()
        )
        index = _index(checkpoint)
        files = {shard["file"] for record in index.values() for shard in record["shards"]}
        assert files == {
            path.relative_to(checkpoint.parent).as_posix()
            for path in RunFolder(runs / "sharded").shards(step).iterdir()
        }
        assert len(files) == 2  # one a rank: the planner puts a table on each
        for table, key in TABLES.items():
            torch.testing.assert_close(
                _from_files(checkpoint, table, "weight"), want["model"][key], rtol=1e-4, atol=1e-5
            )
            moments = want["optimizer"]["state"][index[table]["optimizer"]["index"]]
            assert sorted(index[table]["optimizer"]["per_row"]) == ["exp_avg", "exp_avg_sq"]
            torch.testing.assert_close(index[table]["optimizer"]["scalars"]["step"], moments["step"])
            for moment in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(
                    _from_files(checkpoint, table, moment), moments[moment], rtol=1e-4, atol=1e-6
                )
        # load_checkpoint assembles the replicated layout: weights and Adam's state
        assembled = load_checkpoint(checkpoint)
        for name, value in want["model"].items():
            torch.testing.assert_close(assembled["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)
        assert assembled["optimizer"]["state"].keys() == want["optimizer"]["state"].keys()
        for position, entry in want["optimizer"]["state"].items():
            for key, value in entry.items():
                got = assembled["optimizer"]["state"][position][key]
                torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-6, msg=f"{position} {key}")

    # evaluate and export, on one process, read the sharded checkpoint as the replicated run's
    config = _evaluating(data, tmp_path / "evaluation", "replicated")
    sharded, replicated = (runs / run / "checkpoints" / "step_20.pt" for run in ("sharded", "replicated"))
    got, want = (
        evaluate_command(load_config(config), checkpoint=str(c), watch=False, split=None)["held"]
        for c in (sharded, replicated)
    )
    assert got.keys() == want.keys() and got
    for task, metrics in want.items():
        for name, value in metrics.items():
            assert got[task][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, name)
    scorer = Scorer(
        export_model(load_config(config), checkpoint=str(sharded), out=str(tmp_path / "export"), format="pt2")
    )
    _, specs, model = _fresh_model(config)
    load_model_weights(model, _raw(replicated)["model"], "the replicated run")
    features, _ = _batch(specs, 0, slice(0, 8))
    with torch.no_grad():
        eager = model.eval()(features)["calibrated_probabilities"]
    torch.testing.assert_close(
        scorer({n: features[n] for n in (s.name for s in scorer.inputs)})[0], eager, rtol=1e-4, atol=1e-5
    )


def test_a_sharded_run_resumes_from_its_own_checkpoint_exactly(runs, data, tmp_path):  # noqa: F811 (the fixture)
    _index(runs / "sharded" / "checkpoints" / "step_10.pt")  # its tables are in shard files
    resume_from(runs / "sharded", 10, tmp_path / "resumed")
    on_two_ranks(train_config, _config(data, tmp_path / "resumed", "torchrec"), logs=tmp_path / "logs")
    resumed = log_lines(tmp_path / "resumed")
    assert [line["step"] for line in resumed] == list(range(11, STEPS + 1))
    # losses and learning rates (the data counts are the process's since it started)
    for straight, again in zip(log_lines(runs / "sharded")[10:], resumed, strict=True):
        assert {k: v for k, v in again.items() if not _counted(k)} == {
            k: v for k, v in straight.items() if not _counted(k)
        }
    straight, again = (
        load_checkpoint(run / "checkpoints" / "step_20.pt")
        for run in (runs / "sharded", tmp_path / "resumed")
    )
    for part in ("model",):
        for name, tensor in straight[part].items():
            assert torch.equal(again[part][name], tensor), name
    for index, entry in straight["optimizer"]["state"].items():
        for key, value in entry.items():
            assert torch.equal(again["optimizer"]["state"][index][key], value), (index, key)


def _counted(key: str) -> bool:
    return key.startswith("data/") or key.endswith("_per_s")


def test_either_mode_resumes_from_the_others_checkpoint(runs, data, tmp_path):  # noqa: F811 (the fixture)
    _index(runs / "sharded" / "checkpoints" / "step_10.pt")
    resume_from(runs / "sharded", 10, tmp_path / "replicated_from_sharded")
    train(load_config(_config(data, tmp_path / "replicated_from_sharded", "replicated")))
    resume_from(runs / "replicated", 10, tmp_path / "sharded_from_replicated")
    config = _config(data, tmp_path / "sharded_from_replicated", "torchrec")
    on_two_ranks(train_config, config, logs=tmp_path / "logs")
    _index(tmp_path / "sharded_from_replicated" / "checkpoints" / "step_20.pt")
    for run in ("replicated_from_sharded", "sharded_from_replicated"):
        assert [line["step"] for line in log_lines(tmp_path / run)] == list(range(11, STEPS + 1))
        assert_close(weights(tmp_path / run, 20), weights(runs / "replicated", 20))


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_damaged_shard_file_is_one_line_naming_it(runs, tmp_path, damage):
    resume_from(runs / "sharded", 10, tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "step_10.pt"
    shard = sorted(RunFolder(tmp_path / "run").shards(10).iterdir())[-1]
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    for read in (lambda: load_checkpoint(checkpoint, mapped=True), lambda: load_checkpoint(checkpoint)):
        with pytest.raises(UserError) as info:
            read()
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{shard}: ") and str(checkpoint) in message
        assert ("is missing" if damage == "missing" else "not a readable shard file") in message


@pytest.mark.parametrize("name", ["../../elsewhere.pt", "/tmp/elsewhere.pt", "step_10.pt", "a/b/c.pt"])
def test_an_index_naming_a_file_outside_its_shard_folder_is_damaged(runs, tmp_path, name):
    from heavyranker.checkpoint import SHARDED_TABLES

    state = _raw(runs / "sharded" / "checkpoints" / "step_10.pt")
    next(iter(state[SHARDED_TABLES].values()))["shards"][0]["file"] = name
    checkpoint = tmp_path / "step_10.pt"
    torch.save(state, checkpoint)
    with pytest.raises(UserError) as info:
        load_checkpoint(checkpoint)
    assert str(info.value) == (
        f"{checkpoint}: its {SHARDED_TABLES!r} is damaged (ValueError: shard file {name!r} is not in a "
        "step_<N>.shards folder)"
    )


def test_retention_removes_shards_with_their_checkpoint_and_sweeps_those_without(data, tmp_path):  # noqa: F811 (the fixture)
    config = _config(data, tmp_path / "run", "torchrec")
    settings = yaml.safe_load(config.read_text())
    settings["training"].update(checkpoint_every_n=5, checkpoint_max_to_keep=2)
    config.write_text(yaml.safe_dump(settings))
    run = RunFolder(tmp_path / "run")
    # left by a save killed before its step_3.pt, and a killed writer's temporary
    run.shards(3).mkdir(parents=True)
    (run.shards(3) / "rank-1.0a1b2c3d.pt").write_bytes(b"shards")
    on_two_ranks(train_config, config, logs=tmp_path / "logs")
    assert sorted(path.name for path in run.checkpoints.iterdir()) == [
        "step_15.pt",
        "step_15.shards",
        "step_20.pt",
        "step_20.shards",
    ]
    for step in (15, 20):
        index = _index(run.checkpoint(step))
        named = {Path(s["file"]).name for record in index.values() for s in record["shards"]}
        assert {path.name for path in run.shards(step).iterdir()} == named


def saved_state(sharded: ShardedTables, optimizer: torch.optim.Optimizer, checkpoints: Path) -> tuple:
    """As Trainer.save (every rank's shards, then rank 0's step_1.pt), then the checkpoint's model and
    optimizer as one process reads them, in the replicated layout, on rank 0 (the other ranks get {})."""
    from heavyranker.checkpoint import SHARDED_TABLES, save_checkpoint
    from heavyranker.train.sharded_checkpoint import write_shards

    shards = write_shards(sharded, optimizer, checkpoints, 1)
    if not sharded.runtime.is_main:
        return {}, {}
    state = {"model": shards.model, "optimizer": shards.optimizer, SHARDED_TABLES: shards.index}
    save_checkpoint(checkpoints, 1, state)
    shards.remove_replaced()
    state = load_checkpoint(checkpoints / "step_1.pt")
    return state["model"], state["optimizer"]


def _layout(checkpoint: Path) -> dict[str, int]:
    """How many shards each table has."""
    return {table: len(record["shards"]) for table, record in _index(checkpoint).items()}


def _resume_under_another_plan(config_path: Path, checkpoints: Path, out: Path) -> None:
    """On each of 2 ranks: train under one plan and save; resume the checkpoint under another (each rank
    reads parts of both ranks' files) and save the same step again (its files replace the first's)."""
    from heavyranker.checkpoint import SHARDED_TABLES

    plans = [
        {"users": "column_wise", "authors": "table_wise"},
        {"users": "table_wise", "authors": "column_wise"},
    ]
    with distributed_runtime() as runtime:
        config, specs, model = _fresh_model(config_path)
        first = ShardedTables(model, runtime, sharding_types=plans[0])
        optimizer, _ = build_optimizer(config.optimizer, first.optimizer_view)
        _steps(first.module, optimizer, specs, slice(4 * runtime.rank, 4 * runtime.rank + 4))
        saved = saved_state(first, optimizer, checkpoints)
        layouts = [_layout(checkpoints / "step_1.pt")] if runtime.is_main else []  # rank 0 wrote it
        _, _, model = _fresh_model(config_path)
        # its collectives wait for rank 0, which wrote step_1.pt before: every rank reads that file next
        second = ShardedTables(model, runtime, sharding_types=plans[1])
        optimizer, _ = build_optimizer(config.optimizer, second.optimizer_view)
        state = restore_weights(model, checkpoints / "step_1.pt", load=second.load_model_state)
        shards = state[SHARDED_TABLES]
        load_optimizer_state(optimizer, second.local_optimizer_state(optimizer, state["optimizer"], shards))
        resumed = saved_state(second, optimizer, checkpoints)  # replaces the first plan's files
        if runtime.is_main:
            layouts.append(_layout(checkpoints / "step_1.pt"))
            torch.save({"saved": saved, "resumed": resumed, "layouts": layouts}, out)


def test_a_sharded_resume_under_another_plan_reads_the_parts_of_each_file(data, tmp_path):  # noqa: F811 (the fixture)
    config = _config(data, tmp_path / "run", "torchrec")
    checkpoints = tmp_path / "run" / "checkpoints"
    on_two_ranks(_resume_under_another_plan, config, checkpoints, tmp_path / "out.pt", logs=tmp_path / "logs")
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    (model, optimizer), (resumed_model, resumed_optimizer) = out["saved"], out["resumed"]
    assert resumed_model.keys() == model.keys()
    for name, value in model.items():
        assert torch.equal(resumed_model[name], value), name
    assert resumed_optimizer["state"].keys() == optimizer["state"].keys()
    for index, entry in optimizer["state"].items():
        for key, value in entry.items():
            assert torch.equal(resumed_optimizer["state"][index][key], value), (index, key)
    # users: 2 column shards, one in each rank's file, then whole on one rank
    assert [layout["users"] for layout in out["layouts"]] == [2, 1]
    # saved again under the second plan: its files alone remain
    index = _index(checkpoints / "step_1.pt")
    named = {Path(s["file"]).name for record in index.values() for s in record["shards"]}
    assert {path.name for path in RunFolder(tmp_path / "run").shards(1).iterdir()} == named
    assembled = load_checkpoint(checkpoints / "step_1.pt")
    for table, key in TABLES.items():
        assert torch.equal(assembled["model"][key], model[key]), table


def test_a_run_taking_its_folder_sweeps_what_killed_saves_left_of_shards(tmp_path):
    run = RunFolder(tmp_path)
    for step in (3, 5):
        run.shards(step).mkdir(parents=True)
        (run.shards(step) / "rank-0.0a1b2c3d.pt").write_bytes(b"shards")
    run.checkpoint(5).write_bytes(b"a checkpoint")
    (run.shards(5) / ".rank-1.0a1b2c3d.pt.tmp-999999-1").write_bytes(b"half")  # its writer was killed
    with run.claim():
        assert sorted(path.name for path in run.checkpoints.iterdir()) == ["step_5.pt", "step_5.shards"]
        assert [path.name for path in run.shards(5).iterdir()] == ["rank-0.0a1b2c3d.pt"]


def _save_on_a_full_disk(config_path: Path, checkpoints: Path, out: Path) -> None:
    """On each of 2 ranks: a save whose rank 1 finds its disk full; what each rank raised goes to `out`."""
    from heavyranker.train.sharded_checkpoint import write_shards

    with distributed_runtime() as runtime:
        config, _, model = _fresh_model(config_path)
        sharded = ShardedTables(model, runtime)
        optimizer, _ = build_optimizer(config.optimizer, sharded.optimizer_view)
        if runtime.rank == 1:
            real_save = torch.save
            torch.save = lambda state, f: real_save(state, FullDisk(f, room=100))
        try:
            write_shards(sharded, optimizer, checkpoints, 1)
            raised = "nothing"
        except UserError as e:
            raised = str(e)
        (out / f"rank_{runtime.rank}.txt").write_text(raised)


def test_a_rank_that_cannot_write_its_shards_stops_every_rank_with_one_line(data, tmp_path):  # noqa: F811 (the fixture)
    checkpoints = tmp_path / "run" / "checkpoints"
    config = _config(data, tmp_path / "run", "torchrec")
    on_two_ranks(_save_on_a_full_disk, config, checkpoints, tmp_path, logs=tmp_path / "logs")
    raised = {(tmp_path / f"rank_{rank}.txt").read_text() for rank in range(2)}
    assert len(raised) == 1  # the same on both
    (message,) = raised
    shards = RunFolder.of_checkpoints(checkpoints).shards(1)
    full = "cannot write the checkpoint's shards: No space left on device"
    assert re.fullmatch(rf"{re.escape(str(shards))}/rank-1\.[0-9a-f]+\.pt: {full}", message)
    assert not (checkpoints / "step_1.pt").exists()
    assert not [path for path in shards.iterdir() if path.name.startswith(".")]  # no temporary left
