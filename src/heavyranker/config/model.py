"""`model:` — featurization, embeddings, backbone and one tower per task."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field, StrictInt, model_validator
from pydantic_core import PydanticCustomError

from .base import NO_EFFECT, ConfigPath, Count, Float, NonNegative, StrictModel, Width, exactly_one_of
from .embeddings import LargeEmbeddingsConfig, SmallEmbeddingsConfig

# A task's pos_weight and loss_weight: the loss is float32, in which 1e39 is infinite (the loss NaN) and a
# weight far below that still overflows a sum; a million times another task's weight is already all the say.
MAX_LOSS_WEIGHT = 1e6


class DropoutConfig(StrictModel):
    """Dropout in training."""

    rate: Float = Field(0.1, gt=0.0, lt=1.0, description="Share of units zeroed.")


class LayerNormConfig(StrictModel):
    """A LayerNorm over the features."""

    epsilon: Float = Field(
        1e-3,
        ge=0.0,
        description="Added to the variance. With 0.0 (the reference's configs), a row whose inputs to this "
        "layer are all equal normalizes to 0/0: its probabilities are not finite (serve answers 422 for it).",
    )
    axis: StrictInt = Field(-1, description="Only the last axis (-1) is supported.")
    center: bool = Field(True, description="Learn a bias.")
    scale: bool = Field(True, description="Learn a scale.")

    @model_validator(mode="after")
    def _last_axis(self) -> LayerNormConfig:
        if self.axis != -1:
            raise PydanticCustomError(
                "axis", "only axis -1 (the feature axis) is supported, got {a}", {"a": self.axis}
            )
        return self


class BatchNormConfig(StrictModel):
    """A BatchNorm; its statistics are per process under DDP. A training batch of one row (ignore_data_errors
    can leave one) is normalised by the running statistics, which it leaves as they are."""

    affine: bool = Field(True, description="Learn a scale and a bias.")
    momentum: Float = Field(0.1, gt=0.0, le=1.0, description="Weight of the new batch in the running stats.")


class DenseLayerConfig(StrictModel):
    """One layer of an MLP."""

    layer_size: Width = Field(description="Units.")
    dropout: DropoutConfig | None = Field(None, description="Dropout after this layer.")


class MlpConfig(StrictModel):
    """A multilayer perceptron: linear layers with ReLU between them."""

    layer_sizes: list[Width] | None = Field(None, description="Units per layer, each at most 2**15.")
    layers: list[DenseLayerConfig] | None = Field(
        None, description="Like layer_sizes, with a dropout per layer."
    )
    batch_norm: BatchNormConfig | None = Field(None, description="A BatchNorm after each hidden layer.")
    dropout: DropoutConfig | None = Field(None, description="Dropout after every layer.")
    final_layer_activation: bool = Field(False, description="A ReLU after the last layer too.")

    @model_validator(mode="after")
    def _one_layer_spec(self) -> MlpConfig:
        exactly_one_of(self, "layer_sizes", "layers")
        if not (self.layer_sizes or self.layers):
            raise PydanticCustomError("empty", "an MLP needs at least one layer", {})
        return self


class MaskBlockConfig(StrictModel):
    """A MaskNet block: an instance-guided mask over its input, then a dense layer."""

    output_size: Width = Field(description="Units of the block's output.")
    reduction_factor: Float | None = Field(
        None, gt=0.0, le=16.0, description="Aggregation units per input of the block, at most 16."
    )
    aggregation_size: Width | None = Field(None, description="Aggregation units of the mask.")
    input_layer_norm: bool = Field(description="A LayerNorm on the block's input.")

    @model_validator(mode="after")
    def _one_size(self) -> MaskBlockConfig:
        exactly_one_of(self, "reduction_factor", "aggregation_size")
        return self


class MaskNetConfig(StrictModel):
    """MaskNet (Wang et al. 2021): mask blocks, in parallel or stacked, then an optional MLP."""

    mask_blocks: list[MaskBlockConfig] = Field(min_length=1, description="The blocks.")
    mlp: MlpConfig | None = Field(None, description="An MLP on the blocks' output.")
    use_parallel: bool = Field(
        False, description="Every block reads the input, outputs concatenated; else each reads the last."
    )


class DcnConfig(StrictModel):
    """DCN v2: cross layers, with an optional MLP beside or after them."""

    poly_degree: Count = Field(le=64, description="Cross layers, each of in_features^2 weights: at most 64.")
    projection_dim: Width | None = Field(None, description="Factorise each cross matrix through this width.")
    parallel_mlp: MlpConfig | None = Field(None, description="An MLP beside (or after) the cross layers.")
    use_parallel: bool = Field(
        True, description="The MLP reads the input, beside the cross layers; else it reads their output."
    )
    output_mlp: MlpConfig | None = Field(None, description="An MLP on the result.")


class DLRMConfig(StrictModel):
    """DLRM: a bottom MLP, dot products with the embedding vectors, a top MLP."""

    bottom_mlp: MlpConfig = Field(description="On the dense input; its output is one of the vectors.")
    top_mlp: MlpConfig = Field(description="On the bottom output and the pairwise dot products.")


# An affine map's scale and bias: the logit is float32, in which 1e39 is infinite (its probability 0, 1 or
# NaN); a logit moved by a million is already certain either way.
MAX_AFFINE = 1e6


class AffineMap(StrictModel):
    """A fixed `scale * logit + bias` on a tower's logit."""

    scale: Float = Field(
        1.0, ge=-MAX_AFFINE, le=MAX_AFFINE, description="Multiplies the logit (at most 1e6 in size)."
    )
    bias: Float = Field(0.0, ge=-MAX_AFFINE, le=MAX_AFFINE, description="Added after (at most 1e6 in size).")


class ArchitectureConfig(StrictModel):
    """One architecture: an expert of model.experts."""

    mlp_config: MlpConfig | None = None
    dcn_config: DcnConfig | None = None
    dlrm_config: DLRMConfig | None = None
    mask_net_config: MaskNetConfig | None = None

    @model_validator(mode="after")
    def _one_architecture(self) -> ArchitectureConfig:
        exactly_one_of(self, "mlp_config", "dcn_config", "dlrm_config", "mask_net_config")
        return self

    @property
    def architecture(self) -> str:
        return exactly_one_of(self, "mlp_config", "dcn_config", "dlrm_config", "mask_net_config")


class TaskModel(ArchitectureConfig):
    """One architecture: a task's tower, or the backbone."""

    affine_map: AffineMap | None = None
    pos_weight: Float = Field(
        1.0,
        gt=0.0,
        le=MAX_LOSS_WEIGHT,
        description="Weight of positives in this task's loss (at most 1e6: the float32 loss stays finite).",
    )
    loss_weight: Float = Field(
        1.0,
        gt=0.0,
        le=MAX_LOSS_WEIGHT,
        description="Multiplies this task's loss in the total, sum(loss_weight * loss) / tasks: a larger "
        "weight gives the task more say over the shared layers (its own tower's Adam step hardly changes). "
        "At most 1e6.",
    )
    wide: bool = Field(
        False,
        description="A task's tower only: add a linear logit on the model's input (featurized features and "
        "embeddings, before any backbone) to the tower's, as in wide & deep; it starts at zero and learns "
        "at the tower's rate.",
    )


class Log1pAbsConfig(StrictModel):
    """sign(x) * log1p(|x|) of each continuous feature."""


class ClipLog1pAbsConfig(StrictModel):
    """sign(x) * log1p(|x|), clipped."""

    clip_magnitude: Float = Field(3e38, ge=0.0, description="Clip to [-this, this].")


class ZScoreLogConfig(StrictModel):
    """sign(x) * log1p(|x|), standardized with statistics from `heavyranker data stats`, clipped."""

    analysis_path: ConfigPath = Field(description="Per-feature statistics from `heavyranker data stats`.")
    schema_path: ConfigPath | None = Field(None, description=NO_EFFECT)
    clip_magnitude: Float = Field(5.0, gt=0.0, description="Clip the z-scores to [-this, this].")
    use_batch_norm: bool = Field(False, description="A BatchNorm after.")
    use_renorm: bool = Field(False, description="A batch renormalization after (instead of a BatchNorm).")


class DoubleNormLogConfig(StrictModel):
    """sign(x) * log1p(|x|) (non-finite values as 0), a BatchNorm, a clip; a LayerNorm over all features."""

    batch_norm_config: BatchNormConfig | None = Field(None, description="On the continuous features.")
    clip_magnitude: Float = Field(5.0, gt=0.0, description="Clip to [-this, this].")
    layer_norm_config: LayerNormConfig | None = Field(
        None, description="On the continuous and concatenated features."
    )


class PiecewiseLinearConfig(StrictModel):
    """Piecewise-linear encoding (Gorishniy et al. 2022) of sign(x) * log1p(|x|) (non-finite values as 0) on
    per-feature quantile bins: a value in bin k of T becomes k-1 ones, its fraction of bin k, then zeros."""

    analysis_path: ConfigPath = Field(
        description="Statistics holding each feature's bin edges, from `heavyranker data stats --bins N`."
    )


class PeriodicConfig(StrictModel):
    """Periodic embeddings (PLR, Gorishniy et al. 2022) of v = sign(x) * log1p(|x|) (non-finite x as 0): each
    feature's [cos(2 pi c v), sin(2 pi c v)] over its own trainable frequencies c, then its own linear layer
    and a ReLU."""

    n_frequencies: Count = Field(16, le=256, description="Frequencies per feature (at most 256).")
    sigma: Float = Field(
        0.1, gt=0.0, le=1000.0, description="Standard deviation of the frequencies' normal initialisation."
    )
    embedding_dim: Width = Field(8, description="Output dimensions per feature.")


class FeaturizationConfig(StrictModel):
    """How the continuous features become the model's input."""

    log1p_abs_config: Log1pAbsConfig | None = None
    clip_log1p_abs_config: ClipLog1pAbsConfig | None = None
    z_score_log_config: ZScoreLogConfig | None = None
    double_norm_log_config: DoubleNormLogConfig | None = None
    piecewise_linear_config: PiecewiseLinearConfig | None = None
    periodic_config: PeriodicConfig | None = None
    feature_names_to_concat: list[str] = Field(
        ["binary"], description="Raw features appended to the continuous."
    )

    @model_validator(mode="after")
    def _one_featurization(self) -> FeaturizationConfig:
        exactly_one_of(
            self,
            "log1p_abs_config",
            "clip_log1p_abs_config",
            "z_score_log_config",
            "double_norm_log_config",
            "piecewise_linear_config",
            "periodic_config",
        )
        return self


class PositionDebiasConfig(StrictModel):
    """An embedding of the candidate's position, dropped at random in training and always at inference."""

    max_position: Count = Field(
        256, le=2**16, description="Positions >= this share one bucket; at most 2**16."
    )
    num_dims: Width = Field(64, description="Dimensions of the embedding.")
    drop_probability: Float = Field(0.5, ge=0.0, le=1.0, description="Chance a position is hidden.")
    position_feature_index: NonNegative = Field(description="Column of the position in the discrete tensor.")


class StratifierConfig(StrictModel):
    """Evaluation also reports every metric on the rows where discrete[:, index] == value."""

    name: str = Field(description="Names the stratum in results.")
    index: NonNegative = Field(description="Column of the discrete tensor.")
    value: StrictInt = Field(ge=-(2**63), le=2**63 - 1, description="Compared with int64 ids.")


class MultiTaskType(StrEnum):
    SHARE_NONE = "share_none"
    SHARE_ALL = "share_all"
    SHARE_PARTIAL = "share_partial"
    MMOE = "mmoe"
    PLE = "ple"


class ExpertsConfig(StrictModel):
    """The experts of mmoe (Ma et al. 2018) and ple (Tang et al. 2020), and their gates: each task's tower
    reads a softmax-weighted sum of the experts' outputs, with weights from a gate on the gate's input."""

    num_experts: Count = Field(
        description="mmoe: the experts every task's gate weighs; ple: the experts of each task, per level.",
        le=64,
    )
    num_shared_experts: NonNegative = Field(
        0, le=64, description="ple only: the experts shared by all tasks, per level."
    )
    num_levels: Count = Field(1, le=8, description="ple only: extraction levels, each reading the last.")
    expert: ArchitectureConfig = Field(description="Every expert's architecture (each with its own weights).")
    gate_mlp: MlpConfig | None = Field(
        None, description="Hidden layers of each gate before its linear softmax layer; default: none."
    )


class ModelConfig(StrictModel):
    """Featurization, embeddings, an optional shared backbone and one tower per task."""

    tasks: dict[str, TaskModel] = Field(
        min_length=1, description="Task name -> its tower; the order of every [B, T] output."
    )
    backbone: TaskModel | None = Field(
        None, description="Layers shared by the towers: required by share_all and share_partial."
    )
    multi_task_type: MultiTaskType = Field(
        MultiTaskType.SHARE_NONE,
        description="share_none: towers read the input; share_all: the backbone's output; "
        "share_partial: both; mmoe, ple: each its gated mix of the experts (model.experts).",
    )
    experts: ExpertsConfig | None = Field(None, description="The experts and gates of mmoe and ple.")
    featurization_config: FeaturizationConfig
    large_embeddings: LargeEmbeddingsConfig | None = None
    small_embeddings: SmallEmbeddingsConfig | None = None
    position_debias_config: PositionDebiasConfig | None = None
    stratifiers: list[StratifierConfig] | None = Field(None, description="Evaluation strata.")

    @model_validator(mode="after")
    def _backbone_matches_sharing(self) -> ModelConfig:
        kind = self.multi_task_type
        shared = kind in (MultiTaskType.SHARE_ALL, MultiTaskType.SHARE_PARTIAL)
        if shared and self.backbone is None:
            raise PydanticCustomError("backbone", "multi_task_type {t} needs a backbone", {"t": kind.value})
        if not shared and self.backbone is not None:
            raise PydanticCustomError(
                "backbone", "multi_task_type {t} cannot have a backbone", {"t": kind.value}
            )
        if self.backbone is not None and self.backbone.wide:
            raise PydanticCustomError(
                "wide", "backbone.wide: only a task's tower has a wide path (model.tasks.<task>.wide)", {}
            )
        mixture = kind in (MultiTaskType.MMOE, MultiTaskType.PLE)
        if mixture != (self.experts is not None):
            raise PydanticCustomError(
                "experts",
                "model.experts is for multi_task_type mmoe and ple, and they need it (got {t}, experts {e})",
                {"t": kind.value, "e": "set" if self.experts else "unset"},
            )
        if kind == MultiTaskType.MMOE and self.experts is not None:
            if self.experts.num_shared_experts or self.experts.num_levels != 1:
                raise PydanticCustomError(
                    "experts",
                    "num_shared_experts and num_levels are for ple; mmoe has one level of experts",
                    {},
                )
        if kind == MultiTaskType.PLE and self.experts is not None and not self.experts.num_shared_experts:
            raise PydanticCustomError(
                "experts", "ple needs num_shared_experts >= 1 (experts all tasks share)", {}
            )
        return self
