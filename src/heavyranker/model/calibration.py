"""Undo the downsampling of the training data: if negatives were kept at rate n and positives at rate p, a
probability q learned on that data corresponds to q * r / (1 - q + r * q) with r = n / p on the full data."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..config.data import TaskData


def calibrate(probabilities: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """probabilities [B, T], ratio [T] (r = neg_downsampling_rate / pos_downsampling_rate per task)."""
    return probabilities * ratio / (1.0 - probabilities + ratio * probabilities)


def downsampling_ratios(label_rates: Mapping[str, TaskData], task_names: list[str]) -> torch.Tensor:
    """r per task, in task_names order, from the rates the data kept each label at (a data config's
    `tasks`); 1 (identity) for a task kept at equal rates."""
    rates = [label_rates[t].neg_downsampling_rate / label_rates[t].pos_downsampling_rate for t in task_names]
    return torch.tensor(rates, dtype=torch.float32)
