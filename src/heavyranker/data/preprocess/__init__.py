"""The preprocessors of `preprocess:`, on numpy arrays of a whole batch (Rows), in a fixed order:
downsample_negatives, truncate_and_slice, downcast, rectify_labels, extract_features.

Each is one object built from its config section, in a module of its own. It applies itself to a batch,
states what it does to the features of one example (so that data/shapes.py knows the model's inputs
without reading data), names the extra columns it reads, and says whether it needs labels. A new one is
a module here and a line in build_preprocessors."""

from __future__ import annotations

from typing import Protocol

from ...config.data import Preprocess
from ..batch import Rows, Spec
from .downcast import Downcaster, round_to_bfloat16
from .downsample_negatives import NegativeDownsampler
from .extract_features import FeatureExtractor
from .rectify_labels import LabelRectifier
from .truncate_and_slice import Truncator, truncated_columns

__all__ = [
    "Downcaster",
    "FeatureExtractor",
    "LabelRectifier",
    "NegativeDownsampler",
    "Preprocessor",
    "Truncator",
    "build_preprocessors",
    "round_to_bfloat16",
    "truncated_columns",
]


class Preprocessor(Protocol):
    @property
    def needs_labels(self) -> bool:
        """Prediction reads no labels, and runs only the preprocessors that need none."""

    @property
    def columns(self) -> tuple[str, ...]:
        """What it reads besides the features and labels (timestamps), by batch or schema name: the dataset
        reads those that are not features from the schema into Rows.extras."""

    def output_specs(self, specs: dict[str, Spec]) -> dict[str, Spec]:
        """The features of one example after it, given those before it (a new dict)."""

    def apply(self, rows: Rows) -> Rows:
        """The batch after it; `rows` may be changed in place."""


def build_preprocessors(config: Preprocess | None, *, labels: bool = True) -> list[Preprocessor]:
    """The preprocessors `config` sets, in the order they run: each sees the output of those before it
    (extract_features takes its column from the truncated, downcast features). labels=False leaves out
    those that need labels."""
    if config is None:
        return []
    built: list[Preprocessor] = []
    if config.downsample_negatives:
        built.append(NegativeDownsampler(config.downsample_negatives))
    if config.truncate_and_slice:
        built.append(Truncator(config.truncate_and_slice))
    if config.downcast:
        built.append(Downcaster(config.downcast))
    if config.rectify_labels:
        built.append(LabelRectifier(config.rectify_labels))
    if config.extract_features:
        built.append(FeatureExtractor(config.extract_features))
    return [p for p in built if labels or not p.needs_labels]
