"""`train` on a run folder that holds what it did not write: links at the files it writes, a best.json of the
wrong shape, and keep_best on a split whose tasks have no positives."""

import json
import logging

import pytest

import heavyranker.train.loop as loop
from tests.train.test_loop import FAV, cli

EVERY_STEP = (
    "training.num_train_steps=2",
    "training.eval_log_every_n=1",
    "training.checkpoint_every_n=1",
)
KEEP_BEST = "training.keep_best={split: validation}"
PRECIOUS = b"precious"


@pytest.mark.parametrize(
    "name", ["train.lock", "metrics.jsonl", "checkpoints/best.json", "eval/validation/step_1.json"]
)
def test_a_link_where_train_writes_is_one_line_and_the_file_it_points_at_is_unchanged(
    small_data, tmp_path, capsys, name
):
    run, victim = tmp_path / "run", tmp_path / "victim"
    victim.write_bytes(PRECIOUS)
    (run / name).parent.mkdir(parents=True)
    (run / name).symlink_to(victim)
    capsys.readouterr()
    assert cli("train", small_data, run, *EVERY_STEP, KEEP_BEST) == 2
    err = capsys.readouterr().err  # the progress bar, then the error
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert (
        last == f"error: {run / name}: a symbolic link, which heavyranker does not write through; remove it"
    )
    assert victim.read_bytes() == PRECIOUS


@pytest.mark.parametrize("content", ["[]", "{}", '"a string"', '{"step": 1}', "not json"])
def test_train_replaces_a_best_marker_of_the_wrong_shape_and_says_so(small_data, tmp_path, caplog, content):
    marker = tmp_path / "checkpoints" / "best.json"
    marker.parent.mkdir()
    marker.write_text(content)
    with caplog.at_level(logging.WARNING):
        assert cli("train", small_data, tmp_path, *EVERY_STEP, KEEP_BEST) == 0
    [warning] = [r.getMessage() for r in caplog.records if "best.json" in r.getMessage()]
    assert warning.startswith(f"{marker}: not a best marker (")
    assert warning.endswith("): replaced at the next evaluation")
    written = json.loads(marker.read_text())
    assert (written["split"], written["task"], written["evaluated_step"]) == ("validation", "mean", 2)


def scripted(metrics_by_step: dict[int, dict[str, dict[str, float]]]):
    """evaluate_splits for the loop: the validation split's metrics at each step."""

    def evaluate(config, model, step, runtime):
        return {"validation": metrics_by_step[step]}

    return evaluate


NONE = {"auroc": float("nan"), "rce": float("nan"), "ctr": 0.0}  # no positives in the split


def defined(auroc: float) -> dict[str, float]:
    return {"auroc": auroc, "rce": 1.0, "ctr": 0.25}


def test_the_mean_leaves_out_a_task_without_positives_warns_once_and_patience_counts_the_rest(
    small_data, tmp_path, monkeypatch, caplog
):
    other = "recap.engagement.is_replied"
    values = {1: 0.6, 2: 0.7, 3: 0.8, 4: 0.75}
    monkeypatch.setattr(
        loop, "evaluate_splits", scripted({s: {FAV: defined(v), other: NONE} for s, v in values.items()})
    )
    best = "training.keep_best={split: validation, metric: auroc, patience: 2}"
    with caplog.at_level(logging.WARNING):
        assert cli("train", small_data, tmp_path, *EVERY_STEP, "training.num_train_steps=4", best) == 0
    marker = json.loads((tmp_path / "checkpoints" / "best.json").read_text())
    assert (marker["step"], marker["value"], marker["evaluations_without_improvement"]) == (3, 0.8, 1)
    warned = [r.getMessage() for r in caplog.records if "keep_best" in r.getMessage()]
    assert warned == [
        f"training.keep_best: auroc is undefined on validation for {other}; the mean leaves it out"
    ]


@pytest.mark.parametrize("task", ["mean", FAV])
def test_keep_best_on_a_split_without_positives_for_its_task_is_refused_naming_it(
    small_data, tmp_path, monkeypatch, capsys, task
):
    monkeypatch.setattr(loop, "evaluate_splits", scripted({1: {FAV: NONE}}))
    best = f"training.keep_best={{split: validation, task: {task}, metric: auroc, patience: 2}}"
    capsys.readouterr()
    assert cli("train", small_data, tmp_path, *EVERY_STEP, best) == 2
    err = capsys.readouterr().err  # the progress bar, then the error
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"error: training.keep_best: auroc of {task} on validation can never be defined, as every evaluation "
        f"reads the same examples and they hold one class only ({FAV}: no positives); choose another task or "
        "split (train resumes from the newest checkpoint)"
    )


@pytest.mark.parametrize(
    "name, is_folder, problem",
    [
        ("", False, "cannot take the run folder (training.save_dir): File exists"),
        ("train.lock", True, "cannot take the run folder (training.save_dir): Is a directory"),
        ("metrics.jsonl", True, "cannot write the training log there: Is a directory"),
        ("tensorboard", False, "cannot write the training log there: File exists"),
    ],
)
def test_a_file_or_folder_where_train_wants_the_other_is_one_line(
    small_data, tmp_path, capsys, name, is_folder, problem
):
    # A save_dir that is a file, a folder at train.lock: tracebacks (the CLI takes a full disk's OSError).
    run = tmp_path / "run"
    taken = run / name  # the run folder itself for ""
    taken.parent.mkdir(exist_ok=True)
    taken.mkdir() if is_folder else taken.write_bytes(PRECIOUS)
    capsys.readouterr()
    assert cli("train", small_data, run, "training.num_train_steps=1") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == f"error: {taken}: {problem}"
