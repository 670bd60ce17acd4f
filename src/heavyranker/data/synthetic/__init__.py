"""Synthetic Recap data with a planted ground truth: `heavyranker data generate`.

The story. A world of users and authors with hidden traits (activity, grumpiness, popularity, toxicity, a
taste vector); each split shows tweets of those authors to those users. A row holds observed evidence of
the traits: heavy-tailed counts with many exact zeros (engagements, followers, reports, favorites), sparse
flags (has video, follows the author), categorical values, TwHIN-like embeddings that are linear images of
the tastes. Users, authors and tweets recur across rows with the same ids and entity-level features.

The truth. Every label is drawn from a logistic model of OBSERVED features only (as written, float32), so
the planted probability is the best any model of the features can do; it is written next to each data
file (truth.py). The logit mixes a shared engagement score (correlated tasks) with terms a linear model
cannot express: a product of two counts, a user x author embedding affinity (bilinear), a bump in tweet
age, a threshold on past user-author engagements, an XOR of two flags and a gate (only videos get
watched). A hidden per-impression mood, shared by the positive engagements, correlates the labels beyond
the features; the planted probability integrates it out. Each task's bias is solved for a realistic base
rate (a like is common, a report is rare).

Only the continuous and binary columns the config keeps (truncate_and_slice) and the user and author
embeddings carry signal; the other columns are realistic noise. Works for any schema: a narrow one keeps
the most important signals, features with no known role are filled by dtype.
"""

from .layout import Layout, layout_for
from .profiles import PROFILES, TaskProfile
from .splits import default_examples, generate_for_config
from .world import World

__all__ = [
    "PROFILES",
    "Layout",
    "TaskProfile",
    "World",
    "default_examples",
    "generate_for_config",
    "layout_for",
]
