"""The layout of a row: which schema columns play which role (label, id, embedding, wide feature), which
columns the model sees, and the dtype each is written in."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ...config.data import DataConfig
from ...errors import UserError
from ...schema import FeatureSpec
from ..preprocess.truncate_and_slice import SLICED, truncated_columns
from .profiles import SOURCES

EMBEDDINGS = ("user_embedding", "user_eng_embedding", "author_embedding")
META_IDS = {"meta__user_id": "user_id", "meta__tweet_id": "tweet_id", "meta__author_id": "author_id"}
WIDE = ("continuous", "binary", "discrete")


@dataclass(frozen=True)
class Layout:
    """What a row holds: the schema, the role of each schema feature, the labels, the kept columns."""

    specs: dict[str, FeatureSpec]
    roles: dict[str, str]  # schema name -> renamed name (continuous, meta__user_id, ...) or "label"
    tasks: tuple[str, ...]
    kept: dict[str, np.ndarray]  # continuous / binary -> the columns the model sees

    def spec(self, role: str) -> FeatureSpec | None:
        return next((self.specs[name] for name, r in self.roles.items() if r == role), None)

    def kind(self, name: str) -> str:
        """How schema feature `name` is filled: as a label, an id, an embedding, a wide feature, or by its
        dtype."""
        role = self.roles.get(name)
        if role == "label" or role in META_IDS or role in EMBEDDINGS or role in WIDE:
            return role
        dtype = self.specs[name].dtype
        return {"float_list": "other_float", "int64_list": "other_int"}.get(dtype, "other_bytes")


def layout_for(data: DataConfig, validation_data: Mapping[str, DataConfig]) -> Layout:
    """The train split's schema and renames (`data`: train_data); labels for the tasks of every split."""
    for split, other in validation_data.items():
        if other.seg_dense_schema.schema_path != data.seg_dense_schema.schema_path:
            raise UserError(
                f"validation_data.{split}.seg_dense_schema.schema_path differs from train_data's: "
                f"the generator writes one schema for all splits"
            )
    specs = data.seg_dense_schema.specs
    tasks = list(dict.fromkeys([t for d in (data, *validation_data.values()) for t in d.tasks]))
    roles = {old: new for new, old in data.seg_dense_schema.renamed_features.items()}
    roles.update(dict.fromkeys(tasks, "label"))
    layout = Layout(specs, roles, tuple(tasks), {})
    for role in SOURCES:
        spec = layout.spec(role)
        # Only the columns the config keeps carry signal: the generator takes them where training does.
        truncation = data.preprocess.truncate_and_slice if data.preprocess and role in SLICED else None
        layout.kept[role] = truncated_columns(truncation, role, spec.length if spec else 0)
    return layout


def numpy_dtype(spec: FeatureSpec | None) -> type:
    return np.float32 if spec is None or spec.dtype == "float_list" else np.int64


def as_written(values: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """In the schema's dtype and length (a meta id or label the schema makes longer repeats)."""
    if values.shape[1] != spec.length:
        values = np.resize(values, (len(values), spec.length))
    return values if spec.dtype == "bytes_list" else values.astype(numpy_dtype(spec))
