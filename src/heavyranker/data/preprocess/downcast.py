"""preprocess.downcast: features cast to smaller types."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ...config.data import DownCast
from ..batch import Rows, Spec
from .names import feature

WHERE = "preprocess.downcast.features"


@dataclass(frozen=True)
class Downcaster:
    """Casts features to float16, bool (nonzero), uint8 (values must lie in 0..255), float32, and bfloat16.
    numpy has no bfloat16: the values are rounded to bfloat16 here (round to nearest even, as torch does)
    and kept in float32; the batch then holds them as torch.bfloat16 (its Spec's dtype), exactly."""

    config: DownCast
    needs_labels: ClassVar[bool] = False
    columns: ClassVar[tuple[str, ...]] = ()

    def output_specs(self, specs: dict[str, Spec]) -> dict[str, Spec]:
        specs = dict(specs)
        for name, dtype in self.config.features.items():
            specs[name] = Spec(feature(specs, name, WHERE).shape, getattr(torch, dtype))
        return specs

    def apply(self, rows: Rows) -> Rows:
        for name, dtype in self.config.features.items():
            values = feature(rows.features, name, WHERE)
            if dtype == "bfloat16":
                rows.features[name] = round_to_bfloat16(values)
            elif dtype == "bool":
                rows.features[name] = values != 0
            else:
                rows.features[name] = values.astype(dtype)
        return rows


def round_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even); NaN stays NaN."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) & np.uint32(0xFFFF0000)
    return np.where(np.isnan(values), np.float32(np.nan), rounded.view(np.float32))
