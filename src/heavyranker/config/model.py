"""`model:` — featurization, embeddings, backbone and one tower per task."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, StrictInt, model_validator
from pydantic_core import PydanticCustomError

from .base import NO_EFFECT, ConfigPath, Count, Float, NonNegative, StrictModel, exactly_one_of

# Bounds on what the model allocates as it is built, before any data is read. A layer between two widths
# of 2**15 holds 2**30 weights (4 GiB of float32; Adam keeps two more copies); the seed's widest is 2048.
MAX_WIDTH = 2**15
# An embedding table's rows x dims: 8 GiB of float32.
MAX_TABLE_ELEMENTS = 2**31
Width = Annotated[Count, Field(le=MAX_WIDTH)]


class DropoutConfig(StrictModel):
    rate: Float = Field(0.1, gt=0.0, lt=1.0)


class LayerNormConfig(StrictModel):
    epsilon: Float = Field(1e-3, ge=0.0)
    axis: StrictInt = Field(-1, description="Only the last axis (-1) is supported.")
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
    momentum: Float = Field(0.1, gt=0.0, le=1.0, description="Weight of the new batch in the running stats.")


class DenseLayerConfig(StrictModel):
    layer_size: Width
    dropout: DropoutConfig | None = None


class MlpConfig(StrictModel):
    layer_sizes: list[Width] | None = Field(None, description="Units per layer, each at most 2**15.")
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
    output_size: Width
    reduction_factor: Float | None = Field(
        None, gt=0.0, le=16.0, description="Aggregation units per input of the block, at most 16."
    )
    aggregation_size: Width | None = None
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
    poly_degree: Count = Field(le=64, description="Cross layers, each of in_features^2 weights: at most 64.")
    projection_dim: Width | None = Field(None, description="Factorise each cross matrix through this width.")
    parallel_mlp: MlpConfig | None = None
    use_parallel: bool = True
    output_mlp: MlpConfig | None = None


class DLRMConfig(StrictModel):
    bottom_mlp: MlpConfig
    top_mlp: MlpConfig


class AffineMap(StrictModel):
    scale: Float = 1.0
    bias: Float = 0.0


class TaskModel(StrictModel):
    mlp_config: MlpConfig | None = None
    dcn_config: DcnConfig | None = None
    dlrm_config: DLRMConfig | None = None
    mask_net_config: MaskNetConfig | None = None
    affine_map: AffineMap | None = None
    pos_weight: Float = Field(1.0, gt=0.0)

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
    clip_magnitude: Float = Field(3e38, ge=0.0)


class ZScoreLogConfig(StrictModel):
    analysis_path: ConfigPath = Field(description="Per-feature statistics from `heavyranker data stats`.")
    schema_path: ConfigPath | None = Field(None, description=NO_EFFECT)
    clip_magnitude: Float = Field(5.0, gt=0.0)
    use_batch_norm: bool = False
    use_renorm: bool = False


class DoubleNormLogConfig(StrictModel):
    batch_norm_config: BatchNormConfig | None = None
    clip_magnitude: Float = Field(5.0, gt=0.0)
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


class TableConfig(StrictModel):
    """What every embedding table has: a name and its size."""

    name: str
    num_embeddings: Count
    embedding_dim: Width

    @model_validator(mode="after")
    def _fits(self) -> TableConfig:
        elements = self.num_embeddings * self.embedding_dim
        if elements > MAX_TABLE_ELEMENTS:
            raise PydanticCustomError(
                "table_size",
                "num_embeddings x embedding_dim = {n} elements; at most 2**31 ({max}, 8 GiB of float32)",
                {"n": f"{elements:,}", "max": f"{MAX_TABLE_ELEMENTS:,}"},
            )
        return self


class EmbeddingTableConfig(TableConfig):
    """A large table (EmbeddingBag, mean pooling) over a variable-length id feature of the batch."""

    feature_name: str | None = Field(
        None, description="Batch feature holding the ids; default: the table name."
    )


class LargeEmbeddingsConfig(StrictModel):
    tables: list[EmbeddingTableConfig] = Field(min_length=1)


class SmallEmbeddingTableConfig(TableConfig):
    """A table over one column (`index`) of the discrete tensor."""

    index: NonNegative


class SmallEmbeddingsConfig(StrictModel):
    tables: list[SmallEmbeddingTableConfig] = Field(min_length=1)


class PositionDebiasConfig(StrictModel):
    max_position: Count = Field(
        256, le=2**16, description="Positions >= this share one bucket; at most 2**16."
    )
    num_dims: Width = 64
    drop_probability: Float = Field(0.5, ge=0.0, le=1.0)
    position_feature_index: NonNegative = Field(description="Column of the position in the discrete tensor.")


class StratifierConfig(StrictModel):
    name: str
    index: NonNegative = Field(description="Column of the discrete tensor.")
    value: StrictInt = Field(ge=-(2**63), le=2**63 - 1, description="Compared with int64 ids.")


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
