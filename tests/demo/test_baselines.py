import numpy as np
import pytest
import torch
from scipy.special import expit
from sklearn.metrics import log_loss

from heavyranker.demo.baselines import Rows, gradient_boosted_trees, logistic_regression, tree_features
from heavyranker.errors import UserError


def planted(n: int, seed: int) -> tuple[Rows, np.ndarray]:
    """Rows whose two tasks' true probabilities are known: an easy one (a common label driven by a threshold
    on a heavy-tailed feature, a flag and an embedding column) and a rarer one; and those probabilities."""
    rng = np.random.default_rng(seed)
    continuous = rng.lognormal(0.0, 1.5, (n, 4))
    binary = (rng.random((n, 3)) < 0.2).astype(np.int64)
    discrete = rng.integers(0, 50, (n, 2))
    embedding = rng.normal(size=(n, 3))
    easy = expit(-1.5 + 2.0 * (continuous[:, 0] > 2.0) + 1.0 * binary[:, 0] + 0.8 * embedding[:, 0])
    rare = expit(-4.0 + 1.0 * (discrete[:, 1] < 10) + 0.5 * embedding[:, 1])
    truth = np.stack([easy, rare], axis=1)
    features = {
        "continuous": torch.from_numpy(continuous).float(),
        "binary": torch.from_numpy(binary),
        "discrete": torch.from_numpy(discrete),
        "user_embedding": torch.from_numpy(embedding).float(),
    }
    labels = (rng.random(truth.shape) < truth).astype(np.float32)
    return Rows(features, labels, np.ones_like(labels)), truth


def rce(labels: np.ndarray, probs: np.ndarray) -> float:
    """sklearn's cross-entropy against the constant predictor at the base rate."""
    return 100 * (1 - log_loss(labels, probs) / log_loss(labels, np.full(len(labels), labels.mean())))


TASKS = ["easy", "rare"]


@pytest.fixture(scope="module")
def fitted() -> tuple[Rows, np.ndarray, np.ndarray]:
    train, _ = planted(20_000, seed=1)
    test, truth = planted(20_000, seed=2)
    return test, truth, gradient_boosted_trees(TASKS, train, test, seed=0)


def test_lightgbm_beats_the_base_rate_and_nears_the_truth_on_an_easy_task(fitted):
    test, truth, probs = fitted
    assert probs.shape == truth.shape
    for j in range(len(TASKS)):
        assert rce(test.labels[:, j], probs[:, j]) > 0  # better than the constant predictor
    best = rce(test.labels[:, 0], truth[:, 0])
    assert best > 20  # an easy task indeed, or the next line says little
    assert rce(test.labels[:, 0], probs[:, 0]) > best - 1.0


def test_lightgbm_is_deterministic_for_a_seed(fitted):
    test, _, probs = fitted
    train, _ = planted(20_000, seed=1)
    np.testing.assert_array_equal(gradient_boosted_trees(TASKS, train, test, seed=0), probs)
    assert not np.array_equal(gradient_boosted_trees(TASKS, train, test, seed=1), probs)


def test_trees_read_the_features_as_they_are():
    rows, _ = planted(5, seed=0)
    x = tree_features(rows.features)
    f = rows.features
    expected = torch.cat([f["continuous"], f["binary"], f["discrete"], f["user_embedding"]], dim=1)
    np.testing.assert_array_equal(x, expected.float().numpy())


def test_a_task_with_a_single_label_names_itself_before_a_baseline_is_fit():
    rows, _ = planted(100, seed=0)
    rows.labels[:, 1] = 0.0
    for fit in (
        lambda: logistic_regression(TASKS, rows, rows),
        lambda: gradient_boosted_trees(TASKS, rows, rows, 0),
    ):
        with pytest.raises(UserError, match=r"^rare: the first 100 training examples hold a single label"):
            fit()
