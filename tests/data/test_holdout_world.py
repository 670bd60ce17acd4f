"""`data generate --world holdout`: the second benchmark's world, its own truth and its own draws."""

from __future__ import annotations

import glob

import numpy as np
import pytest

from heavyranker.cli import main
from heavyranker.data.synthetic import generate_for_config
from heavyranker.data.synthetic.holdout import HOLDOUT_PROFILES
from heavyranker.data.synthetic.truth import load_truth
from heavyranker.errors import UserError
from tests.data.test_synthetic import TASKS, binomial_gap, decode, write_config


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("worlds")
    config = write_config(tmp)
    config_path = tmp / "config.yaml"
    for world in ("demo", "holdout"):
        args = ["data", "generate", "--config", str(config_path), "--world", world, "--out", str(tmp / world)]
        assert main([*args, "--examples", "12000", "--files", "2", "--seed", "3"]) == 0
    return config, {w: sorted(glob.glob(f"{tmp / w}/train/*.gz")) for w in ("demo", "holdout")}


def test_the_holdout_truth_has_its_own_base_rates_and_labels_follow_it(worlds):
    config, files = worlds
    truth = load_truth(files["holdout"])
    labels = decode(files["holdout"], config, TASKS)
    for j, task in enumerate(truth.tasks):
        planted = truth.true_probabilities[:, j].astype(np.float64)
        rate = HOLDOUT_PROFILES[task.removeprefix("recap.engagement.")].rate
        assert planted.mean() == pytest.approx(rate, rel=0.25), task
        gap, bound = binomial_gap(labels[task][:, 0], planted)
        assert gap <= bound, (task, gap, bound)
    rates = sorted(HOLDOUT_PROFILES[t.removeprefix("recap.engagement.")].rate for t in config.task_names)
    assert rates[-1] == 0.15 and rates[0] == 0.003  # local_small's ten tasks: 15% down to 0.3%


def test_the_same_seed_draws_another_world(worlds):
    config, files = worlds
    demo, holdout = (load_truth(files[w]) for w in ("demo", "holdout"))
    for name in ("user_id", "author_id", "tweet_id"):  # no entity in common
        assert not set(demo.ids[name].tolist()) & set(holdout.ids[name].tolist())
    fav = config.task_names.index("recap.engagement.is_favorited")
    assert holdout.true_probabilities[:, fav].mean() > 1.8 * demo.true_probabilities[:, fav].mean()


def test_an_unknown_world_is_refused(tmp_path):
    with pytest.raises(UserError, match="no world 'other'"):
        generate_for_config(write_config(tmp_path), out=str(tmp_path), examples=100, world="other")
