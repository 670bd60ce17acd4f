"""The training loop: exact resume, warm start, max_to_keep, non-finite stop, signals, end to end."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from itertools import pairwise

import pytest
import torch

from heavyranker.checkpoint import load_checkpoint
from heavyranker.cli import main
from heavyranker.data.dataset import RecapDataset
from heavyranker.errors import UserError
from heavyranker.run_folder import list_checkpoints
from heavyranker.train.loop import NonFiniteLoss, Trainer
from tests.conftest import CONFIGS, SMALL_SPLITS, FullDisk, small_config
from tests.data.test_damaged_records import write_small_records

FAV = "recap.engagement.is_favorited"
FAST = (
    "train_data.global_batch_size=64",
    "training.train_log_every_n=1",
    "training.eval_log_every_n=1000",
    "training.checkpoint_max_to_keep=null",
)


def losses(save_dir) -> dict[int, dict]:
    lines = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line for line in lines}


def run(data, save_dir, *overrides: str) -> Trainer:
    trainer = Trainer(small_config(data, save_dir, *FAST, *overrides))
    trainer.run()
    return trainer


def test_resume_reproduces_the_straight_run(small_data, tmp_path):
    # Dropout (RNG state) and gradient accumulation (data position = 2 batches per step) both matter here.
    extra = (
        f"model.tasks.{FAV}.mlp_config.dropout={{rate: 0.3}}",
        "training.gradient_accumulation=2",
        "training.checkpoint_every_n=3",
    )
    run(small_data, tmp_path / "straight", "training.num_train_steps=6", *extra)
    run(small_data, tmp_path / "resumed", "training.num_train_steps=3", *extra)
    run(small_data, tmp_path / "resumed", "training.num_train_steps=6", *extra)
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    for step in (4, 5, 6):
        assert resumed[step]["loss"] == straight[step]["loss"]
        assert resumed[step][f"loss/{FAV}"] == straight[step][f"loss/{FAV}"]
    final = [
        load_checkpoint(tmp_path / d / "checkpoints/step_6.pt")["model"] for d in ("straight", "resumed")
    ]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_a_finished_run_says_so_and_does_nothing(small_data, tmp_path, caplog):
    run(small_data, tmp_path, "training.num_train_steps=2")
    before = (tmp_path / "metrics.jsonl").read_text()
    with caplog.at_level("INFO"):
        run(small_data, tmp_path, "training.num_train_steps=2")
    assert "already at step 2 of 2" in caplog.text
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_damaged_records_are_skipped_and_what_reading_met_is_in_every_log_line(small_data, tmp_path, caplog):
    train = tmp_path / "train"
    train.mkdir()
    for path in (small_data / "train").glob("*.gz"):
        (train / path.name).symlink_to(path)
    damaged = train / "part-damaged.gz"
    write_small_records(damaged, 2000)  # 400 damaged records, 200 without meta.user_id
    damaged.write_bytes(damaged.read_bytes()[:-30])  # and a damaged file
    inputs, ignore = f"train_data.inputs={train}/*.gz", "train_data.ignore_data_errors=true"
    with caplog.at_level("INFO"):
        run(small_data, tmp_path / "run", "training.num_train_steps=3", inputs, ignore)
    lines = [line for _, line in sorted(losses(tmp_path / "run").items())]
    assert [line["step"] for line in lines] == [1, 2, 3]
    # Counted as the threads read ahead: so far for the run, never fewer than what the steps consumed. The
    # shuffle buffer (20,000 records) reads every file before the first batch.
    counts = [{k: line[k] for k in line if k.startswith("data/")} for line in lines]
    assert all(c["data/damaged_files"] >= 1 for c in counts)
    assert all(c["data/defaults_filled/meta.user_id"] >= 1 for c in counts)
    assert counts[-1]["data/skipped_records"] >= 1  # 3 batches of 64; 400 of 6,000 records damaged
    assert all(a[k] <= b[k] for a, b in pairwise(counts) for k in a)
    assert re.search(
        r"step 3: .* \| data: defaults_filled=\d+ \(.*meta\.user_id=\d+.*\), damaged_files=", caplog.text
    )


def test_max_to_keep(small_data, tmp_path):
    run(
        small_data,
        tmp_path,
        "training.num_train_steps=5",
        "training.checkpoint_every_n=2",
        "training.checkpoint_max_to_keep=2",
    )
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [4, 5]


def test_warm_start_copies_weights_and_starts_at_step_0(small_data, tmp_path):
    run(small_data, tmp_path / "a", "training.num_train_steps=2")
    b = Trainer(
        small_config(small_data, tmp_path / "b", *FAST, f"training.initial_checkpoint_dir={tmp_path / 'a'}")
    )
    b.restore()
    source = load_checkpoint(tmp_path / "a/checkpoints/step_2.pt")["model"]
    assert b.step == 0
    assert all(torch.equal(v, source[k]) for k, v in b.model.state_dict().items())


def test_warm_start_shape_mismatch_names_the_parameters(small_data, tmp_path):
    run(small_data, tmp_path / "a", "training.num_train_steps=1")
    b = Trainer(
        small_config(
            small_data,
            tmp_path / "b",
            *FAST,
            f"training.initial_checkpoint_dir={tmp_path / 'a'}",
            f"model.tasks.{FAV}.mlp_config.layer_sizes=[16, 1]",
        )
    )
    with pytest.raises(UserError, match="does not fit this model") as info:
        b.restore()
    assert "recap__engagement__is_favorited" in str(info.value) and "(16," in str(info.value)


def test_a_save_dir_holding_another_models_run_says_so(small_data, tmp_path):
    # Was only the list of misfits, which did not say that save_dir was the place to change.
    run(small_data, tmp_path, "training.num_train_steps=1")
    other = Trainer(
        small_config(small_data, tmp_path, *FAST, f"model.tasks.{FAV}.mlp_config.layer_sizes=[16, 1]")
    )
    with pytest.raises(UserError) as info:
        other.restore()
    assert str(info.value).startswith(f"{tmp_path}/checkpoints/step_1.pt does not fit this model: ")
    assert str(info.value).endswith(
        " (training.save_dir holds a run of another model: give this one its own save_dir)"
    )


def test_non_finite_loss_stops_naming_step_and_task_and_keeps_last_checkpoint(small_data, tmp_path):
    trainer = Trainer(
        small_config(
            small_data, tmp_path, *FAST, "training.num_train_steps=6", "training.checkpoint_every_n=2"
        )
    )
    real_loss = trainer.loss_fn.forward
    column = trainer.model.task_names.index(FAV)

    def poisoned(logits, labels, weights):
        total, per_task = real_loss(logits, labels, weights)
        if trainer.step == 2:  # the third step
            per_task = per_task.clone()
            per_task[column] = float("inf")
            total = per_task.mean()
        return total, per_task

    trainer.loss_fn.forward = poisoned
    with pytest.raises(NonFiniteLoss, match=f"step 3: the loss of {FAV} is not finite"):
        trainer.run()
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2]
    state = load_checkpoint(tmp_path / "checkpoints/step_2.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


TRAIN_SCRIPT = """
import sys
from heavyranker.cli import main
sys.exit(main(["train", "--config", sys.argv[1], *sum((["--set", s] for s in sys.argv[2:]), [])]))
"""


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(small_data, tmp_path):
    overrides = [
        f"train_data.inputs={small_data}/train/*.gz",
        f"training.save_dir={tmp_path}",
        *FAST,
        "training.num_train_steps=100000",
        "training.checkpoint_every_n=100000",
    ]
    overrides += [
        f"validation_data.{s}.inputs={small_data}/{s}/*.gz" for s in ("validation", "validation_downsampled")
    ]
    child = subprocess.Popen(
        [sys.executable, "-c", TRAIN_SCRIPT, str(CONFIGS / "local_small.yaml"), *overrides],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert child.poll() is None, child.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.kill(child.pid, signal.SIGTERM)
    assert child.wait(timeout=60) == 0
    [(step, _)] = list_checkpoints(tmp_path / "checkpoints")
    assert 3 <= step < 100000


def test_non_finite_features_are_named_when_the_loss_goes_non_finite(small_data, tmp_path):
    # log1p_abs, unlike double_norm_log, does not map NaN to 0: the NaN reaches the loss.
    trainer = Trainer(
        small_config(small_data, tmp_path, *FAST, "model.featurization_config={log1p_abs_config: {}}")
    )
    with RecapDataset(trainer.config.train_data) as dataset:
        batch = next(iter(dataset))
    batch.features["continuous"][3, 5] = float("nan")
    with pytest.raises(
        NonFiniteLoss,
        match=r"step 1: .* not finite \(the batch holds non-finite feature values: 1 in "
        r"continuous\)",
    ):
        trainer.train_step(iter([batch]))


def small_overrides(data, save_dir, *overrides: str) -> list[str]:
    """local_small's overrides to read data, write to save_dir and take FAST steps, then `overrides`."""
    paths = [f"train_data.inputs={data}/train/*.gz", f"training.save_dir={save_dir}"]
    paths += [f"validation_data.{s}.inputs={data}/{s}/*.gz" for s in SMALL_SPLITS]
    return [*paths, *FAST, *overrides]


def cli(command: str, data, save_dir, *overrides: str) -> int:
    """`heavyranker COMMAND` on local_small (small_overrides)."""
    sets = [arg for value in small_overrides(data, save_dir, *overrides) for arg in ("--set", value)]
    return main([*command.split(), "--config", str(CONFIGS / "local_small.yaml"), *sets])


def test_a_full_disk_during_a_save_is_one_line_and_the_last_checkpoint_stays(
    small_data, tmp_path, capsys, monkeypatch
):
    real_save, saved = torch.save, []

    def save_on_a_filling_disk(state, f):  # room for the first checkpoint only
        saved.append(state["step"])
        real_save(state, f if len(saved) == 1 else FullDisk(f, room=1000))

    monkeypatch.setattr(torch, "save", save_on_a_filling_disk)
    capsys.readouterr()
    code = cli("train", small_data, tmp_path, "training.num_train_steps=6", "training.checkpoint_every_n=2")
    assert code == 2
    err = capsys.readouterr().err  # the progress bar's lines, then the error
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"error: {tmp_path}/checkpoints/step_4.pt: cannot write the checkpoint: No space left on device"
    )
    assert saved == [2, 4]  # stopped at the failed save, without trying again
    assert os.listdir(tmp_path / "checkpoints") == ["step_2.pt"]
    assert load_checkpoint(tmp_path / "checkpoints/step_2.pt")["step"] == 2


def test_a_resumed_run_takes_the_adam_settings_of_its_config_and_logs_each_change(
    small_data, tmp_path, caplog
):
    run(small_data, tmp_path, "training.num_train_steps=2")
    trainer = Trainer(
        small_config(small_data, tmp_path, *FAST, "optimizer.adam.beta_1=0.5", "optimizer.adam.epsilon=1e-5")
    )
    with caplog.at_level("INFO"):
        trainer.restore()
    assert {(g["betas"], g["eps"]) for g in trainer.optimizer.param_groups} == {((0.5, 0.999), 1e-5)}
    assert [r.getMessage() for r in caplog.records if r.name == "heavyranker.train.optim"] == [
        "optimizer betas: (0.9, 0.999) in the checkpoint -> (0.5, 0.999) from the config",
        "optimizer eps: 1e-07 in the checkpoint -> 1e-05 from the config",
    ]
    moments = load_checkpoint(tmp_path / "checkpoints/step_2.pt")["optimizer"]["state"]
    restored = trainer.optimizer.state_dict()["state"]
    assert all(torch.equal(restored[i]["exp_avg_sq"], m["exp_avg_sq"]) for i, m in moments.items())


def test_a_resumed_run_drops_what_was_logged_past_its_checkpoint(small_data, tmp_path):
    run(small_data, tmp_path, "training.num_train_steps=6", "training.checkpoint_every_n=3")
    straight = losses(tmp_path)
    (tmp_path / "checkpoints/step_6.pt").unlink()  # as if killed after logging step 6, before saving it
    run(small_data, tmp_path, "training.num_train_steps=6", "training.checkpoint_every_n=3")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert [line["loss"] for line in lines] == [straight[step]["loss"] for step in range(1, 7)]


def test_a_second_train_in_a_run_folder_exits_2_naming_the_holder_until_the_holder_is_killed(
    small_data, tmp_path, capsys
):
    assert cli("train", small_data, tmp_path, "training.num_train_steps=2") == 0
    endless = ("training.num_train_steps=100000", "training.checkpoint_every_n=100000")
    overrides = small_overrides(small_data, tmp_path, *endless)
    holder = subprocess.Popen(
        [sys.executable, "-c", TRAIN_SCRIPT, str(CONFIGS / "local_small.yaml"), *overrides],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = tmp_path / "train.lock"
    try:
        deadline = time.monotonic() + 120
        while not lock.read_text().startswith(f"pid {holder.pid} "):
            assert holder.poll() is None, holder.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        capsys.readouterr()
        assert cli("train", small_data, tmp_path, "training.num_train_steps=4") == 2
        error = capsys.readouterr().err
        holding = f"error: {lock}: another train holds this run folder (pid {holder.pid} on "
        assert error.count("\n") == 1 and error.startswith(holding)
        # Evaluation reads the run without its lock: --watch ends after the checkpoint at num_train_steps.
        assert cli("evaluate --watch", small_data, tmp_path, "training.num_train_steps=2") == 0
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock of a process it ends
        holder.wait()
    assert cli("train", small_data, tmp_path, "training.num_train_steps=4") == 0
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [2, 4]


def test_a_starting_run_removes_the_temporaries_of_killed_writers(small_data, tmp_path):
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead, alive = int(exited.stdout), 1  # pid 1 (init) always runs
    results = tmp_path / "eval" / "validation"
    removed = [
        tmp_path / "checkpoints" / f".step_2.pt.tmp-{alive}",  # only a train writes checkpoints
        tmp_path / f".metrics.jsonl.tmp-{dead}",
        results / f".step_2.json.tmp-{dead}",
        results / f".step_4.json.tmp-{os.getpid()}",  # a starting run has written nothing yet
    ]
    kept = [
        results / f".step_6.json.tmp-{alive}",  # an `evaluate` beside the run may be writing it
        tmp_path / f".notes.txt.tmp-{dead}",  # not a file train writes
    ]
    for path in removed + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    run(small_data, tmp_path, "training.num_train_steps=1")
    assert [path for path in removed + kept if path.exists()] == kept


def eval_values(save_dir, split: str, task: str, metric: str) -> dict[int, float]:
    """The evaluator's result files: step -> metric."""
    files = (save_dir / "eval" / split).glob("step_*.json")
    results = [json.loads(path.read_text()) for path in files]
    return {r["step"]: r["metrics"][task][metric] for r in results}


def test_keep_best_marks_the_best_evaluation_and_max_to_keep_spares_it(small_data, tmp_path):
    run(
        small_data,
        tmp_path,
        "training.num_train_steps=6",
        "training.eval_log_every_n=1",
        "training.checkpoint_every_n=100",
        "training.checkpoint_max_to_keep=1",
        f"training.keep_best={{split: validation, task: {FAV}, metric: auroc}}",
    )
    values = eval_values(tmp_path, "validation", FAV, "auroc")
    best = max(values, key=values.get)
    marker = json.loads((tmp_path / "checkpoints/best.json").read_text())
    assert (marker["step"], marker["value"], marker["evaluated_step"]) == (best, values[best], 6)
    assert marker["evaluations_without_improvement"] == 6 - best
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == sorted({best, 6})


def scripted(values: dict[int, float]):
    """evaluate_splits, for the loop, giving each step's `values` as the AUROC of FAV on validation."""

    def evaluate(config, model, step, runtime):
        return {"validation": {FAV: {"auroc": values[step], "rce": 0.0, "ctr": 0.5}}}

    return evaluate


def test_early_stopping_after_patience_and_a_resumed_run_counts_from_the_marker(
    small_data, tmp_path, monkeypatch, caplog
):
    import heavyranker.train.loop as loop

    values = {1: 0.6, 2: 0.7, 3: 0.65, 4: 0.69, 5: 0.68, 6: 0.9}
    monkeypatch.setattr(loop, "evaluate_splits", scripted(values))
    best = f"training.keep_best={{split: validation, task: {FAV}, metric: auroc, patience: 2}}"
    every = ("training.eval_log_every_n=1", "training.checkpoint_every_n=100", "training.num_train_steps=8")
    with caplog.at_level("INFO"):
        run(small_data, tmp_path, *every, best)
    assert "stopping early at step 4: auroc of" in caplog.text
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [1, 2, 4]
    marker = json.loads((tmp_path / "checkpoints/best.json").read_text())
    assert (marker["step"], marker["evaluations_without_improvement"]) == (2, 2)

    caplog.clear()
    with caplog.at_level("INFO"):
        run(small_data, tmp_path, *every, best)  # the same patience: spent
    assert "stopped early at step 4: nothing to do" in caplog.text
    run(small_data, tmp_path, *every, best.replace("patience: 2", "patience: 3"))  # one more evaluation
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [1, 2, 4, 5]
    marker = json.loads((tmp_path / "checkpoints/best.json").read_text())
    assert (marker["step"], marker["evaluations_without_improvement"]) == (2, 3)


def test_a_resumed_run_does_not_count_the_evaluations_it_repeats(small_data, tmp_path, monkeypatch):
    import heavyranker.train.loop as loop

    monkeypatch.setattr(loop, "evaluate_splits", scripted({1: 0.6, 2: 0.7, 3: 0.65, 4: 0.69, 5: 0.8}))
    best = f"training.keep_best={{split: validation, task: {FAV}, metric: auroc, patience: 3}}"
    every = ("training.eval_log_every_n=1", "training.checkpoint_every_n=2")
    run(small_data, tmp_path, *every, best, "training.num_train_steps=4")
    (tmp_path / "checkpoints/step_4.pt").unlink()  # killed after evaluating step 4, before saving it
    run(small_data, tmp_path, *every, best, "training.num_train_steps=5")
    marker = json.loads((tmp_path / "checkpoints/best.json").read_text())
    assert (marker["step"], marker["evaluations_without_improvement"], marker["evaluated_step"]) == (5, 0, 5)
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [1, 2, 4, 5]


def test_a_full_disk_while_logging_is_one_line(small_data, tmp_path, capsys, monkeypatch):
    from heavyranker.train import logger

    def filling_disk(path, mode, **kwargs):
        return FullDisk(open(path, mode, **kwargs), room=0)

    monkeypatch.setattr(logger, "open", filling_disk, raising=False)
    capsys.readouterr()
    code = cli("train", small_data, tmp_path, "training.num_train_steps=4", "training.train_log_every_n=2")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"error: {tmp_path}/metrics.jsonl: cannot write the training log: No space left on device"
    )


def test_a_full_disk_anywhere_else_is_one_line(small_data, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "somewhere"))

    monkeypatch.setattr(Trainer, "restore", full)
    capsys.readouterr()
    assert cli("train", small_data, tmp_path, "training.num_train_steps=2") == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {tmp_path}/somewhere: No space left on device"


@pytest.mark.parametrize(
    "damage, problem",
    [
        ("optimizer", "its 'optimizer' is nothing, not of type dict"),
        ("step", "its 'step' is a str, not of type int"),
    ],
)
def test_a_checkpoint_that_cannot_be_resumed_is_one_line(small_data, tmp_path, capsys, damage, problem):
    # A checkpoint trimmed to its weights, or another program's: a KeyError's or a ValueError's traceback.
    assert cli("train", small_data, tmp_path, "training.num_train_steps=2") == 0
    path = tmp_path / "checkpoints/step_2.pt"
    state = load_checkpoint(path)
    if damage == "step":
        state["step"] = "two"
    else:
        del state[damage]
    torch.save(state, path)
    capsys.readouterr()
    assert cli("train", small_data, tmp_path, "training.num_train_steps=4") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"error: {path}: cannot resume from this checkpoint: {problem}")
