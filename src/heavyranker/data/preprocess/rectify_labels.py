"""preprocess.rectify_labels: a positive counts only if it happened within the window after serving."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ...config.data import RectifyLabels
from ...errors import UserError
from ..batch import Rows, Spec
from .names import task_column

MS_PER_HOUR = 3_600_000


@dataclass(frozen=True)
class LabelRectifier:
    """A positive label counts only if the example was impressed and engaged within the window after it
    was served. Timestamps are milliseconds; with W = label_rectification_window_in_hours * 3,600,000,
    the label of task t stays as it is when

        served <= impressed < served + W   and   served <= engaged_t < served + W

    and becomes 0 otherwise (so a missing timestamp, 0, drops the positive). The reference only checked the
    upper bounds; an impression or engagement before serving is not "within the window after" it.
    Weights are left alone: they undo how the data was sampled, which went by the stored label.

    A timestamp field names a feature of the batch or a schema feature; the dataset reads the latter into
    Rows.extras (see `columns`)."""

    config: RectifyLabels
    needs_labels: ClassVar[bool] = True

    @property
    def columns(self) -> tuple[str, ...]:
        return (
            self.config.served_timestamp_field,
            self.config.impressed_timestamp_field,
            *self.config.label_to_engaged_timestamp_field.values(),
        )

    def output_specs(self, specs: dict[str, Spec]) -> dict[str, Spec]:
        return specs

    def apply(self, rows: Rows) -> Rows:
        config = self.config
        window = config.label_rectification_window_in_hours * MS_PER_HOUR
        served = _field(rows, config.served_timestamp_field, "served_timestamp_field")
        impressed = _field(rows, config.impressed_timestamp_field, "impressed_timestamp_field")
        in_window = _within(impressed, served, window)
        for task, engaged_field in config.label_to_engaged_timestamp_field.items():
            where = "preprocess.rectify_labels.label_to_engaged_timestamp_field"
            column = task_column(rows.tasks, task, where)
            engaged = _field(rows, engaged_field, f"label_to_engaged_timestamp_field.{task}")
            rows.labels[:, column] *= in_window & _within(engaged, served, window)
        return rows


def _within(times: np.ndarray, served: np.ndarray, window: float) -> np.ndarray:
    delay = times - served
    return (delay >= 0) & (delay < window)


def _field(rows: Rows, name: str, where: str) -> np.ndarray:
    values = rows.features.get(name, rows.extras.get(name))
    if values is None:
        raise UserError(f"preprocess.rectify_labels.{where}: {name} was not read")
    if values.ndim != 1:
        raise UserError(
            f"preprocess.rectify_labels.{where}: {name} must hold one value per example, "
            f"it holds {values.shape[1:]}"
        )
    return values
