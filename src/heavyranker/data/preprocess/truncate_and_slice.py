"""preprocess.truncate_and_slice: continuous and binary keep their first columns, then a mask's."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ...config.data import TruncateAndSlice
from ...errors import UserError
from ..batch import Rows, Spec

SLICED = ("continuous", "binary")  # the features it applies to, by their renamed names


@dataclass(frozen=True)
class Truncator:
    """continuous and binary keep the columns truncated_columns names: their first `*_feature_truncation`
    columns, then, with a mask, the columns where the mask (a .npy vector over the truncated columns) is
    nonzero."""

    config: TruncateAndSlice
    needs_labels: ClassVar[bool] = False
    columns: ClassVar[tuple[str, ...]] = ()

    def output_specs(self, specs: dict[str, Spec]) -> dict[str, Spec]:
        specs = dict(specs)
        for name in SLICED:
            if name in specs:
                kept = truncated_columns(self.config, name, specs[name].shape[0])
                specs[name] = Spec((len(kept),), specs[name].dtype)
        return specs

    def apply(self, rows: Rows) -> Rows:
        for name in SLICED:
            values = rows.features.get(name)
            if values is None:
                continue
            kept = truncated_columns(self.config, name, values.shape[1])
            if len(kept) < values.shape[1]:  # kept columns are increasing: all of them means no change
                rows.features[name] = _take_columns(values, kept)
        return rows


def _take_columns(values: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """A copy (a view would keep the whole decoded row alive) of the `kept` columns of `values`."""
    # Kept columns increase, so a run (a truncation) is a slice, which copies 4x faster than np.take.
    if len(kept) and kept[-1] - kept[0] == len(kept) - 1:
        return np.ascontiguousarray(values[:, kept[0] : kept[-1] + 1])
    return np.take(values, kept, axis=1)


def truncated_columns(config: TruncateAndSlice | None, name: str, width: int) -> np.ndarray:
    """The indices, increasing, of the columns truncate_and_slice keeps of `name` ("continuous" or
    "binary"), a feature of `width` columns: the first `{name}_feature_truncation`, then those its mask
    keeps. Every column without a config. The runtime slicing, the static shapes and the generator all
    take the columns from here."""
    columns = np.arange(width)
    if config is None:
        return columns
    limit, mask = {
        "continuous": (config.continuous_feature_truncation, config.continuous_feature_mask_path),
        "binary": (config.binary_feature_truncation, config.binary_feature_mask_path),
    }[name]
    columns = columns[:limit]
    if mask is not None:
        columns = columns[mask_columns(mask, len(columns))]
    return columns


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
