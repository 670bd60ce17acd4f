"""The unit every consumer of data sees: torch tensors, labels matched to tasks by name."""

from __future__ import annotations

from dataclasses import dataclass

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
