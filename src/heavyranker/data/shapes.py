"""The per-example shape and dtype of every feature a data config yields, without reading any data: the
schema's, as the dataset maps them, then as each configured preprocessor says it changes them
(data/columns.py feature_specs)."""

from __future__ import annotations

import torch

from ..config.data import DataConfig
from .columns import feature_specs


def feature_shapes(data: DataConfig) -> dict[str, tuple[int, ...]]:
    """Feature name (renamed) -> shape of one example, after truncate_and_slice and extract_features.
    Length-1 features (meta ids, timestamps) are scalars: shape ()."""
    return {name: spec.shape for name, spec in feature_specs(data).items()}


def feature_dtypes(data: DataConfig, names: list[str]) -> dict[str, torch.dtype]:
    """The dtype of each of `names` as RecapDataset yields it: float_list -> float32, int64_list -> int64,
    `binary` -> float32 (the dataset converts the flags), an extracted feature -> its source's, and
    preprocess.downcast's."""
    specs = feature_specs(data)
    return {name: specs[name].dtype for name in names}
