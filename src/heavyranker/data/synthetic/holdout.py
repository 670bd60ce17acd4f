"""The second, independent benchmark's world (`data generate --world holdout`): the same story as the demo's
(users, authors, tweets, the same observed columns) with another planted truth, kept out of all tuning.

What differs from the demo's truth (profiles.py): counts enter as cube roots, not logarithms (a ranker's
log featurization no longer has the truth's shape); tastes have 4 dimensions, not 8 (the embedding affinity
matters more); the shared engagement score and every task read other non-linear mixes (saturations,
steps, other products); base rates run from 15% down to 0.3% over local_small's ten tasks; and a salt gives
the world and its splits draws of their own for any --seed."""

from __future__ import annotations

import numpy as np

from .profiles import DEMO, TaskProfile, Truth

HOLDOUT_PROFILES: dict[str, TaskProfile] = {
    "is_favorited": TaskProfile(0.15, 1.0, {"image_x_act": 0.5}),
    "is_tweet_detail_dwelled_15_sec": TaskProfile(0.1, 0.7, {"image": 0.4}),
    "is_video_playback_50": TaskProfile(0.08, 0.8, {"fresh": 0.5}, gate="video"),
    "is_good_clicked_convo_desc_v2": TaskProfile(0.05, 0.8, {"reply": 0.8, "fav_sat": -0.4}),
    "is_replied": TaskProfile(0.03, 0.8, {"follow": 0.7, "neg_x_pop": -0.4}),
    "is_retweeted": TaskProfile(0.02, 0.9, {"pop_sat": 0.8, "fav_sat": 0.5}),
    "is_good_clicked_convo_desc_favorited_or_replied": TaskProfile(
        0.012, 1.0, {"reply": 0.6, "act_x_aff": 0.4}
    ),
    "is_bookmarked": TaskProfile(0.01, 0.8, {"fav_sat": 0.4}),
    "is_profile_clicked_and_profile_engaged": TaskProfile(0.008, 0.7, {"unfollowed": 0.9, "aff": 0.6}),
    "is_shared": TaskProfile(0.006, 0.7, {"pop_sat": 0.5}),
    "is_negative_feedback_v2": TaskProfile(
        0.005, -0.6, {"neg": 0.6, "reported": 0.5, "neg_x_pop": 0.4}, mood=-0.3
    ),
    "is_replied_reply_engaged_by_author": TaskProfile(0.004, 0.8, {"pop_sat": -1.0, "ua_any": 0.8}),
    "is_report_tweet_clicked": TaskProfile(0.003, -0.7, {"reported": 0.9, "neg": 0.4}, mood=-0.4),
}
HOLDOUT_ENGAGE = {"act": 0.5, "aff": 0.8, "act_x_aff": 0.5, "fresh": 0.6, "pop_sat": 0.4, "ua_any": 0.5}


def holdout_mixes(x: dict[str, np.ndarray]) -> None:
    """The holdout truth's non-linear inputs, from the standardized cube-root counts, flags and affinity."""
    x["ua_any"] = (x.pop("ua") > 0).astype(np.float64)  # any past engagement with the author
    x["act_x_aff"] = x["act"] * x["aff"]
    x["pop_sat"] = np.tanh(x["pop"])
    x["fav_sat"] = np.tanh(x["fav"] - 1.0)
    x["fresh"] = (x["age"] < -0.5).astype(np.float64)  # a step, where the demo has a bump
    x["reported"] = (x["rep"] > 1.0).astype(np.float64)
    x["neg_x_pop"] = x["neg"] * x["pop"]
    x["image_x_act"] = x["image"] * x["act"]
    x["unfollowed"] = 1.0 - x["follow"]


HOLDOUT = Truth(HOLDOUT_PROFILES, HOLDOUT_ENGAGE, np.cbrt, holdout_mixes, taste_dims=4, salt=(27,))
WORLDS = {"demo": DEMO, "holdout": HOLDOUT}  # `data generate --world`
