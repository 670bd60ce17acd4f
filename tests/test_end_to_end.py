"""local_small from generated data to metrics, through the command line."""

import json

from heavyranker.cli import main
from heavyranker.config import load_config
from heavyranker.data.synthetic import generate_for_config
from tests.conftest import CONFIGS, SMALL_SPLITS

COMMON = ("recap.engagement.is_favorited", "recap.engagement.is_video_playback_50")


def test_train_then_evaluate_learns_the_common_tasks(tmp_path, capsys):
    generate_for_config(
        load_config(CONFIGS / "local_small.yaml"), out=str(tmp_path / "data"), examples=20000, files=4, seed=1
    )
    overrides = [
        f"train_data.inputs={tmp_path}/data/train/*.gz",
        f"training.save_dir={tmp_path}/run",
        "training.num_train_steps=300",
        "training.eval_log_every_n=1000",
        "training.checkpoint_every_n=1000",
    ]
    overrides += [f"validation_data.{s}.inputs={tmp_path}/data/{s}/*.gz" for s in SMALL_SPLITS]
    args = sum((["--set", o] for o in overrides), [])
    assert main(["train", "--config", str(CONFIGS / "local_small.yaml"), *args]) == 0
    # Where the run went, for the next command.
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"run folder {tmp_path}/run: checkpoints/ (newest step_300.pt), metrics.jsonl, eval/, tensorboard/"
    )
    assert main(["evaluate", "--config", str(CONFIGS / "local_small.yaml"), *args]) == 0
    metrics = json.loads((tmp_path / "run/eval/validation/step_300.json").read_text())["metrics"]
    assert metrics[COMMON[0]]["num_examples"] == 2000
    assert metrics[COMMON[0]]["auroc"] > 0.62
    assert metrics[COMMON[1]]["auroc"] > 0.8
