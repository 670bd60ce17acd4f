"""Per-task metrics of binary predictions, with sample weights, accumulated in float64.

Every metric takes labels y (0/1), predictions p and weights w >= 0 (all ones when None); an example counts
w * y towards the positives and w * (1 - y) towards the negatives. A task without positives or without
negatives has no AUROC, RCE or NRCE: those are NaN, not an error. No examples at all: every ratio is NaN.
"""

from __future__ import annotations

import numpy as np
import torch

from ..runtime import Runtime

ArrayLike = np.ndarray | torch.Tensor

# Cross-entropy clips predictions to [EPS, 1 - EPS]. float32 (the model's output) cannot resolve 1 - p
# below ~6e-8, so closer to 0 or 1 means nothing; 1e-7 (Keras's epsilon) caps one example's loss at 16.1 nats.
EPS = 1e-7


def auroc(labels: ArrayLike, scores: ArrayLike, weights: ArrayLike | None = None) -> float:
    """Weighted Mann-Whitney: the weighted fraction of (positive, negative) pairs ranked correctly, ties
    counting one half. Sort-based and exact (no thresholds or bins), so it holds at any positive rate."""
    labels, scores, weights = _float64(labels, scores, weights)
    positive, negative = weights * labels, weights * (1.0 - labels)
    total_positive, total_negative = positive.sum(), negative.sum()
    if not (total_positive > 0 and total_negative > 0) or np.isnan(scores).any():
        return float("nan")
    order = np.argsort(scores, kind="stable")
    scores, positive, negative = scores[order], positive[order], negative[order]
    # One group per distinct score: a positive beats the negatives of every lower group, ties with its own.
    starts = np.flatnonzero(np.concatenate(([True], scores[1:] != scores[:-1])))
    group_positive = np.add.reduceat(positive, starts)
    group_negative = np.add.reduceat(negative, starts)
    negative_below = np.concatenate(([0.0], np.cumsum(group_negative)[:-1]))
    wins = np.sum(group_positive * (negative_below + 0.5 * group_negative))
    return float(wins / (total_positive * total_negative))


def rce(labels: ArrayLike, probs: ArrayLike, weights: ArrayLike | None = None) -> float:
    """Relative cross-entropy: 100 * (1 - CE(model) / CE(the constant predictor at the weighted mean label)).
    Both predictors are clipped to [EPS, 1 - EPS]. 0 = no better than the base rate; 100 = perfect."""
    labels, probs, weights = _float64(labels, probs, weights)
    ctr = _weighted_mean(labels, weights)
    if not 0.0 < ctr < 1.0:
        return float("nan")
    base = np.clip(ctr, EPS, 1.0 - EPS)
    baseline = -(ctr * np.log(base) + (1.0 - ctr) * np.log1p(-base))
    return float(100.0 * (1.0 - _cross_entropy(labels, probs, weights) / baseline))


def nrce(labels: ArrayLike, probs: ArrayLike, weights: ArrayLike | None = None) -> float:
    """RCE after scaling the predictions so their weighted mean equals the weighted mean label: what the
    ranking is worth once the overall calibration is fixed."""
    labels, probs, weights = _float64(labels, probs, weights)
    pctr = _weighted_mean(probs, weights)
    if not pctr > 0.0:
        return float("nan")
    return rce(labels, probs * (_weighted_mean(labels, weights) / pctr), weights)


def task_metrics(
    labels: ArrayLike, probs: ArrayLike, weights: ArrayLike, logits: ArrayLike | None = None
) -> dict[str, float]:
    """auroc, rce, nrce, ctr (weighted mean label), pctr (weighted mean prediction), loss (weighted mean
    cross-entropy: of the logits when given, else of the clipped probabilities), num_examples, num_positives.

    The examples are first put in a canonical order (by prediction, label, weight, logit), so the float sums
    and so the results are bit-identical however the examples were split into batches, ranks or states."""
    keys = [k for k in (logits, weights, labels, probs) if k is not None]
    order = np.lexsort([_numpy(k) for k in keys])  # the last key sorts first
    labels, probs, weights = (_numpy(a)[order].astype(np.float64) for a in (labels, probs, weights))
    if logits is None:
        loss = _cross_entropy(labels, probs, weights)
    else:
        x = _numpy(logits)[order].astype(np.float64)
        loss = _weighted_mean(np.maximum(x, 0.0) - x * labels + np.log1p(np.exp(-np.abs(x))), weights)
    return {
        "auroc": auroc(labels, probs, weights),
        "rce": rce(labels, probs, weights),
        "nrce": nrce(labels, probs, weights),
        "ctr": _weighted_mean(labels, weights),
        "pctr": _weighted_mean(probs, weights),
        "loss": loss,
        "num_examples": float(labels.size),
        "num_positives": float(labels.sum()),
    }


class MetricAccumulator:
    """Collects [B, T] labels, probabilities and weights batch by batch (AUROC needs every prediction, so it
    keeps them all, as float32: 12 bytes per example and task). For several ranks: gather each rank's
    state(), then `merge(MetricAccumulator.from_state(s))`; the metrics equal a single process's exactly."""

    FIELDS = ("labels", "probs", "weights")

    def __init__(self, num_tasks: int):
        self.num_tasks = num_tasks
        self._chunks: dict[str, list[np.ndarray]] = {name: [] for name in self.FIELDS}

    def add(self, labels: ArrayLike, probs: ArrayLike, weights: ArrayLike) -> None:
        # A copy: a caller may reuse its buffers for the next batch.
        arrays = [np.array(_numpy(a), dtype=np.float32) for a in (labels, probs, weights)]
        shapes = [a.shape for a in arrays]
        if any(s != shapes[0] or len(s) != 2 or s[1] != self.num_tasks for s in shapes):
            raise ValueError(
                f"labels {shapes[0]}, probs {shapes[1]} and weights {shapes[2]} must all be "
                f"[batch, {self.num_tasks}]"
            )
        for name, array in zip(self.FIELDS, arrays, strict=True):
            self._chunks[name].append(array)

    def state(self) -> dict[str, np.ndarray]:
        """Plain arrays (picklable, e.g. for torch.distributed.all_gather_object)."""
        for name, chunks in self._chunks.items():
            self._chunks[name] = [
                np.concatenate(chunks) if chunks else np.zeros((0, self.num_tasks), np.float32)
            ]
        return {name: chunks[0] for name, chunks in self._chunks.items()}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> MetricAccumulator:
        accumulator = cls(state["labels"].shape[1])
        accumulator.add(state["labels"], state["probs"], state["weights"])
        return accumulator

    def merge(self, other: MetricAccumulator) -> None:
        if other.num_tasks != self.num_tasks:
            raise ValueError(
                f"cannot merge metrics of {other.num_tasks} tasks into metrics of {self.num_tasks}"
            )
        for name in self.FIELDS:
            self._chunks[name] += other._chunks[name]

    def compute(self, task_names: list[str]) -> dict[str, dict[str, float]]:
        """{task: task_metrics(...)} with task_names naming the columns, in order."""
        if len(task_names) != self.num_tasks:
            raise ValueError(
                f"{len(task_names)} task names for {self.num_tasks} columns: {', '.join(task_names)}"
            )
        state = self.state()
        return {
            task: task_metrics(state["labels"][:, j], state["probs"][:, j], state["weights"][:, j])
            for j, task in enumerate(task_names)
        }


def gather_metrics(accumulator: MetricAccumulator, runtime: Runtime) -> MetricAccumulator:
    """Every rank's examples in one accumulator, on every rank: the metrics are exactly those of one process
    that saw them all (MetricAccumulator puts the examples in a canonical order before summing)."""
    if not runtime.distributed:
        return accumulator
    merged = MetricAccumulator(accumulator.num_tasks)
    for state in runtime.gather(accumulator.state()):
        merged.merge(MetricAccumulator.from_state(state))
    return merged


def _numpy(array: ArrayLike) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _float64(
    labels: ArrayLike, predictions: ArrayLike, weights: ArrayLike | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels, predictions = _numpy(labels).astype(np.float64), _numpy(predictions).astype(np.float64)
    weights = np.ones_like(labels) if weights is None else _numpy(weights).astype(np.float64)
    if labels.ndim != 1 or labels.shape != predictions.shape or labels.shape != weights.shape:
        raise ValueError(
            f"labels {labels.shape}, predictions {predictions.shape} and weights {weights.shape} must be one "
            "vector each, of the same length"
        )
    return labels, predictions, weights


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    total = weights.sum()
    # np.sum, not np.dot: its pairwise order is fixed, BLAS's may depend on memory alignment.
    return float(np.sum(weights * values) / total) if total > 0 else float("nan")


def _cross_entropy(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> float:
    p = np.clip(probs, EPS, 1.0 - EPS)
    return -_weighted_mean(labels * np.log(p) + (1.0 - labels) * np.log1p(-p), weights)
