import logging
import os
import subprocess
import sys

import pytest

from heavyranker.cli import log_level
from tests.conftest import CONFIGS, REPO, SMALL_SPLITS


@pytest.mark.parametrize(
    "rank, verbose, level",
    [
        (None, False, logging.INFO),
        (None, True, logging.DEBUG),
        ("0", True, logging.DEBUG),
        ("1", False, logging.WARNING),
        ("3", True, logging.WARNING),  # every rank would print the same debug lines
    ],
)
def test_only_rank_0_logs_progress(monkeypatch, rank, verbose, level):
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    assert log_level(verbose) == level


def heavyranker(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "heavyranker", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("where", ["under-a-file", "a-file", "a-folder", "a-folder-at-a-files-name"])
def test_an_output_path_in_the_way_is_one_line_naming_it(tmp_path, small_data, where):
    """--out under a file, at a file, or a file's name that is a folder: the path, what the system said and
    what to do, exit 2, no traceback; the file in the way is left as it was. (train's save_dir has a message
    of its own, naming the setting: tests/train/test_run_folder_cli.py.)"""
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("kept")
    sets = [f"train_data.inputs={small_data}/train/*.gz"]
    sets += [f"validation_data.{s}.inputs={small_data}/{s}/*.gz" for s in SMALL_SPLITS]
    config = ["--config", str(CONFIGS / "local_small.yaml"), *(a for s in sets for a in ("--set", s))]
    space = tmp_path / "space.yaml"
    space.write_text(
        "objective: {split: validation}\nparams: {model.multi_task_type: {choices: [share_all]}}\n"
    )
    args, expected = {
        "under-a-file": (
            ["data", "generate", *config, "--examples", "100", "--files", "1", "--out", f"{in_the_way}/run"],
            f"{in_the_way}/run: Not a directory (a file stands where one of its folders should be)",
        ),
        "a-file": (
            ["tune", *config, "--space", str(space), "--trials", "1", "--out", str(in_the_way)],
            f"{in_the_way}: File exists (a file stands where a folder is needed)",
        ),
        "a-folder": (
            ["data", "stats", *config, "--batches", "1", "--out", str(tmp_path)],
            f"data stats: --out {tmp_path} is a folder; give the name of a file to write",
        ),
        "a-folder-at-a-files-name": (
            ["data", "convert", *config, "--to", "parquet", "--out", str(tmp_path / "out")],
            f"{tmp_path}/out/part-00000.parquet: Is a directory (give the name of a file, not of a folder)",
        ),
    }[where]
    (tmp_path / "out" / "part-00000.parquet").mkdir(parents=True)
    done = heavyranker(*args)
    assert (done.returncode, done.stderr.splitlines()[-1]) == (2, f"error: {expected}")
    assert "Traceback" not in done.stderr
    assert in_the_way.read_text() == "kept"


@pytest.mark.parametrize("nproc", ["-1", str(10**5)])
def test_nproc_out_of_range_is_one_line_before_anything_starts(tmp_path, nproc):
    done = heavyranker("train", "--config", str(CONFIGS / "local_small.yaml"), "--nproc", nproc)
    most = 4 * os.cpu_count()
    expected = f"error: train: --nproc is {nproc}; 0 or 1 is one process, more at most {most} (4 per core)"
    assert (done.returncode, done.stderr) == (2, expected + "\n")


@pytest.mark.parametrize("value", ["nan", "-inf"])
def test_a_number_flag_takes_finite_numbers_only(tmp_path, value):
    """promote --tolerance nan passed `tolerance < 0` and then `high < -tolerance` was never true: every
    candidate would have been published."""
    args = ["promote", "--config", str(CONFIGS / "local_small.yaml"), "--repository", str(tmp_path)]
    done = heavyranker(*args, f"--tolerance={value}")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].endswith(f"argument --tolerance: '{value}' is not a finite number")
    assert list(tmp_path.iterdir()) == []
