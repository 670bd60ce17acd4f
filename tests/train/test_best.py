"""BestTracker: the score it selects by, and a marker written under another keep_best."""

import pytest

from heavyranker.config.training import KeepBestConfig
from heavyranker.errors import UserError
from heavyranker.run_folder import BestMarker, RunFolder
from heavyranker.train.best import BestTracker, refuse_undefinable

RESULTS = {
    "validation": {
        "a": {"rce": 1.0, "auroc": 0.6},
        "b": {"rce": 4.0, "auroc": 0.7},
        "a/country": {"rce": 99.0},  # a stratifier's row
    },
    "other": {"a": {"rce": 50.0, "auroc": 0.9}},
}


def test_the_mean_is_over_the_split_tasks_without_the_stratified_rows(tmp_path):
    mean = BestTracker(KeepBestConfig(split="validation"), RunFolder(tmp_path))
    assert mean.score(RESULTS) == 2.5
    one = BestTracker(KeepBestConfig(split="validation", task="b", metric="auroc"), RunFolder(tmp_path))
    assert one.score(RESULTS) == 0.7


def test_a_marker_of_another_choice_is_not_resumed(tmp_path):
    RunFolder(tmp_path).write_best(
        BestMarker(
            step=4,
            split="validation",
            task="mean",
            metric="auroc",
            value=0.8,
            evaluations_without_improvement=2,
            evaluated_step=6,
        )
    )
    same = BestTracker(KeepBestConfig(split="validation", metric="auroc"), RunFolder(tmp_path))
    assert (same.step, same.value, same.misses, same.evaluated_step) == (4, 0.8, 2, 6)
    other = BestTracker(KeepBestConfig(split="validation", metric="rce"), RunFolder(tmp_path))
    assert (other.step, other.misses, other.evaluated_step) == (None, 0, 0)
    assert other.improves(-1e9)


def test_the_mean_leaves_out_the_tasks_whose_metric_is_undefined_and_warns_once(tmp_path, caplog):
    results = {"validation": {"a": {"rce": 1.0}, "b": {"rce": float("nan")}, "c": {"rce": 4.0}}}
    mean = BestTracker(KeepBestConfig(split="validation"), RunFolder(tmp_path))
    with caplog.at_level("WARNING"):
        assert mean.score(results) == 2.5
        assert mean.score(results) == 2.5
    assert caplog.messages == [
        "training.keep_best: rce is undefined on validation for b; the mean leaves it out"
    ]


@pytest.mark.parametrize(
    "ctr, why", [(0.0, "no positives"), (1.0, "no negatives"), (float("nan"), "no examples")]
)
def test_a_keep_best_whose_tasks_all_hold_one_class_is_refused(ctr, why):
    one_class = {"rce": float("nan"), "auroc": float("nan"), "ctr": ctr}
    results = {"validation": {"a": one_class, "b": one_class, "a/country": {"ctr": 0.5}}}
    with pytest.raises(UserError) as info:
        refuse_undefinable(KeepBestConfig(split="validation"), results)
    assert str(info.value).startswith(
        "training.keep_best: rce of mean on validation can never be defined, as every evaluation reads the "
        f"same examples and they hold one class only (a: {why}; b: {why}); "
    )
    results["validation"]["b"] = {"rce": 1.0, "ctr": 0.5}
    refuse_undefinable(KeepBestConfig(split="validation"), results)  # b scores: the mean leaves a out
    with pytest.raises(UserError, match="rce of a on validation can never be defined"):
        refuse_undefinable(KeepBestConfig(split="validation", task="a"), results)
