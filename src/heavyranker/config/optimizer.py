"""`optimizer:` — Adam and one learning-rate schedule per tower (or one for everything)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from .base import Count, Float, NonNegative, StrictModel, exactly_one_of

# A learning rate is finite and never negative: a negative one would climb the loss (gradient ascent).
Rate = Annotated[Float, Field(ge=0.0)]


class PiecewiseConstant(StrictModel):
    """The rate of step s is learning_rate_values[number of boundaries <= s]."""

    learning_rate_boundaries: list[NonNegative] = Field(description="Steps, strictly increasing.")
    learning_rate_values: list[Rate] = Field(description="One more than the boundaries.")

    @model_validator(mode="after")
    def _lists_fit(self) -> PiecewiseConstant:
        b, v = self.learning_rate_boundaries, self.learning_rate_values
        if len(v) != len(b) + 1:
            raise PydanticCustomError(
                "piecewise",
                "learning_rate_values needs one more entry than learning_rate_boundaries "
                "(got {nv} values for "
                "{nb} boundaries)",
                {"nv": len(v), "nb": len(b)},
            )
        if any(later <= earlier for earlier, later in zip(b, b[1:], strict=False)):
            raise PydanticCustomError("piecewise", "learning_rate_boundaries must be strictly increasing", {})
        return self


class LinearRampToConstant(StrictModel):
    """From 0 up to learning_rate over num_ramp_steps, then constant."""

    learning_rate: Rate = Field(description="The rate after the ramp.")
    num_ramp_steps: Count = Field(description="Steps of the ramp.")


class LinearRampToCosine(StrictModel):
    """From 0 up to learning_rate over num_ramp_steps, then a cosine down to final_learning_rate."""

    learning_rate: Rate = Field(description="The peak, reached at the end of the ramp.")
    final_learning_rate: Rate = Field(description="The rate from final_num_steps on.")
    num_ramp_steps: Count = Field(description="Steps of the ramp.")
    final_num_steps: Count = Field(description="The step where the cosine ends; usually num_train_steps.")

    @model_validator(mode="after")
    def _decay_after_ramp(self) -> LinearRampToCosine:
        if self.final_num_steps <= self.num_ramp_steps:
            raise PydanticCustomError("cosine", "final_num_steps must be greater than num_ramp_steps", {})
        return self


class LearningRate(StrictModel):
    """A learning-rate schedule."""

    constant: Rate | None = Field(None, description="One rate throughout.")
    linear_ramp_to_constant: LinearRampToConstant | None = None
    linear_ramp_to_cosine: LinearRampToCosine | None = None
    piecewise_constant: PiecewiseConstant | None = None

    @model_validator(mode="after")
    def _one_schedule(self) -> LearningRate:
        exactly_one_of(
            self, "constant", "linear_ramp_to_constant", "linear_ramp_to_cosine", "piecewise_constant"
        )
        return self


class AdamConfig(StrictModel):
    """Adam's constants; a resumed run takes the config's values and logs each change."""

    beta_1: Float = Field(0.9, ge=0.0, lt=1.0, description="Decay of the gradient's running mean.")
    beta_2: Float = Field(0.999, ge=0.0, lt=1.0, description="Decay of its running square.")
    epsilon: Float = Field(1e-7, gt=0.0, description="Added to the denominator.")


class TableOptimizerType(StrEnum):
    ROWWISE_ADAGRAD = "rowwise_adagrad"
    ADAGRAD = "adagrad"
    SGD = "sgd"
    ADAM = "adam"


class TableOptimizerConfig(StrictModel):
    """The id embedding tables' own optimizer (model.large_embeddings and small_embeddings), apart from the
    dense parameters' Adam: the reference trains its tables with torchrec's fused row-wise Adagrad."""

    type: TableOptimizerType = Field(
        TableOptimizerType.ROWWISE_ADAGRAD,
        description="rowwise_adagrad: one Adagrad accumulator per row; adagrad, sgd, adam: torch's.",
    )
    learning_rate: Rate = Field(description="A constant rate for the tables.")
    weight_decay: Float = Field(
        0.0,
        ge=0.0,
        description="L2 penalty: rowwise_adagrad on the rows a step looks up, the others on every row.",
    )
    epsilon: Float = Field(1e-8, gt=0.0, description="Added to the denominator (not sgd).")


class MultiTaskLearningRates(StrictModel):
    """One parameter group per tower and one for everything else, each on its own schedule."""

    tower_learning_rates: dict[str, LearningRate] = Field(description="Task -> its tower's schedule.")
    backbone_learning_rate: LearningRate | None = Field(
        None, description="For every parameter outside the towers (backbone, featurization, embeddings)."
    )


class OptimizerConfig(StrictModel):
    """Adam (fused), with learning-rate schedules."""

    adam: AdamConfig = AdamConfig()
    multi_task_learning_rates: MultiTaskLearningRates | None = None
    single_task_learning_rate: LearningRate | None = Field(None, description="One schedule for all.")
    embedding: TableOptimizerConfig | None = Field(
        None,
        description="The embedding tables' own optimizer; unset: they train in the backbone's Adam group.",
    )

    @model_validator(mode="after")
    def _one_lr(self) -> OptimizerConfig:
        exactly_one_of(self, "multi_task_learning_rates", "single_task_learning_rate")
        return self
