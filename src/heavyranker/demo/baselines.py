"""The baselines a ranker is judged against, one model per task, fit on training rows and scored on a
validation split: a logistic regression (the floor) and gradient-boosted trees with LightGBM (what a
practitioner would ship instead of a deep ranker)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import lightgbm
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from ..config import Config
from ..config.data import DataConfig
from ..data.dataset import RecapDataset
from ..errors import UserError

BASELINE_FEATURES = ("continuous", "binary")  # what both baselines need besides embeddings (discrete: trees)

# LightGBM as a practitioner tunes it: a small learning rate with early stopping, leaves of at least 100
# rows and L2 on their values against the noise of rare labels, row and column subsampling.
LIGHTGBM_PARAMS = {
    "objective": "binary",
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_data_in_leaf": 100,
    "lambda_l2": 1.0,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    # Same seed, same trees: histogram building is forced row-wise rather than chosen by timing it, and the
    # thread count is fixed rather than the machine's (float sums are split by thread).
    "deterministic": True,
    "force_row_wise": True,
    # 2 by default; the test suite sets 1: its two workers share two cores, and LightGBM's OpenMP threads
    # spin while they wait: on a loaded machine two took 20x the CPU time of one.
    "num_threads": int(os.environ.get("HEAVYRANKER_LIGHTGBM_THREADS", "2")),
    "verbosity": -1,
}
LIGHTGBM_MAX_ROUNDS = 1000
LIGHTGBM_STOPPING_ROUNDS = 50
LIGHTGBM_HELD_OUT = 0.1  # of the training rows, for early stopping only


@dataclass
class Rows:
    """Examples read from a split: its feature tensors by name, and labels and weights [N, tasks]."""

    features: dict[str, torch.Tensor]
    labels: np.ndarray
    weights: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def read_rows(config: Config, data: DataConfig, limit: int | None = None) -> Rows:
    """The first `limit` examples of a split (all when None), in the order the ranker reads them."""
    features: dict[str, list[torch.Tensor]] = {}
    labels, weights, n = [], [], 0
    with RecapDataset(data, seed=config.training.seed) as dataset:
        for batch in dataset:
            for name, value in batch.features.items():
                features.setdefault(name, []).append(value)
            columns = batch.columns(config.task_names)
            labels.append(batch.labels[:, columns].numpy())
            weights.append(batch.weights[:, columns].numpy())
            n += len(batch)
            if limit is not None and n >= limit:
                break
    return Rows(
        {name: torch.cat(parts)[:limit] for name, parts in features.items()},
        np.concatenate(labels)[:limit],
        np.concatenate(weights)[:limit],
    )


def linear_features(features: dict[str, torch.Tensor]) -> np.ndarray:
    """What a linear model gets: sign*log1p(|x|) of the continuous features (heavy tails would let a few
    rows dominate), binary flags, embeddings."""
    continuous = features["continuous"].float()
    parts = [torch.sign(continuous) * torch.log1p(continuous.abs()), features["binary"].float()]
    parts += [v.float() for k, v in features.items() if k.endswith("embedding")]
    return torch.cat(parts, dim=1).numpy()


def tree_features(features: dict[str, torch.Tensor]) -> np.ndarray:
    """What trees get: the continuous features as they are (splits do not care for monotone transforms),
    binary flags, discrete ids as integers (ordered and up to ~1000 values: as categories they would cost a
    split search each and overfit), embeddings as numeric columns."""
    names = ["continuous", "binary", *(["discrete"] if "discrete" in features else [])]
    names += [k for k in features if k.endswith("embedding")]
    return torch.cat([features[k].float() for k in names], dim=1).numpy()


def logistic_regression(tasks: list[str], train: Rows, test: Rows) -> np.ndarray:
    """One logistic regression per task (label column) on standardised linear_features; test probabilities
    [N, tasks]."""
    scaler = StandardScaler().fit(linear_features(train.features))
    x_train = scaler.transform(linear_features(train.features))
    x_test = scaler.transform(linear_features(test.features))
    columns = []
    for j, task in enumerate(tasks):
        _check_two_labels(task, train.labels[:, j])
        fit = LogisticRegression(max_iter=300).fit(x_train, train.labels[:, j])
        columns.append(fit.predict_proba(x_test)[:, 1])
    return np.stack(columns, axis=1)


def gradient_boosted_trees(tasks: list[str], train: Rows, test: Rows, seed: int) -> np.ndarray:
    """One LightGBM model per task on tree_features, weighted as the ranker's loss weights its examples,
    early-stopped on a held-out LIGHTGBM_HELD_OUT of the training rows; test probabilities [N, tasks]."""
    x_train, x_test = tree_features(train.features), tree_features(test.features)
    held_out = np.random.default_rng(seed).random(len(train)) < LIGHTGBM_HELD_OUT
    params = {**LIGHTGBM_PARAMS, "seed": seed}
    columns = []
    for j, task in enumerate(tasks):
        _check_two_labels(task, train.labels[:, j])
        y, w = train.labels[:, j], train.weights[:, j]
        fit_set = lightgbm.Dataset(x_train[~held_out], y[~held_out], weight=w[~held_out], params=params)
        stop_set = fit_set.create_valid(x_train[held_out], y[held_out], weight=w[held_out])
        booster = lightgbm.train(
            params,
            fit_set,
            num_boost_round=LIGHTGBM_MAX_ROUNDS,
            valid_sets=[stop_set],
            callbacks=[lightgbm.early_stopping(LIGHTGBM_STOPPING_ROUNDS, verbose=False)],
        )
        columns.append(booster.predict(x_test, num_iteration=booster.best_iteration))
    return np.stack(columns, axis=1)


def _check_two_labels(task: str, labels: np.ndarray) -> None:
    if len(np.unique(labels)) < 2:  # neither model can be fit to a single class
        raise UserError(
            f"{task}: the first {len(labels)} training examples hold a single label, so the demo's baselines "
            f"cannot be fit; give the demo a config whose tasks all have positives"
        )
