"""`training.promote:` — a training run promotes its checkpoints into a model repository as it goes
(release/follow.py): at the checkpoint of every `every_steps` steps, or at the first checkpoint
`every_minutes` after the last promotion, the checkpoint just written is the candidate of
`heavyranker promote` (docs/model-repository.md)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from .base import ConfigPath, Count, Float, StrictModel
from .export import FORMATS, WHY_NOT


class PromoteConfig(StrictModel):
    """When a training run promotes its newest checkpoint, where to, and by which rule."""

    repository: ConfigPath = Field(
        description="The model repository the candidates are promoted into: a folder or an fsspec URL "
        "(s3://bucket/prefix)."
    )
    model_name: str = Field("heavyranker", description="The model's folder in the repository.")
    every_steps: Count | None = Field(
        None,
        description="Promote the checkpoint of every this many steps: a multiple of "
        "training.checkpoint_every_n (a candidate is a checkpoint).",
    )
    every_minutes: Annotated[Float, Field(gt=0)] | None = Field(
        None, description="Promote the first checkpoint written this many minutes after the last promotion."
    )
    split: str | None = Field(
        None, description="The held-out validation split both models are scored on (default: the first)."
    )
    metric: Literal["rce", "auroc"] = Field("rce", description="What the rule compares.")
    tasks: list[str] = Field(
        default_factory=list, description="The tasks the rule judges (full names); empty: every task."
    )
    tolerance: Annotated[Float, Field(ge=0)] = Field(
        0.0, description="How much worse (metric units) the interval's upper end may be."
    )
    weighted: bool = Field(
        False,
        description="Judge the sum of the tasks' differences weighted by serving.engagement_weights (their "
        "size) instead of each task's.",
    )
    resamples: Annotated[int, Field(ge=100, le=100_000, strict=True)] = Field(
        1000, description="Bootstrap resamples (100 to 100,000: each rescores every example)."
    )
    format: Literal["onnx", "pt2"] = Field("onnx", description="The published version's program.")
    precision: Literal["fp32", "bf16", "int8"] = Field(
        "fp32",
        description="The published version's dense products (`export --precision`): int8 with format onnx, "
        "bf16 with pt2. The candidate is exported first and judged as that program, which is then published.",
    )
    table_precision: Literal["fp32", "int8"] = Field(
        "fp32", description="The published version's id tables (`export --table-precision`)."
    )
    keep_versions: Count = Field(5, description="Keep the newest K versions, and those a server serves.")

    @model_validator(mode="after")
    def _some_schedule(self) -> PromoteConfig:
        if self.every_steps is None and self.every_minutes is None:
            raise PydanticCustomError("no_schedule", "give every_steps, every_minutes or both", {})
        return self

    @model_validator(mode="after")
    def _precision_has_the_format(self) -> PromoteConfig:
        if self.format not in FORMATS[self.precision]:
            raise PydanticCustomError(
                "precision_format",
                "precision {precision} with format {format}: {why}; set format: {needed}",
                {
                    "precision": self.precision,
                    "format": self.format,
                    "why": WHY_NOT[self.precision],
                    "needed": FORMATS[self.precision][0],
                },
            )
        return self
