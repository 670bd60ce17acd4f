"""training.keep_best: which evaluation is the best so far, and how many evaluations since it (for early
stopping). The state lives in the run's best-checkpoint marker (checkpoint.py's best.json), so a resumed
run continues where the killed one left off."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from ..checkpoint import read_best, write_best
from ..config.training import KeepBestConfig
from ..eval.evaluator import Results

log = logging.getLogger(__name__)


class BestTracker:
    def __init__(self, config: KeepBestConfig, folder: Path):
        self.config, self.folder = config, folder
        self.step: int | None = None  # of the best checkpoint
        self.value = -math.inf
        self.misses = 0  # evaluations since the best
        # The marker has counted the evaluations up to this step; a resumed run repeats those past its
        # checkpoint (with the same results: resuming is exact), which must not count twice.
        self.evaluated_step = 0
        marker = read_best(folder)
        if marker is not None and self._chooses_as(marker):
            self.step, self.value = marker["step"], marker["value"]
            self.misses = marker["evaluations_without_improvement"]
            self.evaluated_step = marker["evaluated_step"]
        elif marker is not None:
            log.info("%s chose by another keep_best: starting afresh", folder / "best.json")

    def _chooses_as(self, marker: dict[str, Any]) -> bool:
        return (marker["split"], marker["task"], marker["metric"]) == (
            self.config.split,
            self.config.task,
            self.config.metric,
        )

    def score(self, results: Results) -> float:
        metrics = results[self.config.split]
        if self.config.task != "mean":
            return metrics[self.config.task][self.config.metric]
        tasks = [task for task in metrics if "/" not in task]  # not the stratified rows (task/stratifier)
        return sum(metrics[task][self.config.metric] for task in tasks) / len(tasks)

    def is_new(self, step: int) -> bool:
        """Whether the evaluation at `step` is new, not one a resumed run repeats."""
        return step > self.evaluated_step

    def improves(self, value: float) -> bool:
        return value > self.value  # NaN (a task without positives) never does

    def record(self, step: int, value: float) -> None:
        """The evaluation at `step` scored `value`; write the marker if there is a best to mark."""
        if self.improves(value):
            self.step, self.value, self.misses = step, value, 0
        else:
            self.misses += 1
        self.evaluated_step = step
        if self.step is not None:
            write_best(self.folder, self.marker())

    def marker(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "split": self.config.split,
            "task": self.config.task,
            "metric": self.config.metric,
            "value": self.value,
            "evaluations_without_improvement": self.misses,
            "evaluated_step": self.evaluated_step,
        }

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
