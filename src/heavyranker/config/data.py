"""`train_data:` and each `validation_data.<split>:` — which files, how they are read and preprocessed."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .base import NO_EFFECT, ConfigPath, ExistingFile, StrictModel, exactly_one_of

DATE_FORMAT = "%Y-%m-%d"
# Accepted spellings of an hour: ISO with 'T' or a space, or the folder layout itself.
DATETIME_FORMATS = ("%Y-%m-%dT%H", "%Y-%m-%d %H", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M", "%Y/%m/%d/%H")


def parse_end_datetime(value: str) -> datetime:
    for fmt in DATETIME_FORMATS:
        try:
            return datetime.strptime(value, fmt)
        except ValueError:
            continue
    raise ValueError(
        f"{value!r} is not a date-hour such as 2023-01-31T05 (formats: {', '.join(DATETIME_FORMATS)})"
    )


class ExplicitDateInputs(StrictModel):
    """Files under data_root/YYYY/MM/DD for `days` days ending at end_date (inclusive)."""

    data_root: ConfigPath
    end_date: str
    days: PositiveInt
    num_missing_days_tol: NonNegativeInt = 0

    @field_validator("end_date")
    @classmethod
    def _date(cls, value: str) -> str:
        try:
            datetime.strptime(value, DATE_FORMAT)
        except ValueError:
            raise PydanticCustomError(
                "date", "{v!r} is not a date such as 2023-01-31", {"v": value}
            ) from None
        return value


class ExplicitDatetimeInputs(StrictModel):
    """Files under data_root/YYYY/MM/DD/HH for `hours` hours ending at end_datetime (inclusive)."""

    data_root: ConfigPath
    end_datetime: str
    hours: PositiveInt
    num_missing_hours_tol: NonNegativeInt = 0

    @field_validator("end_datetime")
    @classmethod
    def _datetime(cls, value: str) -> str:
        try:
            parse_end_datetime(value)
        except ValueError as e:
            raise PydanticCustomError("datetime", str(e), {}) from None
        return value


class SegDenseSchema(StrictModel):
    schema_path: ExistingFile
    features: list[str] = Field([], description="Schema features read under their own names.")
    renamed_features: dict[str, str] = Field({}, description="New name -> schema feature name.")
    mask_mantissa_features: dict[str, int] = Field({}, description="Feature -> low mantissa bits to zero.")

    @field_validator("mask_mantissa_features")
    @classmethod
    def _bits(cls, value: dict[str, int]) -> dict[str, int]:
        for name, bits in value.items():
            if not 0 <= bits <= 23:
                raise PydanticCustomError(
                    "bits", "{n}: a float32 has 23 mantissa bits, got {b}", {"n": name, "b": bits}
                )
        return value


class TaskData(StrictModel):
    """The rates at which positives and negatives of this label were kept when the data was made."""

    pos_downsampling_rate: float = Field(1.0, gt=0.0, le=1.0)
    neg_downsampling_rate: float = Field(1.0, gt=0.0, le=1.0)


class TruncateAndSlice(StrictModel):
    continuous_feature_truncation: PositiveInt | None = None
    binary_feature_truncation: PositiveInt | None = None
    continuous_feature_mask_path: ExistingFile | None = Field(
        None, description=".npy; nonzero entries are kept."
    )
    binary_feature_mask_path: ExistingFile | None = Field(None, description=".npy; nonzero entries are kept.")


DownCastType = Literal["bfloat16", "bool", "float32", "float16", "uint8"]


class DownCast(StrictModel):
    features: dict[str, DownCastType]


class RectifyLabels(StrictModel):
    label_rectification_window_in_hours: PositiveFloat = 3.0
    served_timestamp_field: str
    impressed_timestamp_field: str
    label_to_engaged_timestamp_field: dict[str, str]


class ExtractFeaturesRow(StrictModel):
    name: str
    source_tensor: str
    index: NonNegativeInt


class ExtractFeatures(StrictModel):
    extract_feature_table: list[ExtractFeaturesRow] = []


class DownsampleNegatives(StrictModel):
    batch_multiplier: PositiveInt
    engagements_list: list[str] = Field([], description="Engagements whose positives are always kept.")
    num_engagements: PositiveInt | None = Field(None, description=NO_EFFECT)


class Preprocess(StrictModel):
    truncate_and_slice: TruncateAndSlice | None = None
    downcast: DownCast | None = None
    rectify_labels: RectifyLabels | None = None
    extract_features: ExtractFeatures | None = None
    downsample_negatives: DownsampleNegatives | None = None


class DataConfig(StrictModel):
    inputs: ConfigPath | None = Field(None, description="A glob of .gz TFRecord files.")
    explicit_date_inputs: ExplicitDateInputs | None = None
    explicit_datetime_inputs: ExplicitDatetimeInputs | None = None

    global_batch_size: PositiveInt
    num_files_to_keep: PositiveInt | None = None
    file_batch_size: PositiveInt = Field(16, description="Files read at once, their records interleaved.")
    cache: bool = Field(False, description="Keep decoded batches in memory after the first pass.")
    ignore_data_errors: bool = Field(False, description="Skip the rest of a corrupt file instead of failing.")
    dataset_service_compression: Literal["AUTO"] | None = Field(None, description=NO_EFFECT)
    examples_shuffle_buffer_size: NonNegativeInt = 1024
    map_num_parallel_calls: PositiveInt | None = Field(
        None, description="Decoding workers; default: fastest."
    )
    interleave_num_parallel_calls: PositiveInt | None = Field(
        None, description="Reading workers; default: fastest."
    )

    seg_dense_schema: SegDenseSchema
    tasks: dict[str, TaskData]
    evaluation_tasks: list[str] = Field(
        [], description="Tasks to report metrics for; empty: all model tasks."
    )
    preprocess: Preprocess | None = None

    @model_validator(mode="after")
    def _one_input(self) -> DataConfig:
        exactly_one_of(self, "inputs", "explicit_date_inputs", "explicit_datetime_inputs")
        return self
