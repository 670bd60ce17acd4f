"""The per-example shape and dtype of every feature a data config yields, without reading any data."""

from __future__ import annotations

import torch

from ..config.data import DataConfig
from ..schema import load_schema
from .preprocess import mask_columns


def feature_shapes(data: DataConfig) -> dict[str, tuple[int, ...]]:
    """Feature name (renamed) -> shape of one example, after truncate_and_slice and extract_features.
    Length-1 features (meta ids, timestamps) are scalars: shape ()."""
    schema = load_schema(data.seg_dense_schema.schema_path)
    shapes = {new: _shape(schema[old].length) for new, old in _sources(data).items()}
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


def feature_dtypes(data: DataConfig, names: list[str]) -> dict[str, torch.dtype]:
    """The dtype of each feature as RecapDataset yields it: float_list -> float32, int64_list -> int64,
    `binary` -> float32 (the dataset converts the flags), an extracted feature -> its source's, and
    preprocess.downcast last."""
    schema = load_schema(data.seg_dense_schema.schema_path)
    sources = _sources(data)
    pre = data.preprocess
    extracted = (
        {r.name: r.source_tensor for r in pre.extract_features.extract_feature_table}
        if (pre and pre.extract_features)
        else {}
    )
    downcast = pre.downcast.features if pre and pre.downcast else {}

    def dtype(name: str) -> torch.dtype:
        if name in downcast:
            return getattr(torch, downcast[name])
        if name in extracted:
            return dtype(extracted[name])
        if name == "binary":
            return torch.float32
        return torch.float32 if schema[sources[name]].dtype == "float_list" else torch.int64

    return {name: dtype(name) for name in names}


def _sources(data: DataConfig) -> dict[str, str]:
    """Feature name as the batch holds it -> its name in the schema."""
    sources = dict(data.seg_dense_schema.renamed_features)
    sources.update({name: name for name in data.seg_dense_schema.features})
    return sources


def _shape(length: int) -> tuple[int, ...]:
    return () if length == 1 else (length,)
