"""The demo's checks before it does anything: each refusal is one line and exit 2, and nothing was written;
and its table, on a short run (the demo itself trains for minutes: `make demo`)."""

import functools
import os

import pytest

from heavyranker.cli import main
from heavyranker.data.synthetic import generate_for_config
from heavyranker.demo import run as demo_module
from heavyranker.demo.run import MARKER, fresh_run_folder
from heavyranker.errors import UserError
from tests.conftest import CONFIGS, SMALL_SPLITS


def demo(tmp_path, capsys, *overrides: str) -> tuple[int, str, str]:
    """`heavyranker demo` on local_small, reading and writing under tmp_path only.
    Returns the exit code, stderr and stdout."""
    paths = [f"train_data.inputs={tmp_path}/data/train/*.gz", f"training.save_dir={tmp_path}/run"]
    paths += [f"validation_data.{s}.inputs={tmp_path}/data/{s}/*.gz" for s in SMALL_SPLITS]
    args = ["demo", "--config", str(CONFIGS / "local_small.yaml")]
    code = main([*args, *(a for p in [*paths, *overrides] for a in ("--set", p))])
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def assert_one_line(err: str, *parts: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(part in err for part in parts), err


def test_a_save_dir_the_demo_did_not_create_is_left_alone(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    code, err, _ = demo(tmp_path, capsys)
    assert code == 2
    assert_one_line(err, f"training.save_dir {tmp_path}/run", "pick another save_dir", "or remove it")
    assert os.listdir(tmp_path) == ["run"]  # no data generated either
    assert os.listdir(tmp_path / "run") == ["notes.txt"]


def test_a_config_without_a_plain_split_is_refused(tmp_path, capsys):
    code, err, _ = demo(tmp_path, capsys, "validation_data={}")
    assert code == 2
    assert_one_line(err, "validation_data: the demo compares with the planted truth on a split without")
    assert os.listdir(tmp_path) == []


def test_a_config_without_the_baseline_features_is_refused(tmp_path, capsys):
    renamed = (
        "{continuous: home_recap_2022_cont__segdense_vals, discrete: home_recap_2022_discrete__segdense_vals}"
    )
    code, err, _ = demo(tmp_path, capsys, f"train_data.seg_dense_schema.renamed_features={renamed}")
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


def test_the_demo_prints_the_model_beside_the_truth_and_both_baselines(tmp_path, capsys, monkeypatch):
    """A short run on 20,000 rows (enough for every task's baselines to see positives)."""
    small = functools.partial(generate_for_config, examples=20_000, files=2)
    monkeypatch.setattr(demo_module, "generate_for_config", small)
    steps = ("num_train_steps=20", "eval_log_every_n=10", "checkpoint_every_n=10", "train_log_every_n=5")
    code, err, out = demo(tmp_path, capsys, *(f"training.{s}" for s in steps))
    assert code == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("task"))
    assert [" ".join(cell.split()) for cell in lines[header].split("|")][1:] == [
        "model AUROC RCE",
        "best AUROC RCE",
        "logreg AUROC RCE",
        "LightGBM AUROC RCE",
        "RCE gap closed vs logreg vs LightGBM",
    ]
    rows = lines[header + 2 : header + 12]  # local_small's ten tasks
    first = ["is_favorited", "is_good_clicked_convo_desc_favorited_or_replied"]
    assert [row.split()[0] for row in rows][:2] == first
    assert all(row.count("|") == 5 for row in rows)
    checked = 0
    for j, row in enumerate(rows):
        cells = row.split("|")
        rate, positives = float(cells[0].split()[1]), int(cells[0].split()[2])
        assert abs(positives - rate * 2000) <= 0.1 + 1e-9  # of the 2,000 validation rows; rate to 4 places
        model_rce, best_rce = float(cells[1].split()[1]), float(cells[2].split()[1])
        lightgbm_auc, lightgbm_rce = map(float, cells[4].split())
        # The common task ranks well; a rare one has a handful of positives in the 2,000 validation rows.
        assert lightgbm_auc > 0.6 if j == 0 else 0.0 <= lightgbm_auc <= 1.0
        if best_rce - lightgbm_rce > 5:  # the printed figures are rounded: a wide gap only
            closed = 100 * (model_rce - lightgbm_rce) / (best_rce - lightgbm_rce)
            assert float(cells[5].split()[1].rstrip("%")) == pytest.approx(closed, rel=0.01, abs=1)
            checked += 1
    assert checked
    assert (tmp_path / "run" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
