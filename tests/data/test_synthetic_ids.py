"""`data generate --id-effects`: raw int64 user and author ids (negative ones too) with Zipf frequencies
and a hidden per-id effect on the engagements; off by default, where the data is as it was."""

from __future__ import annotations

import numpy as np
import pytest

from heavyranker.data.synthetic import World, generate_for_config, layout_for
from heavyranker.data.synthetic.truth import load_truth
from heavyranker.errors import UserError
from tests.data.test_synthetic import FAV, write_config


@pytest.fixture(scope="module")
def with_ids(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ids")
    config = write_config(tmp)
    files = generate_for_config(config, examples=20_000, files=2, seed=1, id_effects=1.5)
    truth = load_truth([f for f in files if "/train/" in f])
    return config, truth.ids, truth.true_labels[:, list(truth.tasks).index(FAV)]


def test_ids_are_raw_int64_of_both_signs(with_ids):
    _, ids, _ = with_ids
    for values in (ids["user_id"], ids["author_id"]):
        assert values.dtype == np.int64
        assert (values < -(2**62)).any() and (values > 2**62).any()  # beyond the old [2**20, 2**62)
        assert not (values == -1).any()  # the id tables' padding id


def test_frequencies_are_zipf_like(with_ids):
    _, ids, _ = with_ids
    counts = np.sort(np.unique(ids["user_id"], return_counts=True)[1])[::-1]
    # 1/k frequencies (times the users' activity): the head is far above the median, a long tail of few
    assert counts[0] > 20 * np.median(counts)
    assert (counts <= 3).mean() > 0.3


def test_the_planted_user_effect_moves_the_engagement_rate(with_ids):
    config, ids, labels = with_ids
    world = World(layout_for(config.train_data, config.validation_data), users=2500, seed=1, id_effects=1.5)
    effect = dict(zip(world.users.ids.tolist(), world.users.traits["effect"].tolist(), strict=True))
    per_row = np.array([effect[u] for u in ids["user_id"].tolist()])
    high, low = labels[per_row > 1.5].mean(), labels[per_row < -1.5].mean()
    assert high > 3 * low  # +-1 standard deviation of the effect: several times the like rate


def test_id_effects_off_by_default_and_never_negative(tmp_path):
    config = write_config(tmp_path)
    with pytest.raises(UserError, match="id_effects must be 0"):
        generate_for_config(config, examples=100, files=1, id_effects=-1.0)
    world = World(layout_for(config.train_data, config.validation_data), users=64, seed=0)
    assert "effect" not in world.users.traits and (world.users.ids >= 2**20).all()


def test_rows_per_user_and_per_author_set_how_many_there_are(tmp_path):
    """The issue's held-out data: about 25 impressions per user and 130 per author (train split)."""
    config = write_config(tmp_path)
    files = generate_for_config(
        config, examples=5200, files=1, seed=2, id_effects=1.0, rows_per_user=26, rows_per_author=130
    )
    ids = load_truth([f for f in files if "/train/" in f]).ids
    users, authors = (len(np.unique(ids[key])) for key in ("user_id", "author_id"))
    # 200 users and 40 authors drawn Zipf-like: nearly all are seen in 5,200 rows, none beyond them.
    assert 150 <= users <= 200 and 30 <= authors <= 40
    with pytest.raises(UserError, match="rows per user and per author must be positive"):
        generate_for_config(config, examples=100, files=1, rows_per_author=0)
