"""BestTracker: the score it selects by, and a marker written under another keep_best."""

from heavyranker.config.training import KeepBestConfig
from heavyranker.run_folder import BestMarker, RunFolder
from heavyranker.train.best import BestTracker

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
