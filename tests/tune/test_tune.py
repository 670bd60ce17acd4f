"""`heavyranker tune` end to end on local_small with a few steps: a planted good setting is found, best.yaml
is a config train accepts, the report, and a killed study resumes."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from heavyranker.cli import main
from heavyranker.config import load_config
from heavyranker.errors import UserError
from heavyranker.model import module_name
from heavyranker.run_folder import RunFolder, list_checkpoints
from heavyranker.train.loop import Trainer
from heavyranker.tune.space import read_space
from heavyranker.tune.study import STUDY_NAME, TrialObjective, TuneOptions, run_tune
from tests.conftest import REPO, SMALL_SPLITS, small_config
from tests.tune.test_space import CONFIG, MMOE, PLE, TOWER_LR, data_overrides

SENSIBLE, TOO_SMALL = 0.006, 0.0006  # local_small's tower peak, and a tenth of it
STEPS = ["training.num_train_steps=40", "training.eval_log_every_n=20", "training.checkpoint_every_n=20"]


def tune_options(tmp_path: Path, data: Path, trials: int, heartbeat: int = 30) -> TuneOptions:
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "objective": {"split": "validation", "metric": "rce", "tasks": "mean"},
                "params": {TOWER_LR: {"choices": [TOO_SMALL, SENSIBLE]}},
            }
        )
    )
    overrides = [*data_overrides(data), *STEPS]
    return TuneOptions(str(CONFIG), overrides, str(space), trials, tmp_path / "out", heartbeat=heartbeat)


def load(out: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")


def test_a_planted_good_learning_rate_is_found(tmp_path, small_data, capsys):
    options = tune_options(tmp_path, small_data, trials=3)
    best = run_tune(options)
    trials = load(options.out).get_trials(states=(TrialState.COMPLETE,))
    by_rate = {
        rate: [t.value for t in trials if t.params[TOWER_LR] == rate] for rate in (TOO_SMALL, SENSIBLE)
    }
    assert by_rate[TOO_SMALL] and by_rate[SENSIBLE], f"the seeded sampler tried one rate only: {by_rate}"
    assert max(by_rate[TOO_SMALL]) < min(by_rate[SENSIBLE])  # the planted setting really is better
    assert best is not None and best.params[TOWER_LR] == SENSIBLE
    for trial in trials:  # each a run folder of its own, evaluated on the objective's split at its last step
        assert (options.out / "trials" / str(trial.number) / "eval" / "validation" / "step_40.json").is_file()

    # best.yaml: a plain config that train accepts, with the best rate in every tower and save_dir as it was
    config = load_config(options.out / "best.yaml")
    towers = config.optimizer.multi_task_learning_rates.tower_learning_rates
    assert {lr.linear_ramp_to_cosine.learning_rate for lr in towers.values()} == {SENSIBLE}
    assert config.training.save_dir == load_config(CONFIG).training.save_dir

    capsys.readouterr()
    assert main(["tune", "--report", "--out", str(options.out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("COMPLETE") == 3 and TOWER_LR in printed.split("importances")[1]
    assert (options.out / "report.png").stat().st_size > 0


def test_report_with_fewer_than_two_complete_trials_says_so(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    study = optuna.create_study(storage=f"sqlite:///{out / 'study.db'}", study_name=STUDY_NAME)
    study.add_trial(
        optuna.create_trial(
            value=1.0, params={"x": 1.0}, distributions={"x": optuna.distributions.FloatDistribution(0, 2)}
        )
    )
    assert main(["tune", "--report", "--out", str(out)]) == 0
    assert "importances: need 2 complete trials, the study has 1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "storage, why",
    [
        (None, "file is not a database"),  # OUT/study.db holds something else
        ("sqlite:///{tmp}/no/such/folder/x.db", "unable to open database file"),
        ("nosuchdialect://host/db", "Can't load plugin: sqlalchemy.dialects:nosuchdialect"),
    ],
    ids=["not-a-database", "no-folder", "unknown-dialect"],
)
def test_a_storage_that_cannot_be_opened_is_one_line_naming_it(tmp_path, small_data, capsys, storage, why):
    out = tmp_path / "out"
    out.mkdir()
    (out / "study.db").write_text("not sqlite")
    url = storage.format(tmp=tmp_path) if storage else f"sqlite:///{out / 'study.db'}"
    given = ["--storage", url] if storage else []
    options = tune_options(tmp_path, small_data, 1)
    tune = ["tune", "--config", options.config, "--space", options.space, "--trials", "1", "--out", str(out)]
    tune += [arg for value in options.overrides for arg in ("--set", value)]
    for args in (tune + given, ["tune", "--report", "--out", str(out), *given]):
        assert main(args) == 2
        assert capsys.readouterr().err == f"error: tune: cannot open the study's storage {url}: {why}\n"
    assert (out / "study.db").read_text() == "not sqlite"
    assert not (out / "trials").exists()


def test_a_study_of_another_search_space_is_refused(tmp_path, small_data):
    """Its trials would count towards --trials, and its best (drawn over other parameters) would be written
    to best.yaml as this space's best: the config without any setting, under another trial's value."""
    options = tune_options(tmp_path, small_data, 1)
    options.out.mkdir()
    seed = optuna.distributions.IntDistribution(0, 9)
    other = {"objective": ["validation", "rce", "mean"], "params": {"training.seed": {"name": "x"}}}
    study = optuna.create_study(storage=f"sqlite:///{options.out / 'study.db'}", study_name=STUDY_NAME)
    study.set_user_attr("space", other)
    study.add_trial(
        optuna.create_trial(value=1.0, params={"training.seed": 3}, distributions={"training.seed": seed})
    )
    with pytest.raises(UserError) as error:
        run_tune(options)
    assert str(error.value) == (
        f"sqlite:///{options.out / 'study.db'}: the study there was tuned over another search space (params "
        "training.seed not in this space); give another --out (or --storage), or the space it was tuned with"
    )
    assert sorted(p.name for p in options.out.iterdir()) == ["study.db"]  # no best.yaml, no trial


def test_a_heartbeat_below_one_second_is_one_line(tmp_path, small_data, capsys):
    options = tune_options(tmp_path, small_data, 1, heartbeat=0)
    with pytest.raises(UserError, match=r"^--heartbeat must be at least 1 second \(got 0\)$"):
        run_tune(options)
    assert not options.out.exists()


def test_a_damaged_evaluation_result_is_evaluated_again(tmp_path, small_data):
    options = tune_options(tmp_path, small_data, 1)
    space = read_space(options.space, options.config, options.overrides)
    steps = ("training.num_train_steps=2", "training.checkpoint_every_n=2", "training.eval_log_every_n=1000")
    config = small_config(small_data, tmp_path / "run", *steps)
    Trainer(config).run()
    written = RunFolder(config.training.save_dir).result("validation", 2)
    written.parent.mkdir(parents=True)
    written.write_text('{"step": 2, "metr')  # what a disk that lost a block leaves
    value = TrialObjective(options, space).score(config)
    rewritten = json.loads(written.read_text())
    assert rewritten["step"] == 2
    assert value == space.objective.value(rewritten["metrics"], config.engagement_weights)


def states(out: Path) -> list[str]:
    """The trials' states in order: none yet while Optuna is still creating the study's tables (study.db
    exists from its first connection on, the tables a moment later)."""
    with sqlite3.connect(out / "study.db") as db:
        try:
            return [row[0] for row in db.execute("SELECT state FROM trials ORDER BY number")]
        except sqlite3.OperationalError as e:
            if "no such table" not in str(e):
                raise
            return []


def test_a_killed_study_resumes(tmp_path, small_data):
    options = tune_options(tmp_path, small_data, trials=3, heartbeat=1)
    command = [
        sys.executable,
        "-m",
        "heavyranker",
        "tune",
        "--config",
        options.config,
        "--space",
        options.space,
    ]
    command += [arg for o in options.overrides for arg in ("--set", o)]
    command += ["--trials", "3", "--out", str(options.out), "--heartbeat", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    tune = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Killed once a trial is complete and the next one has begun (written a checkpoint).
        while not (
            (options.out / "study.db").is_file()
            and states(options.out)[:2] == ["COMPLETE", "RUNNING"]
            and (options.out / "trials" / "1" / "checkpoints" / "step_20.pt").is_file()
        ):
            assert tune.poll() is None, "tune ended before it could be killed"
            time.sleep(0.2)
    finally:
        tune.send_signal(signal.SIGKILL)
        tune.wait()
    assert states(options.out)[:2] == ["COMPLETE", "RUNNING"]

    time.sleep(3)  # past the grace period (twice --heartbeat): the killed trial's heartbeat is stale
    run_tune(options)  # the same command again
    trials = load(options.out).get_trials()
    assert trials[0].state == TrialState.COMPLETE  # kept, not run again
    assert trials[1].state == TrialState.FAIL  # its heartbeat stopped: failed, then re-run
    retried = [t for t in trials[2:] if t.user_attrs["run"] == 1]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == trials[1].params
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    assert [t.number for t in trials] == list(range(len(trials)))  # the numbering continued


def test_on_evaluation_ends_the_run_at_that_evaluation(tmp_path, small_data):
    seen = []

    def stop_at_the_second(step, results):
        seen.append((step, sorted(results)))
        return len(seen) == 2

    overrides = (
        "training.num_train_steps=12",
        "training.eval_log_every_n=3",
        "training.checkpoint_every_n=100",
    )
    trainer = Trainer(small_config(small_data, tmp_path, *overrides), on_evaluation=stop_at_the_second)
    trainer.run()
    assert [step for step, _ in seen] == [3, 6] and seen[0][1] == sorted(SMALL_SPLITS)
    assert trainer.step == 6
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [6]  # saved where it stopped


def test_a_study_over_mmoe_and_ple_trains_each_and_its_best_settings_apply(tmp_path, small_data, capsys):
    space = tmp_path / "space.yaml"
    params = {"model": {"choices": [MMOE, PLE]}}
    space.write_text(yaml.safe_dump({"objective": {"split": "validation"}, "params": params}))
    steps = ["training.num_train_steps=20", "training.eval_log_every_n=20", "training.checkpoint_every_n=20"]
    overrides = [*data_overrides(small_data), *steps]
    options = TuneOptions(str(CONFIG), overrides, str(space), 2, tmp_path / "out")
    best = run_tune(options)
    trials = load(options.out).get_trials(states=(TrialState.COMPLETE,))
    drawn = {yaml.safe_load(t.params["model"])["multi_task_type"]: t for t in trials}
    assert sorted(drawn) == ["mmoe", "ple"], "the seeded sampler drew one choice twice"

    towers = {module_name(task) for task in load_config(CONFIG).model.tasks}
    for kind, trial in drawn.items():  # the model each trial trained, read from its checkpoint's weights
        checkpoint = options.out / "trials" / str(trial.number) / "checkpoints" / "step_20.pt"
        names = list(torch.load(checkpoint, weights_only=False)["model"])
        assert not any(name.startswith("backbone.") for name in names)
        shared = {n.split(".")[4] for n in names if n.startswith("experts.levels.0.shared_experts.")}
        own = {n.split(".")[4] for n in names if n.startswith("experts.levels.0.task_experts.")}
        # mmoe: 2 experts every task shares, none of a task's own; ple: 1 shared, 1 per task
        assert (shared, own) == (({"0", "1"}, set()) if kind == "mmoe" else ({"0"}, towers))
        assert f"--set model.multi_task_type={kind}" in trial.user_attrs["settings"]

    # best.yaml is a valid config, and the --set lines in its header give it from the tuned config
    written = (options.out / "best.yaml").read_text()
    sets = [
        arg for line in written.splitlines() if line.startswith("#   --set") for arg in shlex.split(line[1:])
    ]
    assert sets[::2] == ["--set"] * 3 and len(sets) == 6
    applied = load_config(CONFIG, [*overrides, *sets[1::2]])
    assert load_config(options.out / "best.yaml").model == applied.model
    assert applied.model.multi_task_type == yaml.safe_load(best.params["model"])["multi_task_type"]

    capsys.readouterr()
    assert main(["tune", "--report", "--out", str(options.out)]) == 0
    printed = capsys.readouterr().out
    assert f"best: trial {best.number}," in printed and "--set model.backbone=null" in printed
