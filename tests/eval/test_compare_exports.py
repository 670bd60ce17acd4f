"""`compare` with an exported model folder for a run: scored as its program. The fp32 export of a run's
checkpoint scores as the run does (export checks that its program computes the checkpoint's function); its
int8 export is scored as its own program, which rounding moves off the fp32 one."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from heavyranker.cli import main
from heavyranker.errors import UserError
from heavyranker.eval.compare import compare_runs
from heavyranker.serve.export import export_model
from heavyranker.serve.scorer import MANIFEST
from heavyranker.serve.served_program import exported_program
from heavyranker.train.loop import Trainer
from tests.conftest import CONFIGS, SMALL_SPLITS, small_config

RUN = ("training.num_train_steps=20", "training.checkpoint_every_n=20", "train_data.global_batch_size=64")
QUIET = ("training.eval_log_every_n=1000", "training.train_log_every_n=100")


@pytest.fixture(scope="module")
def exports(small_data, tmp_path_factory):
    """A short run, and its checkpoint exported in fp32 and int8 (ONNX)."""
    run = tmp_path_factory.mktemp("run")
    config = small_config(small_data, run, *RUN, *QUIET)
    Trainer(config).run()
    out = tmp_path_factory.mktemp("exports")
    fp32 = export_model(config, checkpoint=str(run), out=str(out / "fp32"))
    int8 = export_model(config, checkpoint=str(run), out=str(out / "int8"), precision="int8")
    return config, run, fp32, int8


def test_an_fp32_export_scores_as_its_run(small_data, exports, capsys):
    config, run, fp32, _ = exports
    sets = [f"train_data.inputs={small_data}/train/*.gz", *RUN, *QUIET]
    sets += [f"validation_data.{s}.inputs={small_data}/{s}/*.gz" for s in SMALL_SPLITS]
    args = ["compare", str(run), str(fp32), "--config", str(CONFIGS / "local_small.yaml")]
    assert main([*args, "--resamples", "100", *(arg for value in sets for arg in ("--set", value))]) == 0
    assert capsys.readouterr().out.startswith("split validation\n")
    rows = compare_runs(config, str(run), str(fp32), resamples=100, exported=exported_program)
    for row in rows:
        for metric in ("auroc", "rce"):
            assert row[metric].b == pytest.approx(row[metric].a, rel=1e-6, abs=1e-4, nan_ok=True)


def test_an_int8_export_is_scored_as_its_own_program(exports):
    config, _, fp32, int8 = exports
    rows = compare_runs(config, str(fp32), str(int8), resamples=100, exported=exported_program)
    # Rounding moves every defined RCE (the checkpoint's fp32 function scored twice would move none).
    assert all(row["rce"].b != row["rce"].a for row in rows if not math.isnan(row["rce"].a))


def test_without_the_loader_an_exported_folder_is_not_a_run(exports):
    config, run, fp32, _ = exports
    with pytest.raises(UserError, match="checkpoint"):
        compare_runs(config, str(run), str(fp32), resamples=100)


def test_a_program_that_reads_another_shape_is_refused_before_scoring(exports, tmp_path):
    config, run, fp32, _ = exports
    doctored = tmp_path / "doctored"
    shutil.copytree(fp32, doctored)
    manifest = json.loads((doctored / MANIFEST).read_text())
    manifest["inputs"][0]["shape"] = [manifest["inputs"][0]["shape"][0] + 1]
    (doctored / MANIFEST).write_text(json.dumps(manifest))
    name = manifest["inputs"][0]["name"]
    with pytest.raises(UserError, match=f"reads features the split does not have in that shape: {name} "):
        compare_runs(config, str(run), str(doctored), resamples=100, exported=exported_program)
