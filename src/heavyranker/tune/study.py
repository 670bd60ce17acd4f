"""`heavyranker tune`: an Optuna study whose trials are training runs.

    DIR/study.db        the study (SQLite; --storage URL puts it in any SQLAlchemy database instead)
    DIR/trials/<N>/     trial N's run folder (training.save_dir): checkpoints, metrics, evaluations
    DIR/best.yaml       the best trial's config, a plain YAML `train` accepts (rewritten after each trial)

Each trial trains the config with its parameters set, reports the objective at every evaluation (the pruner
may end it there), and scores the checkpoint `export` would take (keep_best's best, else the newest) with the
evaluator on the objective's validation split. The study is resumable: a trial whose process died stops
sending heartbeats and, after the grace period, is marked failed and re-run with the same parameters in the
same run folder (train resumes from its newest checkpoint); a trial stopped by SIGINT/SIGTERM is re-run so at
once. Several `tune` processes (on one machine, or on several sharing a database) work on one study: Optuna
hands each its own trial, and a trial's run folder is named by its number."""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from ..atomic import atomic_write
from ..checkpoint import resolve_checkpoint
from ..config import Config, dump_config, load_config
from ..errors import UserError
from ..eval.evaluator import evaluate_command
from ..run_folder import RunFolder
from ..runtime import init_runtime
from ..train.loop import NonFiniteLoss, Trainer
from ..urls import redact
from .settings import as_overrides
from .space import Param, SearchSpace, read_space

log = logging.getLogger(__name__)

STUDY_NAME = "heavyranker"
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # what --trials counts
RUN = "run"  # user attribute: the number of the trial whose run folder a trial trains in
SETTINGS = "settings"  # user attribute: what the trial sets in the config, as `--set` arguments
SPACE = "space"  # the study's user attribute: the search space of its trials (SearchSpace.fingerprint)


@dataclass(frozen=True)
class TuneOptions:
    config: str
    overrides: list[str]
    space: str
    trials: int
    out: Path
    storage: str | None = None
    seed: int = 0
    heartbeat: int = 30  # seconds between a running trial's heartbeats; stale after twice that


def storage_url(out: Path, storage: str | None) -> str:
    return storage or f"sqlite:///{(out / 'study.db').resolve()}"


@contextmanager
def opening_storage(url: str) -> Iterator[None]:
    """A storage that cannot be opened (no such folder, not a database, an unknown dialect, a server that does
    not answer) as one line naming it, where SQLAlchemy raises with its background and a traceback."""
    try:
        yield
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as e:  # ImportError: the URL's driver is missing
        why = str(getattr(e, "orig", None) or e).splitlines()[0]
        raise UserError(f"tune: cannot open the study's storage {redact(url)}: {why}") from None


def open_study(out: Path, storage: str | None, seed: int = 0, heartbeat: int = 30) -> optuna.Study:
    """The study in `storage` (default DIR/study.db), created on first use."""
    url = storage_url(out, storage)
    # Heartbeats are "experimental" in Optuna since 2.8: we rely on them.
    with warnings.catch_warnings(), opening_storage(url):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        rdb = RDBStorage(
            url,
            heartbeat_interval=heartbeat,
            grace_period=2 * heartbeat,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(),
        )
        study = optuna.create_study(
            storage=rdb,
            study_name=STUDY_NAME,
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=3),
            load_if_exists=True,
        )
        optuna.storages.fail_stale_trials(
            study
        )  # what a killed tune left running: re-run from its checkpoints
    return study


def run_tune(options: TuneOptions) -> FrozenTrial | None:
    """Runs trials until the study holds `options.trials` complete or pruned ones; writes best.yaml; returns
    the best trial (None where none completed)."""
    if options.trials < 1:
        raise UserError(f"--trials must be at least 1 (got {options.trials})")
    if options.heartbeat < 1:  # Optuna's own check is a traceback
        raise UserError(f"--heartbeat must be at least 1 second (got {options.heartbeat})")
    space = read_space(options.space, options.config, options.overrides)
    options.out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # tune logs each trial itself
    study = open_study(options.out, options.storage, options.seed, options.heartbeat)
    claim_study(study, space, redact(storage_url(options.out, options.storage)))
    done = len(study.get_trials(deepcopy=False, states=COUNTED))
    if done >= options.trials:
        log.info("the study already holds %d finished trials of %d", done, options.trials)
    else:
        stop_at = optuna.study.MaxTrialsCallback(options.trials, states=COUNTED)
        objective = TrialObjective(options, space)
        # A trial whose loss diverged (a learning rate too high) fails and the study goes on; at most the
        # trials missing here, so that a space where every trial fails still ends.
        study.optimize(
            objective,
            n_trials=options.trials - done,
            catch=(NonFiniteLoss,),
            callbacks=[stop_at, lambda s, t: write_best(s, options, space)],
        )
    return write_best(study, options, space)


def claim_study(study: optuna.Study, space: SearchSpace, where: str) -> None:
    """Record the search space in a new study; refuse a study of another one, whose trials would count
    towards --trials and whose best (drawn over other parameters) would be written to best.yaml as if it
    were this space's. A study tuned before spaces were recorded takes this one."""
    recorded, own = study.user_attrs.get(SPACE), space.fingerprint()
    if recorded is None:
        study.set_user_attr(SPACE, own)
    elif recorded != own:
        difference = space_difference(recorded, own)
        raise UserError(
            f"{where}: the study there was tuned over another search space ({difference}); give another "
            "--out (or --storage), or the space it was tuned with"
        )


def space_difference(recorded: dict[str, Any], own: dict[str, Any]) -> str:
    """The first difference between two fingerprints, in a person's words."""
    if recorded["objective"] != own["objective"]:
        return f"objective {recorded['objective']}, not {own['objective']}"
    old, new = recorded["params"], own["params"]
    if removed := sorted(set(old) - set(new)):
        return f"params {', '.join(removed)} not in this space"
    if added := sorted(set(new) - set(old)):
        return f"params {', '.join(added)} not in that one"
    changed = next(path for path in new if old[path] != new[path])
    return f"params.{changed} was {json.dumps(old[changed]['attributes'])}"


class TrialObjective:
    """One trial: its config, its training run, its score."""

    def __init__(self, options: TuneOptions, space: SearchSpace):
        self.options, self.space = options, space

    def __call__(self, trial: optuna.Trial) -> float:
        values = self.space.config_values({p.path: suggest(trial, p) for p in self.space.params})
        # A re-run (of a trial that died or was stopped) inherits the user attributes, so its run folder.
        if RUN not in trial.user_attrs:
            trial.set_user_attr(RUN, trial.number)
        trial.set_user_attr(SETTINGS, as_overrides(values))
        run = (self.options.out / "trials" / str(trial.user_attrs[RUN])).resolve()
        config = load_config(
            self.options.config, self.options.overrides, {**values, "training.save_dir": str(run)}
        )
        log.info("trial %d: %s in %s", trial.number, json.dumps(trial.params), run)
        pruned = False

        def report(step: int, results: dict[str, Any]) -> bool:
            nonlocal pruned
            value = self.space.objective.value(results[self.space.objective.split], config.engagement_weights)
            if not math.isnan(value):
                trial.report(value, step)
                pruned = trial.should_prune()
            return pruned

        trainer = Trainer(config, runtime=init_runtime(), on_evaluation=report)
        trainer.run()
        if pruned:
            raise optuna.TrialPruned(f"at step {trainer.step}")
        if trainer.step < config.training.num_train_steps and not (trainer.best and trainer.best.exhausted):
            # Stopped by a signal: re-run with the same parameters (resuming this folder), then stop tuning.
            trial.study.enqueue_trial(trial.params, user_attrs=trial.user_attrs)
            raise KeyboardInterrupt
        return self.score(config)

    def score(self, config: Config) -> float:
        """The objective at the checkpoint export takes, from the evaluation train wrote for its step, else
        evaluated now."""
        split = self.space.objective.split
        checkpoint = resolve_checkpoint(config.training.save_dir, best=True)
        step = int(checkpoint.stem.removeprefix("step_"))
        metrics = written_metrics(RunFolder(config.training.save_dir).result(split, step))
        if metrics is None:
            results = evaluate_command(config, checkpoint=str(checkpoint), watch=False, split=split)
            metrics = results[split]
        value = self.space.objective.value(metrics, config.engagement_weights)
        if math.isnan(value):
            raise UserError(
                f"{self.options.space}: objective: {self.space.objective.metric} is undefined on {split} "
                "for every task (one class only); choose other tasks or another split"
            )
        return value


def written_metrics(path: Path) -> dict[str, Any] | None:
    """The metrics of an evaluation's result file; None where there is none, or where it is damaged (the
    checkpoint is then evaluated again, and the file rewritten)."""
    try:
        metrics = json.loads(path.read_text())["metrics"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:  # not text, not JSON, not a result
        log.warning("%s: not an evaluation's result (%s): evaluating the checkpoint again", path, e)
        return None
    return metrics if isinstance(metrics, dict) else None


def suggest(trial: optuna.Trial, param: Param) -> Any:
    d = param.distribution
    if isinstance(d, CategoricalDistribution):
        return trial.suggest_categorical(param.path, d.choices)
    if isinstance(d, IntDistribution):
        return trial.suggest_int(param.path, d.low, d.high, step=d.step, log=d.log)
    assert isinstance(d, FloatDistribution)
    return trial.suggest_float(param.path, d.low, d.high, step=d.step, log=d.log)


def write_best(study: optuna.Study, options: TuneOptions, space: SearchSpace) -> FrozenTrial | None:
    """DIR/best.yaml: the config with the best trial's parameters (save_dir as the config has it), written
    atomically, as `config validate` prints a config."""
    try:
        best = study.best_trial
    except ValueError:  # no trial completed
        return None
    values = space.config_values(best.params)
    config = load_config(options.config, options.overrides, values)
    with atomic_write(options.out / "best.yaml", "w") as f:
        f.write(f"# tune: trial {best.number} of {options.out}, {space.objective.metric} {best.value:.6g}\n")
        f.write("# its settings, as train takes them on top of tune's --config and --set:\n")
        f.write("".join(f"#   {override}\n" for override in as_overrides(values)))
        f.write(dump_config(config))
    return best
