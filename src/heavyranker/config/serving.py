"""`serving:` — how the per-engagement probabilities become one ranking score."""

from __future__ import annotations

from pydantic import Field

from .base import Float, StrictModel

# The published home-timeline weighting, for the task names of the seed config.
PUBLISHED_ENGAGEMENT_WEIGHTS: dict[str, float] = {
    "recap.engagement.is_favorited": 0.5,
    "recap.engagement.is_retweeted": 1.0,
    "recap.engagement.is_replied": 13.5,
    "recap.engagement.is_profile_clicked_and_profile_engaged": 12.0,
    "recap.engagement.is_video_playback_50": 0.005,
    "recap.engagement.is_replied_reply_engaged_by_author": 75.0,
    "recap.engagement.is_good_clicked_convo_desc_favorited_or_replied": 11.0,
    "recap.engagement.is_good_clicked_convo_desc_v2": 10.0,
    "recap.engagement.is_negative_feedback_v2": -74.0,
    "recap.engagement.is_report_tweet_clicked": -369.0,
}

# A model task the published table does not name counts with this weight unless the config says otherwise.
DEFAULT_ENGAGEMENT_WEIGHT = 1.0


class ServingConfig(StrictModel):
    """How the per-engagement probabilities become one ranking score, sum_i weight_i * p_i."""

    engagement_weights: dict[str, Float] | None = Field(
        None,
        description="Task name -> weight of its probability in the score; default: the published weights.",
    )


def default_engagement_weights(task_names: list[str]) -> dict[str, float]:
    return {t: PUBLISHED_ENGAGEMENT_WEIGHTS.get(t, DEFAULT_ENGAGEMENT_WEIGHT) for t in task_names}
