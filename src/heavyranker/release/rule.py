"""The promotion rule: from the candidate's and the current version's scores on one split, whether the
candidate may be published, with the figures of the decision.

Per task (the default): refused if any judged task's metric is worse beyond the 95% paired-bootstrap
interval by more than the tolerance, that is if the interval of candidate - current ends below -tolerance.

Weighted (`weighted=True`): one figure decides, the engagement-weighted sum over the judged tasks of the
metric's difference, sum_i |w_i| * (candidate_i - current_i), with w_i the task's weight in the served score
(`serving.engagement_weights`), and its interval from the same paired resamples (the sum taken on each
resample). Refused if that interval ends below -tolerance. The weights count by their size: a task's RCE says
how well its engagement is predicted, and predicting a negative engagement (a report, weight -369) well is
worth as much as predicting a positive one. A task whose metric is undefined on the split (no positive or no
negative example), or whose weight is 0, is left out of the sum.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import short_names
from ..errors import UserError
from ..eval.compare import (
    MAX_RESAMPLES,
    METRICS,
    MIN_RESAMPLES,
    Difference,
    Scores,
    differences,
    interval,
    resampled_deltas,
)

LEVEL = 0.95


@dataclass(frozen=True)
class PromotionRule:
    """Refuse a candidate whose `metric` is worse than the current version's, beyond the 95% interval and by
    more than `tolerance` (in the metric's units: RCE in percent), on any of `tasks` (default: all); with
    `weighted`, on the engagement-weighted sum of the tasks' differences instead (the module's docstring)."""

    metric: str = "rce"
    tasks: tuple[str, ...] = ()
    tolerance: float = 0.0
    resamples: int = 1000
    seed: int = 0
    weighted: bool = False

    def check(self, tasks: list[str]) -> None:
        if self.metric not in METRICS:
            raise UserError(f"promote: metric {self.metric!r} is not one of {', '.join(METRICS)}")
        unknown = [t for t in self.tasks if t not in tasks]
        if unknown:
            raise UserError(f"promote: no task {unknown[0]!r} on this split (it has {', '.join(tasks)})")
        if not self.tolerance >= 0:  # nan too: no interval would end below -nan, so nothing would be worse
            raise UserError(f"promote: tolerance {self.tolerance} must be a number at least 0")
        if self.resamples < MIN_RESAMPLES:
            raise UserError(f"promote: resamples is {self.resamples}; at least {MIN_RESAMPLES} are needed")
        if self.resamples > MAX_RESAMPLES:
            raise UserError(f"promote: resamples is {self.resamples}; at most {MAX_RESAMPLES:,}")


DEFAULT_RULE = PromotionRule()


@dataclass
class Verdict:
    published: bool
    reason: str
    tasks: dict[str, dict[str, Any]]  # task -> current, candidate, low, high, worse
    weighted: dict[str, Any] | None  # weighted: weights, current, candidate, low, high, worse


def judge(
    rule: PromotionRule,
    tasks: list[str],
    current: Scores,
    candidate: Scores,
    engagement_weights: Mapping[str, float],
    version: int,
) -> Verdict:
    """The rule's verdict on `candidate` against `current` (repository version `version`); `tasks` name the
    scores' columns."""
    deltas = resampled_deltas(current, candidate, rule.resamples, rule.seed)
    rows = differences(current, candidate, deltas, LEVEL)
    figures = {t: _figures(row[rule.metric], rule) for t, row in zip(tasks, rows, strict=True)}
    judged = rule.tasks or tuple(tasks)
    if rule.weighted:
        weights = {t: abs(engagement_weights.get(t, 0.0)) for t in judged}
        summed = weighted_difference(rows, deltas, tasks, weights, rule.metric)
        weighted = {"weights": weights, **_figures(summed, rule)}
        worse = weighted["worse"]
        what = f"the engagement-weighted sum of {rule.metric} differences"
        reason = (
            f"{what} is worse than version {version}'s beyond the interval"
            if worse
            else f"{what} is not worse than version {version}'s beyond the interval"
        )
        return Verdict(not worse, reason, figures, weighted)
    names = short_names(tasks)
    worse_tasks = [t for t in judged if figures[t]["worse"]]
    reason = (
        f"{rule.metric} worse than version {version} beyond the interval on "
        + ", ".join(names[t] for t in worse_tasks)
        if worse_tasks
        else f"no task's {rule.metric} worse than version {version} beyond the interval"
    )
    return Verdict(not worse_tasks, reason, figures, None)


def weighted_difference(
    rows: list[dict[str, Difference]],
    deltas: dict[tuple[int, str], np.ndarray],
    tasks: list[str],
    weights: Mapping[str, float],
    metric: str,
) -> Difference:
    """sum_i w_i * metric_i of each run, and the interval of the sum of w_i * (b_i - a_i) over the paired
    resamples, over the tasks of `weights` whose metric is defined on the split and whose weight is not 0."""
    used = [
        (j, weights[t])
        for j, t in enumerate(tasks)
        if weights.get(t, 0.0) != 0.0 and np.isfinite(rows[j][metric].a) and np.isfinite(rows[j][metric].b)
    ]
    if not used:
        raise UserError(f"promote: no weighted task has a {metric} on this split (weights {dict(weights)})")
    a = sum(w * rows[j][metric].a for j, w in used)
    b = sum(w * rows[j][metric].b for j, w in used)
    resampled = sum(w * deltas[j, metric] for j, w in used)
    low, high = interval(np.asarray(resampled), 100 * (1 - LEVEL) / 2)
    return Difference(a, b, low, high)


def _figures(difference: Difference, rule: PromotionRule) -> dict[str, Any]:
    """The current version's value, the candidate's, the interval of candidate - current, and the verdict."""
    return {
        "current": difference.a,
        "candidate": difference.b,
        "low": difference.low,
        "high": difference.high,
        "worse": bool(difference.high < -rule.tolerance),
    }
