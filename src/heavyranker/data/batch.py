"""What a batch holds: Batch, the torch tensors every consumer of data sees; Rows, the same batch as numpy
arrays while the preprocessors work on it; Spec, one feature of one example."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Batch:
    """features: name -> [B, ...] tensor (continuous float32 [B, C], binary [B, Bn], discrete int64
    [B, D], embeddings float32 [B, E], meta ids int64 [B], extracted features, ...).
    labels and weights: [B, T] float32, column j belongs to tasks[j] (the data config's task order)."""

    features: dict[str, torch.Tensor]
    labels: torch.Tensor
    weights: torch.Tensor
    tasks: tuple[str, ...]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            {k: v.to(device, non_blocking=non_blocking) for k, v in self.features.items()},
            self.labels.to(device, non_blocking=non_blocking),
            self.weights.to(device, non_blocking=non_blocking),
            self.tasks,
        )

    def columns(self, task_names: list[str]) -> list[int]:
        """Label columns of `task_names`, in that order; the data may hold more tasks, in any order."""
        index = {t: i for i, t in enumerate(self.tasks)}
        missing = [t for t in task_names if t not in index]
        if missing:
            raise KeyError(
                f"the batch has no labels for {', '.join(missing)} (it has {', '.join(self.tasks)})"
            )
        return [index[t] for t in task_names]


@dataclass
class Rows:
    """A batch between decoding and torch, as numpy arrays, one row per example. Named Rows, not Examples:
    an Example is the tf.Example record of the wire format (data/tf_example/), not a decoded batch of them.

    features: renamed name -> [N, ...] array; labels and weights: [N, T] float32, column j for tasks[j];
    extras: columns read only for the preprocessors (timestamps), under the names they use."""

    features: dict[str, np.ndarray]
    labels: np.ndarray
    weights: np.ndarray
    tasks: tuple[str, ...]
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def take(self, rows: np.ndarray) -> Rows:
        """The rows at `rows`, in that order."""
        return Rows(
            {k: v[rows] for k, v in self.features.items()},
            self.labels[rows],
            self.weights[rows],
            self.tasks,
            {k: v[rows] for k, v in self.extras.items()},
        )


@dataclass(frozen=True)
class Spec:
    """One feature of one example as a Batch holds it: its shape without the batch dimension (() for one
    value per example) and its torch dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype
