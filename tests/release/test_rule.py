"""The promotion rule on planted scores: the per-task rule and the engagement-weighted rule disagree where a
heavily weighted task improves much and a lightly weighted one worsens a little; the weighted figures are
the hand-computed sums of RCEs, and the weighted interval is the per-task one scaled when one task counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from heavyranker.errors import UserError
from heavyranker.eval.compare import Scores
from heavyranker.release.rule import PromotionRule, judge

N = 20_000
TASKS = ["recap.engagement.is_favorited", "recap.engagement.is_replied"]
WEIGHTS = {TASKS[0]: 0.5, TASKS[1]: -13.5}  # the size counts: -13.5 weighs 13.5


def hand_rce(labels: np.ndarray, probs: np.ndarray) -> float:
    """100 * (1 - cross-entropy of probs / cross-entropy of the base rate), written out."""
    ctr = labels.mean()
    model = -np.mean(labels * np.log(probs) + (1 - labels) * np.log(1 - probs))
    base = -(ctr * np.log(ctr) + (1 - ctr) * np.log(1 - ctr))
    return 100 * (1 - model / base)


@pytest.fixture(scope="module")
def planted() -> tuple[Scores, Scores]:
    """Current: favorites predicted by their true probability, replies by their base rate alone. Candidate:
    favorites over-predicted by half (a little worse), replies by their true probability (much better)."""
    rng = np.random.default_rng(0)
    truth = rng.beta(2, 6, size=(N, 2))
    labels = (rng.random((N, 2)) < truth).astype(np.float32)
    current = np.stack([truth[:, 0], np.full(N, labels[:, 1].mean())], axis=1)
    candidate = np.stack([np.clip(truth[:, 0] * 1.5, 0, 0.99), truth[:, 1]], axis=1)
    weights = np.ones((N, 2), np.float32)
    return (
        Scores(Path("current"), 1, labels, current.astype(np.float32), weights),
        Scores(Path("candidate"), 2, labels, candidate.astype(np.float32), weights),
    )


def test_the_per_task_rule_refuses_what_the_weighted_rule_publishes(planted):
    current, candidate = planted
    per_task = judge(PromotionRule(resamples=200), TASKS, current, candidate, WEIGHTS, version=4)
    assert not per_task.published and per_task.weighted is None
    assert per_task.reason == "rce worse than version 4 beyond the interval on is_favorited"
    assert per_task.tasks[TASKS[0]]["worse"] and not per_task.tasks[TASKS[1]]["worse"]

    weighted = judge(PromotionRule(resamples=200, weighted=True), TASKS, current, candidate, WEIGHTS, 4)
    assert weighted.published, weighted.reason
    rces = {
        name: [hand_rce(run.labels[:, j].astype(float), run.probs[:, j].astype(float)) for j in (0, 1)]
        for name, run in (("current", current), ("candidate", candidate))
    }
    figures = weighted.weighted
    assert figures["weights"] == {TASKS[0]: 0.5, TASKS[1]: 13.5}
    for name in ("current", "candidate"):
        assert figures[name] == pytest.approx(0.5 * rces[name][0] + 13.5 * rces[name][1], rel=1e-4)
    difference = figures["candidate"] - figures["current"]
    assert difference > 0 and figures["low"] < difference < figures["high"] and figures["low"] > 0
    # The per-task figures are recorded as well.
    assert weighted.tasks == per_task.tasks


def test_a_heavy_task_made_worse_is_refused_by_the_weighted_rule(planted):
    current, candidate = planted
    # The same runs, the other way round: replies much worse, favorites a little better.
    weighted = judge(PromotionRule(resamples=200, weighted=True), TASKS, candidate, current, WEIGHTS, 4)
    assert not weighted.published
    assert weighted.reason == (
        "the engagement-weighted sum of rce differences is worse than version 4's beyond the interval"
    )
    assert weighted.weighted["high"] < 0


def test_with_one_weighted_task_the_interval_is_its_own_scaled(planted):
    current, candidate = planted
    rule = PromotionRule(resamples=200, weighted=True, tasks=(TASKS[0],))
    verdict = judge(rule, TASKS, current, candidate, {TASKS[0]: -3.0}, version=1)
    own = verdict.tasks[TASKS[0]]
    assert verdict.weighted["low"] == pytest.approx(3 * own["low"])
    assert verdict.weighted["high"] == pytest.approx(3 * own["high"])
    assert verdict.weighted["current"] == pytest.approx(3 * own["current"])
    # A tolerance past the loss lets it through, as for the per-task rule.
    tolerant = PromotionRule(resamples=200, weighted=True, tasks=(TASKS[0],), tolerance=-3 * own["high"] + 1)
    assert judge(tolerant, TASKS, current, candidate, {TASKS[0]: -3.0}, version=1).published


def test_weights_that_leave_no_task_are_refused(planted):
    current, candidate = planted
    with pytest.raises(UserError, match="no weighted task has a rce"):
        judge(PromotionRule(resamples=200, weighted=True), TASKS, current, candidate, {}, version=1)


@pytest.mark.parametrize("tolerance", [-0.5, float("nan")])
def test_a_tolerance_below_0_or_not_a_number_is_refused(tolerance: float) -> None:
    """nan passed a `< 0` check, and no interval ends below -nan: every candidate would be published."""
    with pytest.raises(UserError, match=f"promote: tolerance {tolerance} must be a number at least 0"):
        PromotionRule(tolerance=tolerance).check(TASKS)
