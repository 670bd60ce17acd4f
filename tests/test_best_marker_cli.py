"""`export` and `compare` on a run whose best.json has the wrong shape: one line naming the file, exit 2."""

import json

import pytest

from heavyranker.cli import main
from tests.conftest import CONFIGS, SMALL_SPLITS

SHAPES = [
    "[]",
    "{}",
    '"a string"',
    '{"step": 1}',  # keys missing
    json.dumps(
        {
            "step": "1",  # a wrong type
            "split": "validation",
            "task": "mean",
            "metric": "rce",
            "value": 1.0,
            "evaluations_without_improvement": 0,
            "evaluated_step": 1,
        }
    ),
]


def run_with_marker(folder, content: str):
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "best.json").write_text(content)
    return folder


def heavyranker(small_data, *args: str) -> int:
    sets = [f"train_data.inputs={small_data}/train/*.gz", "training.keep_best={split: validation}"]
    sets += [f"validation_data.{s}.inputs={small_data}/{s}/*.gz" for s in SMALL_SPLITS]
    return main(
        [*args, "--config", str(CONFIGS / "local_small.yaml"), *(a for s in sets for a in ("--set", s))]
    )


def one_line_naming(err: str, marker) -> bool:
    return err.count("\n") == 1 and err.startswith(f"error: {marker}: not a best-checkpoint marker (")


@pytest.mark.parametrize("content", SHAPES)
def test_export_of_a_run_whose_best_marker_has_the_wrong_shape_is_one_line(
    small_data, tmp_path, capsys, content
):
    run = run_with_marker(tmp_path / "run", content)
    capsys.readouterr()
    code = heavyranker(
        small_data, "export", "--out", str(tmp_path / "out"), "--set", f"training.save_dir={run}"
    )
    err = capsys.readouterr().err
    assert code == 2 and one_line_naming(err, run / "checkpoints" / "best.json"), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", SHAPES)
def test_compare_of_a_run_whose_best_marker_has_the_wrong_shape_is_one_line(
    small_data, tmp_path, capsys, content
):
    run_a = run_with_marker(tmp_path / "a", content)
    capsys.readouterr()
    assert heavyranker(small_data, "compare", str(run_a), str(run_a)) == 2
    err = capsys.readouterr().err
    assert one_line_naming(err, run_a / "checkpoints" / "best.json"), err
