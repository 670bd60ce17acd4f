"""The planted truth's model: the observed columns it reads, each task's logit, and the hidden mood that the
planted probability integrates out."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit

MOOD_STD = 0.7  # the hidden per-impression mood, in logit units
_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite.hermgauss(8)  # 1e-7 relative error on a logistic


@dataclass(frozen=True)
class TaskProfile:
    """One task's logit: bias + engage * (shared engagement score) + sum of weight * term, where the
    terms are inputs of `World._inputs`; with a gate, 5 lower where the gate flag is off."""

    rate: float  # the base rate the bias is solved for
    engage: float
    terms: dict[str, float] = field(default_factory=dict)
    gate: str | None = None
    mood: float = 1.0  # loading on the hidden mood


# Keyed by the task name without "recap.engagement."; base rates of a home timeline's order.
PROFILES: dict[str, TaskProfile] = {
    "is_favorited": TaskProfile(0.07, 1.0, {"image": 0.4}),
    "is_tweet_detail_dwelled_15_sec": TaskProfile(0.06, 0.6, {"image": 0.4, "age_bump": 0.3}),
    "is_video_playback_50": TaskProfile(0.03, 0.8, {"age_bump": 0.4}, gate="video"),
    "is_good_clicked_convo_desc_v2": TaskProfile(0.02, 0.8, {"reply": 0.6}),
    "is_replied": TaskProfile(0.015, 0.8, {"follow_xor_reply": 0.9}),
    "is_retweeted": TaskProfile(0.01, 0.9, {"pop": 0.5, "pop_x_fav": 0.6}),
    "is_good_clicked_convo_desc_favorited_or_replied": TaskProfile(0.006, 1.0, {"reply": 0.6}),
    "is_bookmarked": TaskProfile(0.005, 0.8, {"fav": 0.4}),
    "is_profile_clicked_and_profile_engaged": TaskProfile(0.004, 0.7, {"unfollowed": 0.7, "aff": 0.5}),
    "is_shared": TaskProfile(0.003, 0.7, {"pop": 0.4}),
    "is_negative_feedback_v2": TaskProfile(0.003, -0.8, {"neg_unfollowed": 0.5, "neg": 0.2}, mood=-0.5),
    "is_replied_reply_engaged_by_author": TaskProfile(0.0015, 0.8, {"pop": -0.8, "follow_xor_reply": 0.8}),
    "is_report_tweet_clicked": TaskProfile(0.0008, -0.8, {"rep_x_neg": 0.4, "rep": 0.3}, mood=-0.5),
}
# The shared engagement score. Mostly non-linear: a logistic regression on the features sees little of it.
ENGAGE = {
    "act": 0.3,
    "fav": 0.2,
    "follow": 0.2,
    "act_x_fav": 0.6,
    "aff": 0.4,
    "age_bump": 0.8,
    "ua_3plus": 0.4,
}

# The observed columns behind the truth's inputs, most important first (a narrow schema plants the first).
SOURCES = {
    "continuous": (
        "user_engagements",
        "author_followers",
        "tweet_favs",
        "tweet_age_minutes",
        "user_author_engagements",
        "user_negative_feedback",
        "author_reports",
    ),
    "binary": ("follows_author", "has_video", "is_reply", "has_image"),
}
LOG_INPUTS = {
    "act": "user_engagements",
    "neg": "user_negative_feedback",
    "pop": "author_followers",
    "rep": "author_reports",
    "fav": "tweet_favs",
    "age": "tweet_age_minutes",
    "ua": "user_author_engagements",
}
FLAG_INPUTS = {"follow": "follows_author", "video": "has_video", "reply": "is_reply", "image": "has_image"}
STANDARDIZED = ("act", "neg", "pop", "rep", "fav", "age", "aff")


def demo_mixes(x: dict[str, np.ndarray]) -> None:
    """The demo truth's non-linear inputs, from the standardized log counts, flags and affinity in `x`."""
    x["ua_3plus"] = (x.pop("ua") >= np.log1p(3)).astype(np.float64)
    x["act_x_fav"] = x["act"] * x["fav"]
    x["pop_x_fav"] = x["pop"] * x["fav"]
    x["rep_x_neg"] = x["rep"] * x["neg"]
    x["age_bump"] = 1.0 - x["age"] ** 2  # neither brand new nor stale
    x["follow_xor_reply"] = (2 * x["follow"] - 1) * (2 * x["reply"] - 1)
    x["unfollowed"] = 1.0 - x["follow"]
    x["neg_unfollowed"] = x["neg"] * x["unfollowed"]


@dataclass(frozen=True)
class Truth:
    """A world's planted truth: its tasks' profiles, the shared engagement score, how a count becomes an
    input (before standardization), the non-linear mixes the logits read, the dimension of the tastes, and
    a salt that gives the world (and its splits) draws of their own for the same --seed."""

    tasks: dict[str, TaskProfile]
    engage: dict[str, float]
    count_input: Callable[[np.ndarray], np.ndarray]
    mixes: Callable[[dict[str, np.ndarray]], None]
    taste_dims: int = 8
    salt: tuple[int, ...] = ()

    def task_profile(self, task: str) -> TaskProfile:
        return task_profile(task, self.tasks)


DEMO = Truth(PROFILES, ENGAGE, np.log1p, demo_mixes)


def task_profile(task: str, profiles: dict[str, TaskProfile] = PROFILES) -> TaskProfile:
    """A known task's profile, or one made up (deterministically, from the name) for any other label."""
    known = profiles.get(task.removeprefix("recap.engagement."))
    if known:
        return known
    rng = np.random.default_rng(zlib.crc32(task.encode()))
    terms = dict(
        zip(("act", "pop", "fav", "aff", "act_x_fav"), rng.normal(0.0, 0.4, 5).tolist(), strict=True)
    )
    return TaskProfile(float(np.exp(rng.uniform(np.log(0.002), np.log(0.1)))), 0.8, terms)


def solve_bias(logits: np.ndarray, mood: float, rate: float) -> float:
    """The b for which the mean planted probability of logits + b is `rate` (it increases with b)."""
    return brentq(lambda b: integrate_mood(logits + b, mood).mean() - rate, -40.0, 40.0, xtol=1e-6)


def integrate_mood(logits: np.ndarray, mood: np.ndarray | float) -> np.ndarray:
    """E[sigmoid(logit + mood * eta)] over the mood eta ~ N(0, MOOD_STD^2), by Gauss-Hermite quadrature."""
    total = np.zeros_like(logits)
    for node, weight in zip(np.sqrt(2) * MOOD_STD * _GH_NODES, _GH_WEIGHTS, strict=True):
        total += weight * expit(logits + mood * node)
    return total / np.sqrt(np.pi)
