"""The preprocessors of `preprocess:`, on numpy arrays of a whole batch, applied in a fixed order:
downsample_negatives, truncate_and_slice, downcast, rectify_labels, extract_features."""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

import numpy as np

from ..config.data import (
    DownCast,
    DownsampleNegatives,
    ExtractFeatures,
    Preprocess,
    RectifyLabels,
    TruncateAndSlice,
)
from ..errors import UserError

log = logging.getLogger(__name__)

MS_PER_HOUR = 3_600_000


@dataclass
class Examples:
    """A batch between decoding and torch. features: renamed name -> [N, ...] array; labels and weights:
    [N, T] float32, column j for tasks[j]; extras: columns read only for preprocessing (timestamps)."""

    features: dict[str, np.ndarray]
    labels: np.ndarray
    weights: np.ndarray
    tasks: tuple[str, ...]
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def take(self, rows: np.ndarray) -> Examples:
        """The examples at `rows`, in that order."""
        return Examples(
            {k: v[rows] for k, v in self.features.items()},
            self.labels[rows],
            self.weights[rows],
            self.tasks,
            {k: v[rows] for k, v in self.extras.items()},
        )


def preprocess(ex: Examples, config: Preprocess | None, *, with_labels: bool = True) -> Examples:
    """Every configured preprocessor, in the fixed order. with_labels=False (prediction: the labels are
    not read) skips the two that need labels, downsample_negatives and rectify_labels."""
    if config is None:
        return ex
    if config.downsample_negatives and with_labels:
        ex = downsample_negatives(ex, config.downsample_negatives)
    if config.truncate_and_slice:
        truncate_and_slice(ex, config.truncate_and_slice)
    if config.downcast:
        downcast(ex, config.downcast)
    if config.rectify_labels and with_labels:
        rectify_labels(ex, config.rectify_labels)
    if config.extract_features:
        extract_features(ex, config.extract_features)
    return ex


def downsample_negatives(ex: Examples, config: DownsampleNegatives) -> Examples:
    """Keeps every positive and fills the rest of the smaller batch with negatives, reweighted.

    The dataset reads batch_multiplier times the batch. Of its n examples, P are positive for at least one
    task of engagements_list (label > 0); the output keeps b = ceil(n / batch_multiplier) examples: the P
    positives, then the first b - P negatives (the input is already shuffled). Each kept negative stands for
    (n - P) / (b - P) negatives, so its weights (every task's column) are multiplied by that factor and
    the total weight of negatives is what it was before downsampling; positives keep their weights.
    When P > b (batch_multiplier too large for the positive rate) the batch holds only the first b
    positives: that biases the totals, so it is logged."""
    n = len(ex)
    b = math.ceil(n / config.batch_multiplier)
    columns = [
        _task_column(ex.tasks, task, "preprocess.downsample_negatives.engagements_list")
        for task in config.engagements_list
    ]
    positive = (ex.labels[:, columns] > 0).any(axis=1)
    positives, negatives = np.flatnonzero(positive), np.flatnonzero(~positive)
    if positives.size > b:
        _warn_once(
            "positives dropped",
            f"downsample_negatives: {positives.size} positives in {n} examples read exceed the batch of {b}, "
            f"so positives were dropped: batch_multiplier {config.batch_multiplier} is too large for the "
            f"positive rate (logged once)",
        )
    rows = np.concatenate([positives, negatives])[:b]
    out = ex.take(rows)
    kept_negatives = b - min(positives.size, b)
    if kept_negatives:
        out.weights[positives.size :] *= np.float32(negatives.size / kept_negatives)
    return out


def truncate_and_slice(ex: Examples, config: TruncateAndSlice) -> None:
    """continuous and binary keep their first `*_feature_truncation` columns, then, with a mask, the
    columns where the mask (a .npy vector over the truncated columns) is nonzero."""
    for name, limit, mask_path in (
        ("continuous", config.continuous_feature_truncation, config.continuous_feature_mask_path),
        ("binary", config.binary_feature_truncation, config.binary_feature_mask_path),
    ):
        if name not in ex.features:
            continue
        values = ex.features[name]
        if limit is not None:
            values = values[:, :limit]
        if mask_path is not None:
            values = values[:, mask_columns(mask_path, values.shape[1])]
        ex.features[name] = np.ascontiguousarray(values)  # a view would keep the whole decoded row alive


@functools.lru_cache(maxsize=8)
def mask_columns(path: str, width: int) -> np.ndarray:
    """The columns a slicing mask keeps: the indices of its nonzero entries, which must lie within the
    `width` columns it applies to."""
    try:
        mask = np.load(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the feature mask (a .npy vector): {e}") from None
    if mask.ndim != 1:
        raise UserError(f"{path}: a feature mask must be a vector, this one has shape {mask.shape}")
    columns = np.flatnonzero(mask)
    if columns.size and columns[-1] >= width:
        raise UserError(
            f"{path}: the mask keeps column {columns[-1]}, but the feature has {width} columns "
            f"(after truncation)"
        )
    return columns


def downcast(ex: Examples, config: DownCast) -> None:
    """Casts features to smaller types: float16, bool (nonzero), uint8 (values must lie in 0..255), float32,
    and bfloat16. numpy has no bfloat16: the values are rounded to bfloat16 here (round to nearest even, as
    torch does) and kept in float32; the batch then holds them as torch.bfloat16, exactly."""
    for name, dtype in config.features.items():
        values = _feature(ex, name, "preprocess.downcast.features")
        if dtype == "bfloat16":
            ex.features[name] = round_to_bfloat16(values)
        elif dtype == "bool":
            ex.features[name] = values != 0
        else:
            ex.features[name] = values.astype(dtype)


def round_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even); NaN stays NaN."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) & np.uint32(0xFFFF0000)
    return np.where(np.isnan(values), np.float32(np.nan), rounded.view(np.float32))


def rectify_labels(ex: Examples, config: RectifyLabels) -> None:
    """A positive label counts only if the example was impressed and engaged within the window after it
    was served. Timestamps are milliseconds; with W = label_rectification_window_in_hours * 3,600,000,
    the label of task t stays as it is when

        served <= impressed < served + W   and   served <= engaged_t < served + W

    and becomes 0 otherwise (so a missing timestamp, 0, drops the positive). The reference only checked the
    upper bounds; an impression or engagement before serving is not "within the window after" it.
    Weights are left alone: they undo how the data was sampled, which went by the stored label."""
    window = config.label_rectification_window_in_hours * MS_PER_HOUR
    served = _field(ex, config.served_timestamp_field, "served_timestamp_field")
    in_window = _within(
        _field(ex, config.impressed_timestamp_field, "impressed_timestamp_field"), served, window
    )
    for task, engaged_field in config.label_to_engaged_timestamp_field.items():
        column = _task_column(ex.tasks, task, "preprocess.rectify_labels.label_to_engaged_timestamp_field")
        engaged = _field(ex, engaged_field, f"label_to_engaged_timestamp_field.{task}")
        ex.labels[:, column] *= in_window & _within(engaged, served, window)


def extract_features(ex: Examples, config: ExtractFeatures) -> None:
    """Adds each row's feature `name`: column `index` of the dense feature `source_tensor`, shape [N]."""
    for row in config.extract_feature_table:
        source = _feature(ex, row.source_tensor, f"preprocess.extract_features ({row.name}).source_tensor")
        if source.ndim != 2 or row.index >= source.shape[1]:
            raise UserError(
                f"preprocess.extract_features ({row.name}): index {row.index} is out of range for "
                f"{row.source_tensor}, whose examples have shape {source.shape[1:]}"
            )
        ex.features[row.name] = np.ascontiguousarray(source[:, row.index])


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def _within(times: np.ndarray, served: np.ndarray, window: float) -> np.ndarray:
    delay = times - served
    return (delay >= 0) & (delay < window)


def _task_column(tasks: tuple[str, ...], task: str, where: str) -> int:
    if task not in tasks:
        raise UserError(f"{where}: {task} is not a task of this data config (tasks: {', '.join(tasks)})")
    return tasks.index(task)


def _feature(ex: Examples, name: str, where: str) -> np.ndarray:
    if name not in ex.features:
        raise UserError(f"{where}: no feature {name} (features: {', '.join(ex.features)})")
    return ex.features[name]


def _field(ex: Examples, name: str, where: str) -> np.ndarray:
    values = ex.features.get(name, ex.extras.get(name))
    if values is None:
        raise UserError(f"preprocess.rectify_labels.{where}: {name} was not read")
    if values.ndim != 1:
        raise UserError(
            f"preprocess.rectify_labels.{where}: {name} must hold one value per example, "
            f"it holds {values.shape[1:]}"
        )
    return values
