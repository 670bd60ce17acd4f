"""The demo's checks before it does anything: each refusal is one line and exit 2, and nothing was written.
(The demo itself trains for minutes: `make demo`.)"""

import os

import numpy as np
import pytest

from heavyranker import demo as demo_module
from heavyranker.cli import main
from heavyranker.config import load_config
from heavyranker.demo import MARKER, fresh_run_folder
from heavyranker.errors import UserError
from tests.conftest import CONFIGS, SMALL_SPLITS


def demo(tmp_path, capsys, *overrides: str) -> tuple[int, str]:
    """`heavyranker demo` on local_small, reading and writing under tmp_path only."""
    paths = [f"train_data.inputs={tmp_path}/data/train/*.gz", f"training.save_dir={tmp_path}/run"]
    paths += [f"validation_data.{s}.inputs={tmp_path}/data/{s}/*.gz" for s in SMALL_SPLITS]
    args = ["demo", "--config", str(CONFIGS / "local_small.yaml")]
    code = main([*args, *(a for p in [*paths, *overrides] for a in ("--set", p))])
    return code, capsys.readouterr().err


def assert_one_line(err: str, *parts: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(part in err for part in parts), err


def test_a_save_dir_the_demo_did_not_create_is_left_alone(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    code, err = demo(tmp_path, capsys)
    assert code == 2
    assert_one_line(err, f"training.save_dir {tmp_path}/run", "pick another save_dir", "or remove it")
    assert os.listdir(tmp_path) == ["run"]  # no data generated either
    assert os.listdir(tmp_path / "run") == ["notes.txt"]


def test_a_config_without_a_plain_split_is_refused(tmp_path, capsys):
    code, err = demo(tmp_path, capsys, "validation_data={}")
    assert code == 2
    assert_one_line(err, "validation_data: the demo compares with the planted truth on a split without")
    assert os.listdir(tmp_path) == []


def test_a_config_without_the_baseline_features_is_refused(tmp_path, capsys):
    renamed = (
        "{continuous: home_recap_2022_cont__segdense_vals, discrete: home_recap_2022_discrete__segdense_vals}"
    )
    code, err = demo(tmp_path, capsys, f"train_data.seg_dense_schema.renamed_features={renamed}")
    assert code == 2
    assert_one_line(err, "train_data.seg_dense_schema: no feature binary")
    assert os.listdir(tmp_path) == []


def test_the_demo_clears_the_folder_it_created_and_only_that(tmp_path):
    run = tmp_path / "runs" / "demo"
    fresh_run_folder(run)
    assert os.listdir(run) == [MARKER]
    (run / "checkpoints").mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    fresh_run_folder(run)  # the demo's own: emptied
    assert os.listdir(run) == [MARKER]

    (run / MARKER).unlink()
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="exists and was not created by the demo"):
        fresh_run_folder(run)
    assert os.listdir(run) == ["metrics.jsonl"]


def test_an_empty_folder_or_a_file_in_the_way(tmp_path):
    (tmp_path / "empty").mkdir()
    fresh_run_folder(tmp_path / "empty")  # nothing to lose
    assert os.listdir(tmp_path / "empty") == [MARKER]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and was not created by the demo"):
        fresh_run_folder(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


def test_a_task_with_a_single_label_names_itself_before_the_baseline_is_fit(monkeypatch):
    config = load_config(CONFIGS / "local_small.yaml")
    labels = np.tile([[0.0], [1.0]], (50, len(config.task_names)))
    labels[:, 3] = 0.0
    features = np.random.default_rng(0).normal(size=(100, 4))
    monkeypatch.setattr(demo_module, "_read", lambda config, data, limit: (features, labels))
    with pytest.raises(UserError, match=rf"^{config.task_names[3]}: the first 100 training examples hold a"):
        demo_module._logistic_regression(config, "validation")
