"""The evaluator: metrics against sklearn on the same predictions, stratifiers, result files, --watch."""

import json
import shutil
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from heavyranker.cli import main
from heavyranker.data.columns import feature_specs
from heavyranker.data.dataset import RecapDataset
from heavyranker.errors import UserError
from heavyranker.eval import evaluator
from heavyranker.eval.evaluator import evaluate_command, watch_checkpoints
from heavyranker.run_folder import RunFolder
from heavyranker.runtime import init_runtime
from heavyranker.train.loop import Trainer
from tests.conftest import CONFIGS, SMALL_SPLITS, small_config
from tests.data.test_damaged_records import write_small_records
from tests.train.test_memory_fit import failing_allocation, last_line

FAV = "recap.engagement.is_favorited"
FAST = ("train_data.global_batch_size=64", "training.eval_log_every_n=1000", "training.train_log_every_n=10")


@pytest.fixture(scope="module")
def trained(small_data, tmp_path_factory):
    """A run of 4 steps with checkpoints at steps 2 and 4."""
    save_dir = tmp_path_factory.mktemp("run")
    Trainer(
        small_config(
            small_data, save_dir, *FAST, "training.num_train_steps=4", "training.checkpoint_every_n=2"
        )
    ).run()
    return save_dir


def test_metrics_equal_sklearn_on_the_same_predictions_with_the_split_weights(small_data, trained):
    config = small_config(small_data, trained, *FAST)
    results = evaluate_command(config, checkpoint=None, watch=False, split="validation_downsampled")
    trainer = Trainer(config)
    trainer.restore()
    model = trainer.model.eval()
    probs, labels, weights = [], [], []
    column = model.task_names.index(FAV)
    with torch.no_grad():
        for batch in RecapDataset(config.validation_data["validation_downsampled"]):
            probs.append(model(batch.features)["calibrated_probabilities"][:, column])
            [label_column] = batch.columns([FAV])
            labels.append(batch.labels[:, label_column])
            weights.append(batch.weights[:, label_column])
    probs, labels, weights = (torch.cat(x).double().numpy() for x in (probs, labels, weights))
    assert len(np.unique(weights)) == 2  # the split's downsampling is undone by its weights
    metrics = results["validation_downsampled"][FAV]
    assert metrics["auroc"] == pytest.approx(roc_auc_score(labels, probs, sample_weight=weights), abs=1e-9)
    assert metrics["ctr"] == pytest.approx(np.average(labels, weights=weights), rel=1e-9)
    assert metrics["num_examples"] == len(labels)
    saved = json.loads(RunFolder(config.training.save_dir).result("validation_downsampled", 4).read_text())
    assert saved["metrics"][FAV]["auroc"] == pytest.approx(metrics["auroc"])


def test_damaged_records_are_skipped_and_what_reading_met_is_reported(small_data, trained, tmp_path, caplog):
    expected = write_small_records(tmp_path / "part-0.gz", 100)
    config = small_config(
        small_data,
        tmp_path / "run",
        *FAST,
        f"validation_data.validation.inputs={tmp_path}/*.gz",
        "validation_data.validation.ignore_data_errors=true",
    )
    with caplog.at_level("INFO"):
        results = evaluate_command(
            config, checkpoint=str(trained / "checkpoints/step_4.pt"), watch=False, split="validation"
        )
    assert results["validation"][FAV]["num_examples"] == 80
    saved = RunFolder(config.training.save_dir).result("validation", 4)
    assert json.loads(saved.read_text())["data"] == expected
    assert (
        "evaluation of validation: defaults_filled=10 (meta.user_id=10), damaged_files=0, skipped_records=20"
        in caplog.messages
    )


def test_stratified_metrics_cover_the_matching_rows(small_data, trained):
    config = small_config(
        small_data, trained, *FAST, "model.stratifiers=[{name: first_is_zero, index: 0, value: 0}]"
    )
    results = evaluate_command(
        config, checkpoint=str(trained / "checkpoints/step_2.pt"), watch=False, split="validation"
    )["validation"]
    matching = sum(
        int((b.features["discrete"][:, 0] == 0).sum())
        for b in RecapDataset(config.validation_data["validation"])
    )
    assert 0 < matching < results[FAV]["num_examples"]
    assert results[f"{FAV}/first_is_zero"]["num_examples"] == matching


def test_watch_evaluates_each_checkpoint_once_as_it_appears(small_data, trained, tmp_path):
    config = small_config(small_data, tmp_path, *FAST, "training.num_train_steps=4")
    trainer = Trainer(config)

    def publish():
        for step in (2, 4):
            time.sleep(0.3)
            (tmp_path / "checkpoints").mkdir(exist_ok=True)
            shutil.copy(trained / f"checkpoints/step_{step}.pt", tmp_path / f"checkpoints/.tmp{step}")
            (tmp_path / f"checkpoints/.tmp{step}").rename(tmp_path / f"checkpoints/step_{step}.pt")

    writer = threading.Thread(target=publish)
    writer.start()
    evaluated = watch_checkpoints(config, trainer.model.eval(), init_runtime(), None, poll_seconds=0.05)
    writer.join()
    assert evaluated == [2, 4]
    run = RunFolder(config.training.save_dir)
    assert all(run.result(s, step).exists() for s in SMALL_SPLITS for step in (2, 4))
    # A restarted evaluator finds everything done and stops at once.
    assert watch_checkpoints(config, trainer.model, init_runtime(), None, poll_seconds=0.05) == []


def test_watch_stops_after_the_timeout_without_checkpoints(small_data, tmp_path):
    config = small_config(small_data, tmp_path, *FAST, "training.eval_timeout_in_s=0.2")
    started = time.monotonic()
    assert watch_checkpoints(config, Trainer(config).model, init_runtime(), None, poll_seconds=0.05) == []
    assert time.monotonic() - started >= 0.2


def test_unknown_split_is_a_user_error(small_data, trained, capsys):
    args = [
        "evaluate",
        "--config",
        str(CONFIGS / "local_small.yaml"),
        "--set",
        f"training.save_dir={trained}",
        "--split",
        "nope",
    ]
    assert main(args) == 2
    assert "no validation split 'nope'" in capsys.readouterr().err


def test_a_checkpoint_of_another_model_says_what_to_give(small_data, trained, capsys):
    # Was only the list of misfits, which did not say that the config was of another model.
    tower = f"model.tasks.{FAV}.mlp_config.layer_sizes=[16, 1]"
    config = ["--config", str(CONFIGS / "local_small.yaml"), "--set", f"training.save_dir={trained}"]
    assert main(["evaluate", *config, "--set", tower]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {trained}/checkpoints/step_4.pt does not fit this model: ")
    assert err.endswith(
        " (a checkpoint of another model: give the config it was trained with, or --checkpoint)\n"
    )
    assert err.count("\n") == 1


def test_watch_refuses_an_unknown_split_before_waiting_for_checkpoints(small_data, tmp_path):
    # It waited eval_timeout_in_s for a checkpoint, then stopped without a word (0.2 s here, else the test
    # would wait as long before the fix).
    config = small_config(small_data, tmp_path, *FAST, "training.eval_timeout_in_s=0.2")
    with pytest.raises(UserError, match=r"^no validation split 'nope' \(the config has validation, "):
        evaluate_command(config, checkpoint=None, watch=True, split="nope")


def running_out_of_memory(build):
    """`build` (a build_model), whose models' forward fails to allocate, as a real allocator refuses."""

    def build_model(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_hook(failing_allocation)
        return model

    return build_model


def test_an_out_of_memory_is_one_line_naming_the_setting(small_data, trained, monkeypatch, capsys):
    monkeypatch.setattr(evaluator, "build_model", running_out_of_memory(evaluator.build_model))
    sets = [f"train_data.inputs={small_data}/train/*.gz", f"training.save_dir={trained}"]
    sets += [f"validation_data.{s}.inputs={small_data}/{s}/*.gz" for s in SMALL_SPLITS]
    argv = ["evaluate", "--config", str(CONFIGS / "local_small.yaml")]
    argv += [arg for value in sets for arg in ("--set", value)]
    assert main([*argv, "--split", "validation"]) == 2
    assert last_line(capsys) == (
        f"error: out of memory evaluating {trained / 'checkpoints' / 'step_4.pt'}; "
        "lower validation_data.validation.global_batch_size"
    )
    assert main(argv) == 2
    assert last_line(capsys).endswith("; lower validation_data.<split>.global_batch_size")


def test_a_step_in_another_scripts_digits_is_not_a_checkpoint(small_data, trained, tmp_path):
    """int() reads '١٠' (Arabic-Indic digits) as 10: a file step_١٠.pt must not pass for the newest
    checkpoint, nor its evaluation be written as step 10's."""
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(trained / "checkpoints/step_2.pt", tmp_path / "checkpoints/step_2.pt")
    shutil.copy(trained / "checkpoints/step_4.pt", tmp_path / "checkpoints/step_\u0661\u0660.pt")
    config = small_config(small_data, tmp_path, *FAST)
    assert [step for step, _ in RunFolder(tmp_path).list_checkpoints()] == [2]
    evaluate_command(config, checkpoint=None, watch=False, split="validation")
    assert sorted(p.name for p in (tmp_path / "eval/validation").iterdir()) == ["step_2.json"]


def latest_config(small_data: Path, tmp_path: Path, end: str):
    """local_small, its validation split in hour folders under tmp_path/hours ending at `end`."""
    dated = f"{{data_root: {tmp_path / 'hours'}, end_datetime: {end}, hours: 1}}"
    overrides = ["validation_data.validation.inputs=null"]
    overrides += [f"validation_data.validation.explicit_datetime_inputs={dated}"]
    return small_config(small_data, tmp_path / "run", *overrides)


def seeded_model(config):
    from heavyranker.model import build_model

    torch.manual_seed(0)
    return build_model(config.model, feature_specs(config.train_data)).eval()


def evaluate_latest_on_a_rank(small_data: Path, tmp_path: Path) -> None:
    """evaluate_split of a split ending at latest, each rank's listing finding another newest hour: rank
    0's came before hour 01 landed, rank 1's after."""
    from heavyranker.data.sources import files

    runtime = init_runtime()
    config = latest_config(small_data, tmp_path, "latest")
    hour = datetime(2023, 1, 1, runtime.rank)
    root = tmp_path / "hours"
    files.newest_dated_folder = lambda *args: (hour, f"{root}/{files.folder_name(hour, hours=True)}")
    data = config.validation_data["validation"]
    results, _ = evaluator.evaluate_split(config, seeded_model(config), data, runtime)
    (tmp_path / f"rank_{runtime.rank}.json").write_text(json.dumps(results))


def test_the_ranks_read_the_latest_folders_rank_0_finds(small_data, tmp_path):
    """Each rank finding its own `latest`, a folder landing between two ranks' listings gave them other
    folders, and each its share (files[rank::world]) of other lists."""
    from tests.test_runtime import on_two_ranks

    validation = sorted((small_data / "validation").glob("*.gz"))
    for hour, paths in (("00", validation), ("01", validation[:1])):
        (tmp_path / f"hours/2023/01/01/{hour}").mkdir(parents=True)
        for path in paths:
            shutil.copy(path, tmp_path / f"hours/2023/01/01/{hour}")
    on_two_ranks(evaluate_latest_on_a_rank, small_data, tmp_path, logs=tmp_path / "logs")
    # Hour 00 alone, in one process: what both ranks together must have found.
    config = latest_config(small_data, tmp_path, "2023-01-01T00")
    data = config.validation_data["validation"]
    single, _ = evaluator.evaluate_split(config, seeded_model(config), data, init_runtime())
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank_{rank}.json").read_text()) == json.loads(json.dumps(single))
