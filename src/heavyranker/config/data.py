"""`train_data:` and each `validation_data.<split>:` — which files, how they are read and preprocessed."""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import cached_property
from typing import Annotated, Literal

from pydantic import Field, Strict, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..schema import FeatureSpec, load_schema
from .base import NO_EFFECT, ConfigPath, Count, ExistingFile, Float, NonNegative, StrictModel, exactly_one_of
from .kafka import KafkaInput

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
        f"{value!r} is not a date-hour such as 2023-01-31T05 (formats: {', '.join(DATETIME_FORMATS)}), nor "
        "latest"
    )


# Bounds on sizes that make a command allocate before (or regardless of how much) data is read.
# A batch is read whole, then decoded: 2**20 rows of the seed schema (about 33 KB a row decoded) is 33 GB.
MAX_RECORDS_PER_BATCH = 2**20
# The shuffle buffer holds this many records however large the data, as a training stream repeats.
MAX_SHUFFLE_BUFFER = 2**20
# Reading and decoding threads; each decoding thread holds a batch in flight.
MAX_THREADS = 1024
# Data folders are listed, one per day or hour, before any is read: 100 years of them at most.
MAX_DAYS = 36_525


def _within_the_calendar(end: datetime, span: timedelta, what: str) -> None:
    """The folders are listed from `end` back across `span`, which must not reach before the year 1."""
    if end - datetime.min < span:
        raise PydanticCustomError("date_range", "{what} reach before the year 1", {"what": what})


LATEST = "latest"
LATEST_HELP = (
    "; or latest: the newest dated folder under data_root that holds data files, found each time the "
    "split is read (a held-out split that moves with arriving data)"
)


class ExplicitDateInputs(StrictModel):
    """Files under data_root/YYYY/MM/DD for `days` days ending at end_date (inclusive)."""

    data_root: ConfigPath = Field(description="The folder (a path or fsspec URL) holding the dated folders.")
    end_date: str = Field(description="The last day read, YYYY-MM-DD" + LATEST_HELP + ".")
    days: Count = Field(
        le=MAX_DAYS, description="At most 36,525 (100 years): folders are listed before reading."
    )
    num_missing_days_tol: NonNegative = Field(0, description="Day folders that may be missing.")

    @field_validator("end_date")
    @classmethod
    def _date(cls, value: str) -> str:
        if value == LATEST:
            return value
        try:
            datetime.strptime(value, DATE_FORMAT)
        except ValueError:
            raise PydanticCustomError(
                "date", "not a date such as 2023-01-31, nor latest", {"v": value}
            ) from None
        return value

    @property
    def latest(self) -> bool:
        return self.end_date == LATEST

    @cached_property
    def end(self) -> datetime:
        """end_date as a datetime (midnight), parsed once; not for latest (data/sources/files.py finds it)."""
        return datetime.strptime(self.end_date, DATE_FORMAT)

    @model_validator(mode="after")
    def _first_day(self) -> ExplicitDateInputs:
        if not self.latest:
            _within_the_calendar(
                self.end, timedelta(days=self.days - 1), f"{self.days} days back from {self.end_date}"
            )
        return self


class ExplicitDatetimeInputs(StrictModel):
    """Files under data_root/YYYY/MM/DD/HH for `hours` hours ending at end_datetime (inclusive)."""

    data_root: ConfigPath = Field(description="The folder (a path or fsspec URL) holding the dated folders.")
    end_datetime: str = Field(
        description="The last hour read, such as 2023-01-31T05 or 2023/01/31/05" + LATEST_HELP + "."
    )
    hours: Count = Field(
        le=24 * MAX_DAYS, description="At most 876,600 (100 years): folders are listed before reading."
    )
    num_missing_hours_tol: NonNegative = Field(0, description="Hour folders that may be missing.")

    @field_validator("end_datetime")
    @classmethod
    def _datetime(cls, value: str) -> str:
        if value == LATEST:
            return value
        try:
            parse_end_datetime(value)
        except ValueError as e:
            raise PydanticCustomError("datetime", str(e), {}) from None
        return value

    @property
    def latest(self) -> bool:
        return self.end_datetime == LATEST

    @cached_property
    def end(self) -> datetime:
        """end_datetime as a datetime (minutes as given; the folders are hours), parsed once; not for
        latest (data/sources/files.py finds it)."""
        return parse_end_datetime(self.end_datetime)

    @model_validator(mode="after")
    def _first_hour(self) -> ExplicitDatetimeInputs:
        if not self.latest:
            _within_the_calendar(
                self.end, timedelta(hours=self.hours - 1), f"{self.hours} hours back from {self.end_datetime}"
            )
        return self


class SegDenseSchema(StrictModel):
    """Which features of the schema are read, and under which names."""

    schema_path: ExistingFile = Field(description="The segdense JSON schema: names, types, lengths.")
    features: list[str] = Field([], description="Schema features read under their own names.")
    renamed_features: dict[str, str] = Field({}, description="New name -> schema feature name.")
    mask_mantissa_features: dict[str, Annotated[int, Strict(), Field(ge=0, le=23)]] = Field(
        {}, description="Feature -> low mantissa bits to zero, 0 to 23 (a float32 has 23)."
    )

    @cached_property
    def specs(self) -> dict[str, FeatureSpec]:
        """The schema file's features, read once: load_config reads it while checking the config (a
        SchemaError there names schema_path), and every consumer takes this object, not the file."""
        return load_schema(self.schema_path)


class TaskData(StrictModel):
    """The rates at which positives and negatives of this label were kept when the data was made."""

    pos_downsampling_rate: Float = Field(
        1.0, gt=0.0, le=1.0, description="Share of positives kept; weights and calibration undo it."
    )
    neg_downsampling_rate: Float = Field(
        1.0, gt=0.0, le=1.0, description="Share of negatives kept; weights and calibration undo it."
    )


class TruncateAndSlice(StrictModel):
    """Keeps the first N columns of `continuous` / `binary`, then the columns a mask selects."""

    continuous_feature_truncation: Count | None = Field(None, description="Keep the first N columns.")
    binary_feature_truncation: Count | None = Field(None, description="Keep the first N columns.")
    continuous_feature_mask_path: ExistingFile | None = Field(
        None, description=".npy; nonzero entries are kept."
    )
    binary_feature_mask_path: ExistingFile | None = Field(None, description=".npy; nonzero entries are kept.")


DownCastType = Literal["bfloat16", "bool", "float32", "float16", "uint8"]


class DownCast(StrictModel):
    """Casts features to a smaller dtype after decoding."""

    features: dict[str, DownCastType] = Field(description="Feature -> the dtype it is cast to.")


class RectifyLabels(StrictModel):
    """A positive counts only if impression and engagement both fall in [served, served + window)."""

    label_rectification_window_in_hours: Float = Field(3.0, gt=0.0, description="The window, in hours.")
    served_timestamp_field: str = Field(description="Feature holding when the candidate was served.")
    impressed_timestamp_field: str = Field(description="Feature holding when it was seen.")
    label_to_engaged_timestamp_field: dict[str, str] = Field(
        description="Task -> feature holding when that engagement happened."
    )


class ExtractFeaturesRow(StrictModel):
    """One column of a feature, made a feature of its own."""

    name: str = Field(description="The new feature's name.")
    source_tensor: str = Field(description="The feature the column is taken from.")
    index: NonNegative = Field(description="The column taken.")


class ExtractFeatures(StrictModel):
    """New features, each one column of an existing one."""

    extract_feature_table: list[ExtractFeaturesRow] = Field([], description="The features to make.")


class DownsampleNegatives(StrictModel):
    """Reads more rows per batch, keeps the positives and fills the batch with negatives, whose weights
    grow so that totals stay unbiased."""

    batch_multiplier: Count = Field(description="Rows read per batch, as a multiple of the batch size.")
    engagements_list: list[str] = Field([], description="Engagements whose positives are always kept.")
    num_engagements: Count | None = Field(None, description=NO_EFFECT)


class Preprocess(StrictModel):
    """Applied in this order: downsample_negatives, truncate_and_slice, downcast, rectify_labels,
    extract_features."""

    truncate_and_slice: TruncateAndSlice | None = None
    downcast: DownCast | None = None
    rectify_labels: RectifyLabels | None = None
    extract_features: ExtractFeatures | None = None
    downsample_negatives: DownsampleNegatives | None = None


class DataConfig(StrictModel):
    """A split: which files, how they are read, which labels and how they were sampled. One source, except
    in a follow run's `train_data`, which may read `kafka` beside one of the three file sources
    (docs/fresh-data.md)."""

    inputs: ConfigPath | None = Field(
        None,
        description="A glob of data files; ** matches folders at any depth (hive partitions dt=.../hour=...)",
    )
    explicit_date_inputs: ExplicitDateInputs | None = None
    explicit_datetime_inputs: ExplicitDatetimeInputs | None = None
    format: Literal["tfrecord", "parquet"] | None = Field(
        None,
        description="How the files are read; default: Parquet when the file names end in .parquet (all of "
        "them), else TFRecord. Dated folders list the format's files: .gz, .parquet (both by default).",
    )
    kafka: KafkaInput | None = Field(
        None,
        description="A Kafka topic of serialized tf.Examples. In train_data under training.follow it may be "
        "read together with inputs or dated folders of TFRecord files, in arrival order.",
    )
    follow_poll_seconds: Float = Field(
        2.0,
        gt=0.0,
        le=5.0,
        description="training.follow on files: seconds between two listings of the inputs glob or the dated "
        "folders for new files.",
    )
    follow_complete: Literal["next_folder", "marker"] = Field(
        "next_folder",
        description="training.follow on dated folders: a folder is read once the next one appears "
        "(next_folder), or once follow_marker is in it (marker).",
    )
    follow_marker: str = Field(
        "_SUCCESS", min_length=1, description="The file that marks a dated folder complete (follow_complete)."
    )

    global_batch_size: Count = Field(
        le=MAX_RECORDS_PER_BATCH,
        description="At most 2**20: a batch is read whole before it is decoded (33 GB of seed-schema rows).",
    )
    num_files_to_keep: Count | None = Field(None, description="Read only the first N files found (sorted).")
    file_batch_size: Count = Field(16, description="Files read at once, their records interleaved.")
    cache: bool = Field(
        False, description="Decode each file once into a local cache of memory-mapped columns; read it after."
    )
    cache_dir: ConfigPath | None = Field(
        None,
        description="The cache's folder (local disk); default: $HEAVYRANKER_CACHE or ~/.cache/heavyranker.",
    )
    cache_workers: Count | None = Field(
        None, le=MAX_THREADS, description="Processes decoding files into the cache; default: the rank's CPUs."
    )
    ignore_data_errors: bool = Field(
        False,
        description="Skip and count damaged records, and the rest of damaged files, instead of failing.",
    )
    dataset_service_compression: Literal["AUTO"] | None = Field(None, description=NO_EFFECT)
    examples_shuffle_buffer_size: NonNegative = Field(
        1024,
        le=MAX_SHUFFLE_BUFFER,
        description="Records held to shuffle; at most 2**20: it fills however small the data (it repeats).",
    )
    map_num_parallel_calls: Count | None = Field(
        None, le=MAX_THREADS, description="Decoding threads, each with a batch in flight; default: fastest."
    )
    interleave_num_parallel_calls: Count | None = Field(
        None, le=MAX_THREADS, description="Reading threads; default: fastest."
    )

    seg_dense_schema: SegDenseSchema
    tasks: dict[str, TaskData] = Field(description="Label -> its sampling rates; matched to towers by name.")
    evaluation_tasks: list[str] = Field(
        [], description="Tasks to report metrics for; empty: all model tasks."
    )
    preprocess: Preprocess | None = None

    @field_validator("cache_dir")
    @classmethod
    def _local(cls, value: str | None) -> str | None:
        if value is not None and "://" in value and not value.startswith("file://"):
            raise PydanticCustomError(
                "local_path", "the cache is memory-mapped, so it must be on local disk", {"v": value}
            )
        return value if value is None else value.removeprefix("file://")

    @model_validator(mode="after")
    def _one_input(self) -> DataConfig:
        files = ("inputs", "explicit_date_inputs", "explicit_datetime_inputs")
        if self.kafka is None or sum(getattr(self, name) is not None for name in files) > 1:
            # Or kafka beside one of them, which a follow run reads together (sources/mixed.py).
            exactly_one_of(self, "inputs", "explicit_date_inputs", "explicit_datetime_inputs", "kafka")
        if self.kafka is not None and self.cache:
            raise PydanticCustomError(
                "kafka_cache", "cache: true caches files; a kafka topic is read as it comes, without it", {}
            )
        if self.kafka is not None and self.format == "parquet":
            raise PydanticCustomError(
                "kafka_parquet",
                "kafka messages are tf.Examples, and so are the files read with them: format: tfrecord",
                {},
            )
        return self

    @model_validator(mode="after")
    def _batch_fits(self) -> DataConfig:
        downsample = self.preprocess and self.preprocess.downsample_negatives
        if not downsample:
            return self  # global_batch_size has its own bound
        records = self.global_batch_size * downsample.batch_multiplier
        if records > MAX_RECORDS_PER_BATCH:
            raise PydanticCustomError(
                "batch_size",
                "global_batch_size x preprocess.downsample_negatives.batch_multiplier = {n} records read "
                "per batch; at most {max}",
                {"n": f"{records:,}", "max": f"{MAX_RECORDS_PER_BATCH:,}"},
            )
        return self
