"""training.promote: a training run promotes its checkpoints into a local repository as it goes (every N
steps, or every M minutes), in the training process, and goes on training; the config is checked."""

from __future__ import annotations

import json

import pytest

from heavyranker.cli import main
from heavyranker.config.loader import load_config
from heavyranker.errors import UserError
from heavyranker.release.follow import Promoter
from heavyranker.serve.repository import ModelRepository
from heavyranker.serve.scorer import MANIFEST
from heavyranker.train.loop import train
from tests.conftest import CONFIGS, SMALL_SPLITS, small_config

FAST = ("train_data.global_batch_size=64", "training.eval_log_every_n=1000", "training.train_log_every_n=100")


def promote_setting(repository, **fields) -> str:
    spec = {"repository": repository, "model_name": "ranker", "format": "pt2", "resamples": 100, **fields}
    inline = ", ".join(f"{k}: {v}" for k, v in spec.items())
    return f"training.promote={{{inline}}}"


def test_train_promotes_every_n_steps_and_goes_on(small_data, tmp_path):
    repository = tmp_path / "repo"
    sets = [f"train_data.inputs={small_data}/train/*.gz", f"training.save_dir={tmp_path / 'run'}", *FAST]
    sets += [f"validation_data.{s}.inputs={small_data}/{s}/*.gz" for s in SMALL_SPLITS]
    sets += [
        "training.num_train_steps=6",
        "training.checkpoint_every_n=2",
        promote_setting(repository, every_steps=4, format="onnx", precision="int8"),
    ]
    args = ["train", "--config", str(CONFIGS / "local_small.yaml")]
    assert main([*args, *(arg for value in sets for arg in ("--set", value))]) == 0
    decisions = ModelRepository(repository, "ranker").decisions()
    # Steps 2 and 6 are checkpoints but not due; step 4 is the candidate, into an empty repository.
    assert [d["candidate"]["step"] for d in decisions] == [4]
    assert decisions[0]["published"] and decisions[0]["version"] == 1
    manifest = json.loads((ModelRepository(repository, "ranker").version_folder(1) / MANIFEST).read_text())
    assert (manifest["program_format"], manifest["precision"]) == ("onnx", "int8")
    assert (tmp_path / "run" / "checkpoints" / "step_6.pt").is_file()  # training went on past it


def test_every_minutes_is_due_at_the_first_checkpoint_past_it(small_data, tmp_path):
    now = [0.0]
    config = small_config(small_data, tmp_path, promote_setting(tmp_path / "repo", every_minutes=2))
    promoter = Promoter(config, clock=lambda: now[0])
    assert not promoter.due(1000)
    now[0] = 119.0
    assert not promoter.due(1001)
    now[0] = 120.0
    assert promoter.due(1002)


@pytest.mark.parametrize(
    "setting, problem",
    [
        ("every_steps=3", "training.promote.every_steps: 3 is not a multiple of checkpoint_every_n (2)"),
        ("split=nope", "training.promote.split: nope is not a validation split"),
        ("tasks=[nope]", "training.promote.tasks: nope is not a task of model.tasks"),
        ("model_name=ranker", "give every_steps, every_minutes or both"),
        (
            "precision=bf16",
            "precision bf16 with format onnx: onnxruntime's CPU provider has no bf16 MatMul; set format: pt2",
        ),
    ],
)
def test_a_promote_setting_that_cannot_work_is_refused(tmp_path, setting, problem):
    field, value = setting.split("=")
    spec = f"training.promote={{repository: {tmp_path}, every_minutes: 1, {field}: {value}}}"
    if field == "model_name":
        spec = f"training.promote={{repository: {tmp_path}, {field}: {value}}}"
    with pytest.raises(UserError, match=problem.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(CONFIGS / "local_small.yaml", ["training.checkpoint_every_n=2", spec])


def test_a_promoting_run_keeps_no_decision_in_memory(small_data, tmp_path):
    # Was a list of every decision, which nothing read: it grew with each promotion of a run of weeks. The
    # decisions are in the repository's promotions.jsonl.
    repository = tmp_path / "repo"
    config = small_config(
        small_data,
        tmp_path / "run",
        *FAST,
        "training.num_train_steps=4",
        "training.checkpoint_every_n=2",
        promote_setting(repository, every_steps=2),
    )
    promoter = Promoter(config)
    held = {name: repr(value) for name, value in vars(promoter).items()}
    train(config, on_checkpoint=promoter)
    assert [d["candidate"]["step"] for d in ModelRepository(repository, "ranker").decisions()] == [2, 4]
    assert {name: repr(value) for name, value in vars(promoter).items() if name != "last_promotion"} == {
        name: value for name, value in held.items() if name != "last_promotion"
    }
