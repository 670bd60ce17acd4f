import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from heavyranker.eval.metrics import EPS, MetricAccumulator, auroc, nrce, rce, task_metrics

METRICS = ("auroc", "rce", "nrce", "ctr", "pctr", "loss", "num_examples", "num_positives")


def sample(n: int, positive_rate: float, seed: int, ties: bool = False):
    """Labels, probabilities that carry some signal, and positive random weights: float32 values (what the
    model and the data give), held as float64 so the references compute in float64."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < positive_rate).astype(np.float64)
    probs = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.5 * labels - 2)))
    if ties:
        probs = np.round(probs, 1) * 0.98 + 0.01  # a handful of distinct values
    weights = rng.uniform(0.1, 5.0, size=n)
    return labels, probs.astype(np.float32).astype(np.float64), weights.astype(np.float32).astype(np.float64)


def closed_form_rce(labels, probs, weights) -> float:
    labels, probs, weights = (np.asarray(a, np.float64) for a in (labels, probs, weights))
    ctr = np.sum(weights * labels) / np.sum(weights)
    ce = -np.sum(weights * (labels * np.log(probs) + (1 - labels) * np.log(1 - probs))) / np.sum(weights)
    ce_base = -(ctr * np.log(ctr) + (1 - ctr) * np.log(1 - ctr))
    return 100 * (1 - ce / ce_base)


def same(a: dict, b: dict) -> bool:
    """Bit-identical, NaN equal to NaN."""
    return a.keys() == b.keys() and all(a[k] == b[k] or (np.isnan(a[k]) and np.isnan(b[k])) for k in a)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_auroc_matches_sklearn(ties, weighted):
    labels, probs, weights = sample(20_000, 0.1, seed=1, ties=ties)
    weights = weights if weighted else None
    assert auroc(labels, probs, weights) == pytest.approx(
        roc_auc_score(labels, probs, sample_weight=weights), abs=1e-12
    )


def test_auroc_is_exact_at_a_tiny_positive_rate():
    labels, probs, weights = sample(100_000, 0.0, seed=2, ties=True)
    labels[[10, 5_000, 77_777]] = 1  # 3 positives in 100k
    assert auroc(labels, probs, weights) == pytest.approx(
        roc_auc_score(labels, probs, sample_weight=weights), abs=1e-12
    )

    # Closed form: distinct scores 0..n-1, positives at known ranks, no weights.
    scores = np.arange(100_000, dtype=np.float64)
    labels = np.zeros(100_000)
    labels[[10, 5_000, 99_999]] = 1
    negatives_below = [10, 4_999, 99_997]  # for each positive, the negatives ranked below it
    assert auroc(labels, scores) == pytest.approx(sum(negatives_below) / (3 * 99_997), abs=1e-15)


def test_auroc_ties_count_one_half():
    # Positive 0.5 ties with one negative and beats one; weights 2 (positive), 1 and 3 (negatives).
    assert auroc([1, 0, 0], [0.5, 0.5, 0.2], [2, 1, 3]) == pytest.approx((2 * 3 + 0.5 * 2 * 1) / (2 * 4))
    assert auroc([1, 0, 1, 0], [0.3] * 4) == 0.5


def test_without_positives_or_negatives_the_ratios_are_nan_not_an_error():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for labels in ([0, 0, 0], [1, 1, 1]):
            metrics = task_metrics(np.array(labels, np.float32), np.array([0.2, 0.5, 0.9]), np.ones(3))
            assert np.isnan(metrics["auroc"]) and np.isnan(metrics["rce"]) and np.isnan(metrics["nrce"])
            assert metrics["ctr"] == labels[0] and metrics["num_positives"] == sum(labels)
            assert np.isfinite(metrics["loss"]) and metrics["num_examples"] == 3
        empty = task_metrics(np.zeros(0), np.zeros(0), np.zeros(0))
        assert all(np.isnan(empty[k]) for k in ("auroc", "rce", "nrce", "ctr", "pctr", "loss"))
        assert empty["num_examples"] == 0 and empty["num_positives"] == 0
        assert np.isnan(auroc([0, 1], [np.nan, 0.5]))  # a NaN prediction has no rank


def test_rce_matches_the_closed_form():
    labels, probs, weights = sample(20_000, 0.05, seed=3)
    assert rce(labels, probs, weights) == pytest.approx(closed_form_rce(labels, probs, weights), rel=1e-9)
    # The same through sklearn's weighted log loss.
    ctr = np.average(labels, weights=weights)
    by_sklearn = 1 - log_loss(labels, probs, sample_weight=weights) / log_loss(
        labels, np.full(len(labels), ctr), sample_weight=weights
    )
    assert rce(labels, probs, weights) == pytest.approx(100 * by_sklearn, rel=1e-9)


def test_nrce_is_the_rce_of_predictions_rescaled_to_the_mean_label():
    labels, probs, weights = sample(20_000, 0.05, seed=4)
    probs = probs * 0.5  # miscalibrated
    scale = np.average(labels, weights=weights) / np.average(probs.astype(np.float64), weights=weights)
    expected = closed_form_rce(labels, probs * scale, weights)
    assert nrce(labels, probs, weights) == pytest.approx(expected, rel=1e-9)
    assert nrce(labels, probs, weights) > rce(labels, probs, weights)


def test_rce_of_the_base_rate_is_zero_and_of_a_perfect_model_is_one_hundred():
    labels = np.array([1, 0, 0, 0], np.float64)
    weights = np.array([1, 1, 2, 4], np.float64)
    ctr = 1 / 8
    assert rce(labels, np.full(4, ctr), weights) == pytest.approx(0, abs=1e-12)
    assert nrce(labels, np.full(4, 2 * ctr), weights) == pytest.approx(0, abs=1e-12)  # rescaled to ctr
    assert rce(labels, labels, weights) == pytest.approx(100, abs=1e-3)  # clipped to EPS, 1 - EPS: finite


def test_predictions_of_exactly_zero_or_one_are_clipped_to_eps():
    labels, probs, weights = np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([1.0, 1.0])
    assert task_metrics(labels, probs, weights)["loss"] == pytest.approx(-np.log(EPS), rel=1e-6)


def test_task_metrics_against_independent_references():
    labels, probs, weights = sample(10_000, 0.2, seed=5, ties=True)
    metrics = task_metrics(labels, probs, weights)
    assert list(metrics) == list(METRICS)
    assert metrics["auroc"] == pytest.approx(roc_auc_score(labels, probs, sample_weight=weights), abs=1e-12)
    assert metrics["rce"] == pytest.approx(closed_form_rce(labels, probs, weights), rel=1e-9)
    assert metrics["ctr"] == pytest.approx(np.average(labels, weights=weights.astype(np.float64)), rel=1e-12)
    assert metrics["pctr"] == pytest.approx(np.average(probs, weights=weights.astype(np.float64)), rel=1e-12)
    assert metrics["loss"] == pytest.approx(log_loss(labels, probs, sample_weight=weights), rel=1e-9)
    assert metrics["num_examples"] == 10_000 and metrics["num_positives"] == labels.sum()


def test_loss_from_logits_is_the_weighted_binary_cross_entropy():
    labels, _, weights = sample(1_000, 0.3, seed=6)
    logits = np.random.default_rng(6).normal(scale=30, size=1_000)  # saturated: probabilities would clip
    expected = (
        torch.nn.functional.binary_cross_entropy_with_logits(
            torch.tensor(logits),
            torch.tensor(labels, dtype=torch.float64),
            torch.tensor(weights, dtype=torch.float64),
            reduction="sum",
        )
        / weights.astype(np.float64).sum()
    )
    metrics = task_metrics(labels, 1 / (1 + np.exp(-logits)), weights, logits=logits)
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-9)


def batches(n_batches: int, tasks: int, seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_batches):
        size = int(rng.integers(0, 300))  # empty batches too
        labels = (rng.random((size, tasks)) < [0.3, 0.01, 0.0][:tasks]).astype(np.float32)
        probs = np.round(rng.random((size, tasks)), 2).astype(np.float32)  # many ties
        probs[:, 0] = 0.25 if i % 2 else probs[:, 0]  # constant stretches: order among ties matters
        weights = rng.choice([1.0, 0.1, 7.3], size=(size, tasks)).astype(np.float32)
        out.append((labels, probs, weights))
    return out


def one_shot(parts, tasks: list[str]) -> dict:
    labels, probs, weights = (np.concatenate([p[k] for p in parts]) for k in range(3))
    return {t: task_metrics(labels[:, j], probs[:, j], weights[:, j]) for j, t in enumerate(tasks)}


def test_accumulating_batches_equals_one_shot():
    tasks = ["a", "b", "c"]
    parts = batches(20, 3, seed=7)
    accumulator = MetricAccumulator(3)
    for labels, probs, weights in parts:
        accumulator.add(torch.from_numpy(labels), torch.from_numpy(probs), torch.from_numpy(weights))
    result = accumulator.compute(tasks)
    expected = one_shot(parts, tasks)
    assert all(same(result[t], expected[t]) for t in tasks)
    assert np.isnan(result["c"]["auroc"])  # no positives in c
    assert same(accumulator.compute(tasks)["a"], result["a"])  # compute does not consume the state


def test_merged_states_equal_one_shot_bit_for_bit_whatever_the_split():
    tasks = ["a", "b", "c"]
    parts = batches(21, 3, seed=8)
    ranks = [MetricAccumulator(3) for _ in range(3)]
    for i, part in enumerate(parts):
        ranks[i % 3].add(*part)  # each rank sees every third batch, as a distributed reader would
    states = [pickle.loads(pickle.dumps(r.state())) for r in ranks]  # as all_gather_object moves them
    merged = MetricAccumulator.from_state(states[2])
    for state in (states[0], states[1]):
        merged.merge(MetricAccumulator.from_state(state))
    result = merged.compute(tasks)
    expected = one_shot(parts, tasks)
    assert all(same(result[t], expected[t]) for t in tasks)


def test_an_empty_accumulator_reports_nan_not_an_error():
    result = MetricAccumulator(2).compute(["a", "b"])
    assert result["a"]["num_examples"] == 0 and np.isnan(result["b"]["auroc"])


def test_bad_shapes_are_named():
    accumulator = MetricAccumulator(2)
    with pytest.raises(
        ValueError, match=r"labels \(4, 3\), probs \(4, 3\) and weights \(4, 3\) must all be \[batch, 2\]"
    ):
        accumulator.add(np.zeros((4, 3)), np.zeros((4, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"labels \(4, 2\), probs \(3, 2\)"):
        accumulator.add(np.zeros((4, 2)), np.zeros((3, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="1 task names for 2 columns: a"):
        accumulator.compute(["a"])
    with pytest.raises(ValueError, match="cannot merge metrics of 3 tasks into metrics of 2"):
        accumulator.merge(MetricAccumulator(3))
    with pytest.raises(ValueError, match=r"labels \(3,\), predictions \(2,\) and weights \(3,\)"):
        auroc([0, 1, 0], [0.1, 0.2])
