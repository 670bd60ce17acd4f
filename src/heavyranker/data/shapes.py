"""The per-example shape of every feature a data config yields, without reading any data."""

from __future__ import annotations

from ..config.data import DataConfig
from .preprocess import mask_columns
from .schema import load_schema


def feature_shapes(data: DataConfig) -> dict[str, tuple[int, ...]]:
    """Feature name (renamed) -> shape of one example, after truncate_and_slice and extract_features.
    Length-1 features (meta ids, timestamps) are scalars: shape ()."""
    schema = load_schema(data.seg_dense_schema.schema_path)
    names = dict(data.seg_dense_schema.renamed_features)
    names.update({name: name for name in data.seg_dense_schema.features})
    shapes = {new: _shape(schema[old].length) for new, old in names.items()}
    pre = data.preprocess
    if pre and pre.truncate_and_slice:
        ts = pre.truncate_and_slice
        for name, limit, mask in (
            ("continuous", ts.continuous_feature_truncation, ts.continuous_feature_mask_path),
            ("binary", ts.binary_feature_truncation, ts.binary_feature_mask_path),
        ):
            if name in shapes:
                width = shapes[name][0]
                if limit is not None:
                    width = min(width, limit)
                if mask is not None:
                    width = len(mask_columns(mask, width))
                shapes[name] = (width,)
    if pre and pre.extract_features:
        for row in pre.extract_features.extract_feature_table:
            shapes[row.name] = ()
    return shapes


def _shape(length: int) -> tuple[int, ...]:
    return () if length == 1 else (length,)
