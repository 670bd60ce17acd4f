"""`model:` — featurization, embeddings, backbone and one tower per task."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator
from pydantic_core import PydanticCustomError

from .base import NO_EFFECT, ConfigPath, StrictModel, exactly_one_of


class DropoutConfig(StrictModel):
    rate: float = Field(0.1, gt=0.0, lt=1.0)


class LayerNormConfig(StrictModel):
    epsilon: float = Field(1e-3, ge=0.0)
    axis: int = Field(-1, description="Only the last axis (-1) is supported.")
    center: bool = True
    scale: bool = True

    @model_validator(mode="after")
    def _last_axis(self) -> LayerNormConfig:
        if self.axis != -1:
            raise PydanticCustomError(
                "axis", "only axis -1 (the feature axis) is supported, got {a}", {"a": self.axis}
            )
        return self


class BatchNormConfig(StrictModel):
    affine: bool = True
    momentum: PositiveFloat = Field(0.1, le=1.0, description="Weight of the new batch in the running stats.")


class DenseLayerConfig(StrictModel):
    layer_size: PositiveInt
    dropout: DropoutConfig | None = None


class MlpConfig(StrictModel):
    layer_sizes: list[PositiveInt] | None = None
    layers: list[DenseLayerConfig] | None = Field(
        None, description="Like layer_sizes, with a dropout per layer."
    )
    batch_norm: BatchNormConfig | None = None
    dropout: DropoutConfig | None = None
    final_layer_activation: bool = False

    @model_validator(mode="after")
    def _one_layer_spec(self) -> MlpConfig:
        exactly_one_of(self, "layer_sizes", "layers")
        if not (self.layer_sizes or self.layers):
            raise PydanticCustomError("empty", "an MLP needs at least one layer", {})
        return self


class MaskBlockConfig(StrictModel):
    output_size: PositiveInt
    reduction_factor: PositiveFloat | None = None
    aggregation_size: PositiveInt | None = None
    input_layer_norm: bool

    @model_validator(mode="after")
    def _one_size(self) -> MaskBlockConfig:
        exactly_one_of(self, "reduction_factor", "aggregation_size")
        return self


class MaskNetConfig(StrictModel):
    mask_blocks: list[MaskBlockConfig] = Field(min_length=1)
    mlp: MlpConfig | None = None
    use_parallel: bool = False


class DcnConfig(StrictModel):
    poly_degree: PositiveInt
    projection_dim: PositiveInt | None = Field(
        None, description="Factorise each cross matrix through this width."
    )
    parallel_mlp: MlpConfig | None = None
    use_parallel: bool = True
    output_mlp: MlpConfig | None = None


class DLRMConfig(StrictModel):
    bottom_mlp: MlpConfig
    top_mlp: MlpConfig


class AffineMap(StrictModel):
    scale: float = 1.0
    bias: float = 0.0


class TaskModel(StrictModel):
    mlp_config: MlpConfig | None = None
    dcn_config: DcnConfig | None = None
    dlrm_config: DLRMConfig | None = None
    mask_net_config: MaskNetConfig | None = None
    affine_map: AffineMap | None = None
    pos_weight: float = Field(1.0, gt=0.0)

    @model_validator(mode="after")
    def _one_architecture(self) -> TaskModel:
        exactly_one_of(self, "mlp_config", "dcn_config", "dlrm_config", "mask_net_config")
        return self

    @property
    def architecture(self) -> str:
        return exactly_one_of(self, "mlp_config", "dcn_config", "dlrm_config", "mask_net_config")


class Log1pAbsConfig(StrictModel):
    pass


class ClipLog1pAbsConfig(StrictModel):
    clip_magnitude: float = Field(3e38, ge=0.0)


class ZScoreLogConfig(StrictModel):
    analysis_path: ConfigPath = Field(description="Per-feature statistics from `heavyranker data stats`.")
    schema_path: ConfigPath | None = Field(None, description=NO_EFFECT)
    clip_magnitude: float = Field(5.0, gt=0.0)
    use_batch_norm: bool = False
    use_renorm: bool = False


class DoubleNormLogConfig(StrictModel):
    batch_norm_config: BatchNormConfig | None = None
    clip_magnitude: float = Field(5.0, gt=0.0)
    layer_norm_config: LayerNormConfig | None = None


class FeaturizationConfig(StrictModel):
    log1p_abs_config: Log1pAbsConfig | None = None
    clip_log1p_abs_config: ClipLog1pAbsConfig | None = None
    z_score_log_config: ZScoreLogConfig | None = None
    double_norm_log_config: DoubleNormLogConfig | None = None
    feature_names_to_concat: list[str] = Field(
        ["binary"], description="Raw features appended to the continuous."
    )

    @model_validator(mode="after")
    def _one_featurization(self) -> FeaturizationConfig:
        exactly_one_of(
            self, "log1p_abs_config", "clip_log1p_abs_config", "z_score_log_config", "double_norm_log_config"
        )
        return self


class EmbeddingTableConfig(StrictModel):
    """A large table (EmbeddingBag, mean pooling) over a variable-length id feature of the batch."""

    name: str
    num_embeddings: PositiveInt
    embedding_dim: PositiveInt
    feature_name: str | None = Field(
        None, description="Batch feature holding the ids; default: the table name."
    )


class LargeEmbeddingsConfig(StrictModel):
    tables: list[EmbeddingTableConfig] = Field(min_length=1)


class SmallEmbeddingTableConfig(StrictModel):
    """A table over one column (`index`) of the discrete tensor."""

    name: str
    num_embeddings: PositiveInt
    embedding_dim: PositiveInt
    index: NonNegativeInt


class SmallEmbeddingsConfig(StrictModel):
    tables: list[SmallEmbeddingTableConfig] = Field(min_length=1)


class PositionDebiasConfig(StrictModel):
    max_position: PositiveInt = Field(256, description="Positions >= this share one bucket.")
    num_dims: PositiveInt = 64
    drop_probability: float = Field(0.5, ge=0.0, le=1.0)
    position_feature_index: NonNegativeInt = Field(
        description="Column of the position in the discrete tensor."
    )


class StratifierConfig(StrictModel):
    name: str
    index: NonNegativeInt = Field(description="Column of the discrete tensor.")
    value: int


class MultiTaskType(StrEnum):
    SHARE_NONE = "share_none"
    SHARE_ALL = "share_all"
    SHARE_PARTIAL = "share_partial"


class ModelConfig(StrictModel):
    tasks: dict[str, TaskModel] = Field(min_length=1)
    backbone: TaskModel | None = None
    multi_task_type: MultiTaskType = MultiTaskType.SHARE_NONE
    featurization_config: FeaturizationConfig
    large_embeddings: LargeEmbeddingsConfig | None = None
    small_embeddings: SmallEmbeddingsConfig | None = None
    position_debias_config: PositionDebiasConfig | None = None
    stratifiers: list[StratifierConfig] | None = None

    @model_validator(mode="after")
    def _backbone_matches_sharing(self) -> ModelConfig:
        shared = self.multi_task_type in (MultiTaskType.SHARE_ALL, MultiTaskType.SHARE_PARTIAL)
        if shared and self.backbone is None:
            raise PydanticCustomError(
                "backbone", "multi_task_type {t} needs a backbone", {"t": self.multi_task_type.value}
            )
        if not shared and self.backbone is not None:
            raise PydanticCustomError("backbone", "multi_task_type share_none cannot have a backbone", {})
        return self
