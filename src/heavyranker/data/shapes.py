"""The per-example shape of every feature a data config yields, without reading any data: the schema's, as
the dataset maps them, then as each configured preprocessor says it changes them (data/columns.py
feature_specs, which gives the dtypes too)."""

from __future__ import annotations

from ..config.data import DataConfig
from .columns import feature_specs


def feature_shapes(data: DataConfig) -> dict[str, tuple[int, ...]]:
    """Feature name (renamed) -> shape of one example, after truncate_and_slice and extract_features.
    Length-1 features (meta ids, timestamps) are scalars: shape ()."""
    return {name: spec.shape for name, spec in feature_specs(data).items()}
