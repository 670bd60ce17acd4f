"""preprocess.downsample_negatives: a batch of every positive and as many negatives as fit, reweighted."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ...config.data import DownsampleNegatives
from ..batch import Rows, Spec
from .names import task_column

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NegativeDownsampler:
    """Keeps every positive and fills the rest of the smaller batch with negatives, reweighted.

    The dataset reads batch_multiplier times the batch. Of its n examples, P are positive for at least one
    task of engagements_list (label > 0); the output keeps b = ceil(n / batch_multiplier) examples: the P
    positives, then the first b - P negatives (the input is already shuffled). Each kept negative stands for
    (n - P) / (b - P) negatives, so its weights (every task's column) are multiplied by that factor and
    the total weight of negatives is what it was before downsampling; positives keep their weights.
    When P > b (batch_multiplier too large for the positive rate) the batch holds only the first b
    positives: that biases the totals, so it is logged, once per downsampler (a dataset builds its own)."""

    config: DownsampleNegatives
    needs_labels: ClassVar[bool] = True
    columns: ClassVar[tuple[str, ...]] = ()
    _warned: bool = field(default=False, init=False, repr=False, compare=False)

    def output_specs(self, specs: dict[str, Spec]) -> dict[str, Spec]:
        return specs

    def apply(self, rows: Rows) -> Rows:
        n = len(rows)
        b = math.ceil(n / self.config.batch_multiplier)
        columns = [
            task_column(rows.tasks, task, "preprocess.downsample_negatives.engagements_list")
            for task in self.config.engagements_list
        ]
        positive = (rows.labels[:, columns] > 0).any(axis=1)
        positives, negatives = np.flatnonzero(positive), np.flatnonzero(~positive)
        if positives.size > b:
            self._warn_once(
                f"downsample_negatives: {positives.size} positives in {n} examples read exceed the batch of "
                f"{b}, so positives were dropped: batch_multiplier {self.config.batch_multiplier} is too "
                f"large for the positive rate (logged once)"
            )
        out = rows.take(np.concatenate([positives, negatives])[:b])
        kept_negatives = b - min(positives.size, b)
        if kept_negatives:
            out.weights[positives.size :] *= np.float32(negatives.size / kept_negatives)
        return out

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            object.__setattr__(self, "_warned", True)  # frozen for its config; this flag alone changes
            log.warning(message)
