"""preprocess.extract_features: single columns of dense features as features of their own."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import numpy as np

from ...config.data import ExtractFeatures, ExtractFeaturesRow
from ...errors import UserError
from ..batch import Rows, Spec
from .names import feature

T = TypeVar("T")


@dataclass(frozen=True)
class FeatureExtractor:
    """Adds each row's feature `name`: column `index` of the dense feature `source_tensor`, one value per
    example, of the source's dtype."""

    config: ExtractFeatures
    needs_labels: ClassVar[bool] = False
    columns: ClassVar[tuple[str, ...]] = ()

    def output_specs(self, specs: dict[str, Spec]) -> dict[str, Spec]:
        specs = dict(specs)
        for row in self.config.extract_feature_table:
            source = _source(specs, row)
            _check_index(row, source.shape)
            specs[row.name] = Spec((), source.dtype)
        return specs

    def apply(self, rows: Rows) -> Rows:
        for row in self.config.extract_feature_table:
            source = _source(rows.features, row)
            _check_index(row, source.shape[1:])
            rows.features[row.name] = np.ascontiguousarray(source[:, row.index])
        return rows


def _source(features: Mapping[str, T], row: ExtractFeaturesRow) -> T:
    return feature(features, row.source_tensor, f"preprocess.extract_features ({row.name}).source_tensor")


def _check_index(row: ExtractFeaturesRow, shape: tuple[int, ...]) -> None:
    """`shape`: the source's, of one example."""
    if len(shape) != 1 or row.index >= shape[0]:
        raise UserError(
            f"preprocess.extract_features ({row.name}): index {row.index} is out of range for "
            f"{row.source_tensor}, whose examples have shape {shape}"
        )
