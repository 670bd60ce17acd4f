"""training.keep_best, the whole decision: at each evaluation of a training run, whether it is the best so far
(then its checkpoint is saved if the step had none, and marked), which checkpoints stay, and whether patience
is spent (early stopping). The state lives in the run folder's best marker (checkpoints/best.json), so a
resumed run continues where the killed one left off.

The score is `metric` of `task` on `split`, or with task `mean` the mean over the split's tasks whose metric
is defined. AUROC and RCE are undefined (NaN) where the split's evaluated examples hold one class only for a
task (no positives, or no negatives, by weight). Every evaluation reads the same examples, so such a task
never gets a value: the mean leaves it out (and says so once), and a keep_best that can never score is
refused at the first evaluation."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from ..config.training import KeepBestConfig
from ..errors import UserError
from ..eval.evaluator import Results
from ..run_folder import BestMarker, NotAMarker, RunFolder

log = logging.getLogger(__name__)


class BestTracker:
    """On rank 0, which decides. `max_to_keep`: training.checkpoint_max_to_keep."""

    def __init__(self, config: KeepBestConfig, run: RunFolder, max_to_keep: int | None = None):
        self.config, self.run, self.max_to_keep = config, run, max_to_keep
        self.step: int | None = None  # of the best checkpoint
        self.value = -math.inf
        self.misses = 0  # evaluations since the best
        # The marker has counted the evaluations up to this step; a resumed run repeats those past its
        # checkpoint (with the same results: resuming is exact), which must not count twice.
        self.evaluated_step = 0
        self._left_out: set[str] = set()  # tasks the mean left out, already warned about
        self._resume()

    def _resume(self) -> None:
        try:
            marker = self.run.read_best()
        except NotAMarker as e:  # train's own state: it writes a good one at its next evaluation
            log.warning("%s: not a best marker (%s): replaced at the next evaluation", e.path, e.why)
            return
        if marker is None:
            return
        c = self.config
        if (marker.split, marker.task, marker.metric) != (c.split, c.task, c.metric):
            log.info("%s chose by another keep_best: starting afresh", self.run.best_marker)
            return
        self.step, self.value = marker.step, marker.value
        self.misses, self.evaluated_step = marker.evaluations_without_improvement, marker.evaluated_step

    def update(self, step: int, results: Results, save: Callable[[], object]) -> bool:
        """After the evaluation at `step`: save this step's checkpoint (with `save`) if it is the best so far,
        then mark the best (in that order, so that the marker always names a checkpoint on disk), then prune
        the checkpoints, sparing the best. Returns whether patience is spent: early stopping ends the run."""
        if step <= self.evaluated_step:  # an evaluation a resumed run repeats
            return False
        value = self.score(results)
        if self.improves(value):
            if not self.run.checkpoint(step).exists():
                save()  # keeps the previous best: the marker still names it
            self.step, self.value, self.misses = step, value, 0
        else:
            self.misses += 1
        self.evaluated_step = step
        if self.step is not None:
            self.run.write_best(self.marker())
        self.run.prune(self.max_to_keep, keep=self.step)
        if self.exhausted:
            log.info("stopping early at step %d: %s", step, self.describe())
        return self.exhausted

    def saves(self, step: int, results: Results) -> bool:
        """Whether update(step, results, save) will call save."""
        improves = step > self.evaluated_step and self.improves(self.score(results))
        return improves and not self.run.checkpoint(step).exists()

    def improves(self, value: float) -> bool:
        return value > self.value  # NaN (no task defined) never does

    def score(self, results: Results) -> float:
        metrics, metric = results[self.config.split], self.config.metric
        tasks = chosen_tasks(self.config, results)
        defined = [task for task in tasks if not math.isnan(metrics[task][metric])]
        left_out = set(tasks) - set(defined) - self._left_out
        if left_out:
            log.warning(
                "training.keep_best: %s is undefined on %s for %s; the mean leaves it out",
                metric,
                self.config.split,
                ", ".join(sorted(left_out)),
            )
            self._left_out |= left_out
        return sum(metrics[task][metric] for task in defined) / len(defined) if defined else math.nan

    def marker(self) -> BestMarker:
        assert self.step is not None
        c = self.config
        return BestMarker(self.step, c.split, c.task, c.metric, self.value, self.misses, self.evaluated_step)

    @property
    def exhausted(self) -> bool:
        """Patience is spent: early stopping ends the run."""
        return self.config.patience is not None and self.misses >= self.config.patience

    def describe(self) -> str:
        c = self.config
        return (
            f"{c.metric} of {c.task} on {c.split} has not improved in {self.misses} evaluations "
            f"(best {self.value:.5g} at step {self.step})"
        )


def chosen_tasks(config: KeepBestConfig, results: Results) -> list[str]:
    """The tasks keep_best scores by: its task, or for `mean` the split's (not the stratified task/stratifier
    rows)."""
    if config.task != "mean":
        return [config.task]
    return [task for task in results[config.split] if "/" not in task]


def refuse_undefinable(config: KeepBestConfig, results: Results) -> None:
    """UserError where keep_best can never score: its task (every task, for `mean`) has one class only in the
    split's evaluated examples. On every rank, so that all stop together."""
    metrics = results[config.split]
    tasks = chosen_tasks(config, results)
    one_class = {task: _one_class(metrics[task]["ctr"]) for task in tasks}
    if all(one_class.values()):
        why = "; ".join(f"{task}: {reason}" for task, reason in one_class.items())
        raise UserError(
            f"training.keep_best: {config.metric} of {config.task} on {config.split} can never be defined, "
            f"as every evaluation reads the same examples and they hold one class only ({why}); choose "
            "another task or split (train resumes from the newest checkpoint)"
        )


def _one_class(ctr: float) -> str | None:
    """Why the weighted mean label `ctr` leaves AUROC and RCE undefined, or None where it does not."""
    if math.isnan(ctr):
        return "no examples"
    return "no positives" if ctr <= 0.0 else "no negatives" if ctr >= 1.0 else None
