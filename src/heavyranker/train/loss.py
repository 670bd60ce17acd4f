"""Multi-task binary cross-entropy: a BCE-with-logits per task, weighted per example, averaged over tasks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config.model import ModelConfig


class MultiTaskLoss(nn.Module):
    """loss[i, t] = -w[i, t] * (pos_weight[t] * y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))).

    Per task the reduction is the mean over the batch, sum_i(w * l) / B, not sum(w * l) / sum(w): it is the
    reference implementation's reduction (so its learning rates carry over), the gradient scales with the
    weights the way the downsampling correction intends, and the mean of equal-sized micro-batch losses is
    exactly the loss of their union (gradient accumulation). The total is sum_t(loss_weight[t] * loss[t]) / T:
    the plain mean over tasks when every loss_weight is 1 (the default)."""

    def __init__(
        self, task_names: list[str], pos_weights: list[float], loss_weights: list[float] | None = None
    ):
        super().__init__()
        loss_weights = [1.0] * len(task_names) if loss_weights is None else loss_weights
        if not len(task_names) == len(pos_weights) == len(loss_weights):
            raise ValueError(
                f"{len(task_names)} tasks but {len(pos_weights)} pos_weights "
                f"and {len(loss_weights)} loss_weights"
            )
        self.task_names = list(task_names)
        # Not persistent: they come from the config, so a checkpoint's keys stay the model's.
        self.register_buffer("pos_weight", torch.tensor(pos_weights, dtype=torch.float32), persistent=False)
        self.register_buffer("loss_weight", torch.tensor(loss_weights, dtype=torch.float32), persistent=False)

    def forward(self, logits: Tensor, labels: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """logits, labels, weights: [B, T] in task_names order. Returns (total [], per_task [T]); per_task
        is before the loss weights."""
        expected = (logits.shape[0], len(self.task_names))
        if logits.shape != expected or labels.shape != expected or weights.shape != expected:
            raise ValueError(
                f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)} and weights "
                f"{tuple(weights.shape)} "
                f"must all be [batch, {len(self.task_names)}] (tasks: {', '.join(self.task_names)})"
            )
        losses = F.binary_cross_entropy_with_logits(
            logits.float(), labels.float(), weights.float(), pos_weight=self.pos_weight, reduction="none"
        )
        per_task = losses.mean(dim=0)
        return (per_task * self.loss_weight).mean(), per_task


def build_loss(config: ModelConfig) -> MultiTaskLoss:
    """The loss of the model's tasks, in their order, each with its tower's pos_weight and loss_weight."""
    tasks = config.tasks.values()
    return MultiTaskLoss(list(config.tasks), [t.pos_weight for t in tasks], [t.loss_weight for t in tasks])
