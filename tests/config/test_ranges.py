"""Values that cannot be right are config errors naming the field and its bound, before anything runs."""

import types
import typing
from collections.abc import Iterator
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from heavyranker.config import Config, ConfigError, load_config

FAV = "recap.engagement.is_favorited"
LR = f"optimizer.multi_task_learning_rates.tower_learning_rates.{FAV}.linear_ramp_to_cosine.learning_rate"
TOWER = f"model.tasks.{FAV}.mlp_config"
TABLE = "model.small_embeddings={tables: [{name: t, index: 0, num_embeddings: %d, embedding_dim: %d}]}"
DOWNSAMPLE = "train_data.preprocess={downsample_negatives: {batch_multiplier: %d, num_engagements: 1}}"
DATES = "train_data.explicit_date_inputs={data_root: d, end_date: '%s', days: %d}"


def problem(path, *overrides: str) -> str:
    """The one problem of local_small with `overrides`, without the file name."""
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    [line] = info.value.lines()
    return line.removeprefix(f"{path}: ")


def _field_and_value(override: str) -> str:
    dotted, _, value = override.partition("=")
    return f"{dotted.rpartition('.')[2]}={value}"


OUT_OF_RANGE = [
    (f"{LR}=-0.01", f"{LR}: Input should be greater than or equal to 0 (got -0.01)"),
    (f"{LR}=.nan", f"{LR}: Input should be a finite number (got nan)"),
    (f"{LR}=-.inf", f"{LR}: Input should be a finite number (got -inf)"),
    (f"{LR}=1e400", f"{LR}: Input should be a finite number (got '1e400')"),  # PyYAML: a string
    (
        "training.num_train_steps=true",
        "training.num_train_steps: Input should be a valid integer (got True)",
    ),
    (
        "training.num_train_steps=3.0",
        "training.num_train_steps: Input should be a valid integer (got 3.0)",
    ),
    (
        "training.num_eval_steps=0",
        "training.num_eval_steps: 0 batches would evaluate nothing: give a number of batches, "
        "or -1 for all (got 0)",
    ),
    (
        "training.seed=18446744073709551616",
        "training.seed: Input should be less than or equal to 18446744073709551615 "
        "(got 18446744073709551616)",
    ),
    (
        f"model.tasks.{FAV}.pos_weight=true",
        f"model.tasks.{FAV}.pos_weight: a boolean is not a number (got True)",
    ),
    (  # before: 1e39 loaded, an infinity as the loss's float32: every loss NaN
        f"model.tasks.{FAV}.pos_weight=1.0e+39",
        f"model.tasks.{FAV}.pos_weight: Input should be less than or equal to 1000000 (got 1e+39)",
    ),
    (  # before: an infinite total loss and gradients
        f"model.tasks.{FAV}.loss_weight=1.0e+39",
        f"model.tasks.{FAV}.loss_weight: Input should be less than or equal to 1000000 (got 1e+39)",
    ),
    (  # before: the logit's float32 infinite, its probability 0, 1 or NaN
        f"model.tasks.{FAV}.affine_map={{scale: 1.0e+39}}",
        f"model.tasks.{FAV}.affine_map.scale: Input should be less than or equal to 1000000 (got 1e+39)",
    ),
    (
        f"model.tasks.{FAV}.affine_map={{bias: -1.0e+39}}",
        f"model.tasks.{FAV}.affine_map.bias: Input should be greater than or equal to -1000000 (got -1e+39)",
    ),
    ("optimizer.adam.beta_2=1.0", "optimizer.adam.beta_2: Input should be less than 1 (got 1.0)"),
    ("optimizer.adam.beta_1=.nan", "optimizer.adam.beta_1: Input should be a finite number (got nan)"),
    ("optimizer.adam.epsilon=0", "optimizer.adam.epsilon: Input should be greater than 0 (got 0)"),
    (
        f"train_data.tasks.{FAV}.neg_downsampling_rate=0",
        f"train_data.tasks.{FAV}.neg_downsampling_rate: Input should be greater than 0 (got 0)",
    ),
    (
        f"serving.engagement_weights={{{FAV}: .inf}}",
        f"serving.engagement_weights.{FAV}: Input should be a finite number (got inf)",
    ),
]


@pytest.mark.parametrize(
    "override, expected", OUT_OF_RANGE, ids=[_field_and_value(o) for o, _ in OUT_OF_RANGE]
)
def test_a_value_out_of_its_range(small_config_path, override, expected):
    assert problem(small_config_path, override) == expected


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["train_data.global_batch_size=1048577"],
            "train_data.global_batch_size: Input should be less than or equal to 1048576 (got 1048577)",
        ),
        (
            ["validation_data.validation.global_batch_size=1000000000000"],
            "validation_data.validation.global_batch_size: Input should be less than or equal to 1048576 "
            "(got 1000000000000)",
        ),
        (
            ["train_data.global_batch_size=524288", DOWNSAMPLE % 4],
            "train_data: global_batch_size x preprocess.downsample_negatives.batch_multiplier = 2,097,152 "
            "records read per batch; at most 1,048,576",
        ),
        (
            ["train_data.examples_shuffle_buffer_size=1048577"],
            "train_data.examples_shuffle_buffer_size: Input should be less than or equal to 1048576 "
            "(got 1048577)",
        ),
        (
            ["train_data.map_num_parallel_calls=1025"],
            "train_data.map_num_parallel_calls: Input should be less than or equal to 1024 (got 1025)",
        ),
        (
            [f"{TOWER}.layer_sizes=[32769, 1]"],
            f"{TOWER}.layer_sizes[0]: Input should be less than or equal to 32768 (got 32769)",
        ),
        (
            [TABLE % (2**20, 2**12)],
            "model.small_embeddings.tables[0]: num_embeddings x embedding_dim = 4,294,967,296 elements; "
            "at most 2**31 (2,147,483,648, 8 GiB of float32)",
        ),
        (
            ["train_data.inputs=null", DATES % ("0050-01-01", 36525)],
            "train_data.explicit_date_inputs: 36525 days back from 0050-01-01 reach before the year 1",
        ),
        (
            ["train_data.inputs=null", DATES % ("2023-01-31", 36526)],
            "train_data.explicit_date_inputs.days: Input should be less than or equal to 36525 (got 36526)",
        ),
        (
            ["train_data.seg_dense_schema.mask_mantissa_features={continuous: 24}"],
            "train_data.seg_dense_schema.mask_mantissa_features.continuous: Input should be less than or "
            "equal to 23 (got 24)",
        ),
    ],
    ids=[
        "batch",
        "validation-batch",
        "records-per-batch",
        "shuffle-buffer",
        "decoding-threads",
        "layer",
        "table",
        "before-year-1",
        "days",
        "mantissa-bits",
    ],
)
def test_a_size_that_would_allocate_without_bound(small_config_path, overrides, expected):
    assert problem(small_config_path, *overrides) == expected


def test_the_largest_sizes_allowed_load(small_config_path):
    config = load_config(
        small_config_path,
        [
            "train_data.global_batch_size=1048576",
            "train_data.examples_shuffle_buffer_size=1048576",
            f"{TOWER}.layer_sizes=[32768, 1]",
            TABLE % (2**19, 2**12),  # 2**31 elements
        ],
    )
    assert config.model.small_embeddings.tables[0].num_embeddings == 2**19


# --- every field that holds numbers, found by walking the config models ---


def _unwrap(annotation: Any) -> tuple[Any, list[type]]:
    """The type a field holds, through Annotated, Optional, list and dict, and the containers around it."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _unwrap(args[0])
    if origin in (typing.Union, types.UnionType):
        return _unwrap(next(a for a in args if a is not type(None)))
    if origin in (list, dict):
        leaf, containers = _unwrap(args[-1])
        return leaf, [origin, *containers]
    return annotation, []


def _number_fields(
    model: type[BaseModel] = Config, seen: set | None = None
) -> Iterator[tuple[str, Any, list]]:
    """(Model.field, its type with its constraints, the containers of its numbers) for every field of the
    config that holds numbers."""
    seen = set() if seen is None else seen
    for name, field in model.model_fields.items():
        leaf, containers = _unwrap(field.annotation)
        if isinstance(leaf, type) and issubclass(leaf, BaseModel) and leaf not in seen:
            seen.add(leaf)
            yield from _number_fields(leaf, seen)
        elif leaf in (int, float):
            yield f"{model.__name__}.{name}", Annotated[field.annotation, field], containers


NAN, INF = float("nan"), float("inf")
NUMBER_FIELDS = {name: (annotation, containers) for name, annotation, containers in _number_fields()}


def _cases() -> Iterator[Any]:
    for name, (annotation, containers) in NUMBER_FIELDS.items():
        for number in (True, False, NAN, INF, -INF):
            value = number
            for container in reversed(containers):  # placed where the field holds its numbers
                value = [value] if container is list else {"key": value}
            yield pytest.param(annotation, value, id=f"{name}={number}")


def test_the_walk_finds_the_number_fields():
    some = {"TrainingConfig.num_train_steps", "AdamConfig.epsilon", "MlpConfig.layer_sizes"}
    some |= {"ServingConfig.engagement_weights", "SegDenseSchema.mask_mantissa_features"}
    assert some <= set(NUMBER_FIELDS)
    assert "TrainingConfig.save_dir" not in NUMBER_FIELDS and "LayerNormConfig.center" not in NUMBER_FIELDS


@pytest.mark.parametrize("annotation, value", list(_cases()))
def test_no_number_field_takes_a_boolean_nan_or_infinity(annotation, value):
    with pytest.raises(ValidationError):
        TypeAdapter(annotation).validate_python(value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train_data.inputs=null", DATES % ("2023-02-30", 3)],
            "train_data.explicit_date_inputs.end_date: not a date such as 2023-01-31, nor latest "
            "(got '2023-02-30')",
        ),
        (
            ["train_data.cache_dir=s3://bucket/cache"],
            "train_data.cache_dir: the cache is memory-mapped, so it must be on local disk "
            "(got 's3://bucket/cache')",
        ),
    ],
    ids=["not-a-date", "remote-cache"],
)
def test_a_validator_message_names_the_value_once(small_config_path, overrides, message):
    # Began with a literal "{v!r}": custom errors take {v}, not conversions; the loader adds the value.
    assert problem(small_config_path, *overrides) == message
