"""The whole YAML file, and the checks that span its sections."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, Field

from ..errors import UserError
from ..schema import FeatureSpec, SchemaError
from .base import NO_EFFECT, StrictModel
from .data import DataConfig
from .model import ModelConfig
from .optimizer import LearningRate, OptimizerConfig
from .serving import ServingConfig, default_engagement_weights
from .training import TrainingConfig


class Config(StrictModel):
    """The whole YAML file."""

    training: TrainingConfig = TrainingConfig()
    model: ModelConfig
    train_data: DataConfig
    validation_data: dict[str, DataConfig] = Field({}, description="Split name -> data config.")
    optimizer: OptimizerConfig
    serving: ServingConfig = ServingConfig()

    @property
    def task_names(self) -> list[str]:
        """Model tasks in config order: the order of every [B, T] tensor the model returns."""
        return list(self.model.tasks)

    @property
    def engagement_weights(self) -> dict[str, float]:
        weights = self.serving.engagement_weights
        return dict(weights) if weights is not None else default_engagement_weights(self.task_names)

    @property
    def validation_sections(self) -> dict[str, DataConfig]:
        """Each validation split's data config under its dotted path, validation_data.<split>."""
        return {f"validation_data.{split}": data for split, data in self.validation_data.items()}

    @property
    def data_sections(self) -> dict[str, DataConfig]:
        """Every data config under its dotted path: train_data, then validation_data.<split>."""
        return {"train_data": self.train_data} | self.validation_sections

    def split_data(self, split: str) -> tuple[str, DataConfig]:
        """The dotted path and the data config of `split`: "train" or a validation split."""
        if split == "train":
            return "train_data", self.train_data
        if split not in self.validation_data:
            raise UserError(
                f"no split {split!r}: the splits are train, {', '.join(self.validation_data) or '(none)'}"
            )
        return f"validation_data.{split}", self.validation_data[split]


def short_names(names: list[str]) -> dict[str, str]:
    """Task names without the dotted prefix they all share (`recap.engagement.`), for tables and logs."""
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind(".") + 1]
    return {name: name[len(prefix) :] for name in names}


Problem = tuple[str, str]  # (dotted path, what is wrong)


def cross_check(config: Config) -> list[Problem]:
    """Checks between sections; each problem names the field a user must change."""
    tasks = config.task_names
    problems: list[Problem] = []
    for task in tasks:
        if task not in config.train_data.tasks:
            problems.append((f"model.tasks.{task}", "no label of that name in train_data.tasks"))

    lrs = config.optimizer.multi_task_learning_rates
    if lrs is not None:
        for task in tasks:
            if task not in lrs.tower_learning_rates:
                problems.append(
                    (
                        "optimizer.multi_task_learning_rates.tower_learning_rates",
                        f"no learning rate for task {task}",
                    )
                )
        for task in lrs.tower_learning_rates:
            if task not in config.model.tasks:
                problems.append(
                    (
                        f"optimizer.multi_task_learning_rates.tower_learning_rates.{task}",
                        "not a task of model.tasks",
                    )
                )

    for split, data in config.validation_data.items():
        for task in data.evaluation_tasks:
            if task not in data.tasks:
                problems.append(
                    (f"validation_data.{split}.evaluation_tasks", f"{task} is not in this split's tasks")
                )
            elif task not in config.model.tasks:
                problems.append(
                    (f"validation_data.{split}.evaluation_tasks", f"{task} is not a task of model.tasks")
                )
        if not data.evaluation_tasks:
            for task in tasks:
                if task not in data.tasks:
                    problems.append((f"validation_data.{split}.tasks", f"no label for model task {task}"))

    for split, data in config.validation_data.items():
        files = data.inputs or data.explicit_date_inputs or data.explicit_datetime_inputs
        if data.kafka is not None and files:
            reason = "a topic together with files is read only by train_data in follow mode: keep one of them"
            problems.append((f"validation_data.{split}.kafka", reason))

    problems += _keep_best_problems(config)
    problems += _promote_problems(config)

    for task in config.serving.engagement_weights or {}:
        if task not in config.model.tasks:
            problems.append((f"serving.engagement_weights.{task}", "not a task of model.tasks"))

    problems += _schema_problems("train_data", config.train_data)
    for split, data in config.validation_data.items():
        problems += _schema_problems(f"validation_data.{split}", data)
    return problems


def _promote_problems(config: Config) -> list[Problem]:
    promote = config.training.promote
    if promote is None:
        return []
    problems = []
    every = config.training.checkpoint_every_n
    if promote.every_steps is not None and promote.every_steps % every:
        problems.append(
            (
                "training.promote.every_steps",
                f"{promote.every_steps} is not a multiple of checkpoint_every_n ({every})",
            )
        )
    if promote.split is not None and promote.split not in config.validation_data:
        splits = ", ".join(config.validation_data) or "none"
        problems.append(
            ("training.promote.split", f"{promote.split} is not a validation split (there are: {splits})")
        )
    if not config.validation_data:
        problems.append(("training.promote", "needs a validation split to score the candidates on"))
    problems += [
        ("training.promote.tasks", f"{t} is not a task of model.tasks")
        for t in promote.tasks
        if t not in config.model.tasks
    ]
    return problems


def _keep_best_problems(config: Config) -> list[Problem]:
    best = config.training.keep_best
    if best is None:
        return []
    data = config.validation_data.get(best.split)
    if data is None:
        splits = ", ".join(config.validation_data) or "none"
        return [("training.keep_best.split", f"{best.split} is not a validation split (there are: {splits})")]
    evaluated = data.evaluation_tasks or config.task_names
    if best.task != "mean" and best.task not in evaluated:
        return [
            (
                "training.keep_best.task",
                f"{best.task} is not a model task evaluated on {best.split}, nor `mean`",
            )
        ]
    return []


def _schema_problems(where: str, data: DataConfig) -> list[Problem]:
    """What the config reads must be in the schema file, in a form a batch of tensors can hold."""
    try:
        specs = data.seg_dense_schema.specs
    except SchemaError as e:
        return [(f"{where}.seg_dense_schema.schema_path", str(e))]
    return [
        *_feature_problems(where, data, specs),
        *_label_problems(where, data, specs),
        *_mantissa_problems(where, data, specs),
        *_timestamp_problems(where, data, specs),
    ]


def _feature_problems(where: str, data: DataConfig, specs: dict[str, FeatureSpec]) -> list[Problem]:
    schema = data.seg_dense_schema
    read = [(f"renamed_features.{new}", old) for new, old in schema.renamed_features.items()]
    read += [("features", name) for name in schema.features]
    problems = []
    for field, name in read:
        if name not in specs:
            problems.append((f"{where}.seg_dense_schema.{field}", f"{name} is not in {schema.schema_path}"))
        elif specs[name].dtype == "bytes_list":
            problems.append(
                (
                    f"{where}.seg_dense_schema.{field}",
                    f"{name} is a bytes_list, which a batch of tensors cannot hold",
                )
            )
    return problems


def config_warnings(config: Config) -> list[Problem]:
    """What loads but likely does not do what was meant; each names the field to look at."""
    return list(_no_effect_fields(config)) + _schedule_ends(config) + _moving_best(config)


def _moving_best(config: Config) -> list[Problem]:
    """keep_best on a split whose dated folders end at latest: each evaluation reads the newest ones, so the
    best is chosen among figures of different examples."""
    best = config.training.keep_best
    if best is None or (data := config.validation_data.get(best.split)) is None:
        return []
    dated = data.explicit_datetime_inputs or data.explicit_date_inputs
    if dated is None or not dated.latest:
        return []
    reason = (
        f"{best.split} ends at latest, so each evaluation reads other (the newest) examples and the best "
        "is chosen among figures of different data; keep a split with a fixed end for it"
    )
    return [("training.keep_best.split", reason)]


def _no_effect_fields(value: Any, where: str = "") -> Iterator[Problem]:
    """Every field described as NO_EFFECT that the config sets, in any section, split or list entry."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _no_effect_fields(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _no_effect_fields(item, f"{where}[{i}]")
    elif isinstance(value, BaseModel):
        for name, field in type(value).model_fields.items():
            if name not in value.model_fields_set:  # a default: nothing the YAML asked for
                continue
            path = f"{where}.{name}" if where else name
            if field.description != NO_EFFECT:
                yield from _no_effect_fields(getattr(value, name), path)
            elif getattr(value, name) is not None:
                yield path, NO_EFFECT


def _schedule_ends(config: Config) -> list[Problem]:
    """Schedules shaped for another run length. One warning for all the schedules with the same problem,
    naming the first: a YAML alias shares one schedule among every tower, and `--set
    training.num_train_steps=50` would otherwise warn once per tower."""
    steps = config.training.num_train_steps
    found: dict[str, list[str]] = {}  # message -> the fields it is about
    for where, schedule in _schedules(config.optimizer):
        if (problem := _end_problem(schedule, steps)) is not None:
            field, message = problem
            found.setdefault(message, []).append(f"{where}.{field}")
    return [
        (fields[0], message + (f" (the same in {len(fields) - 1} more schedules)" if len(fields) > 1 else ""))
        for message, fields in found.items()
    ]


def _end_problem(schedule: LearningRate, steps: int) -> Problem | None:
    if (cosine := schedule.linear_ramp_to_cosine) is not None:
        end = cosine.final_num_steps
        if end == steps:
            return None
        effect = (
            f"the last {steps - end} steps run at final_learning_rate"
            if end < steps
            else "training stops before the rate reaches final_learning_rate"
        )
        message = f"the cosine ends at step {end} but training.num_train_steps is {steps}: {effect}"
        return "linear_ramp_to_cosine.final_num_steps", message
    # The rate of step s (from 0) is learning_rate_values[number of boundaries <= s], and the last step is
    # steps - 1. A last boundary before the end is how the schedule is meant to be used.
    boundaries = schedule.piecewise_constant.learning_rate_boundaries if schedule.piecewise_constant else []
    if not boundaries or boundaries[-1] < steps:
        return None
    message = (
        f"the last boundary, {boundaries[-1]}, is not reached in training.num_train_steps ({steps}) steps: "
        "the last of learning_rate_values is never used"
    )
    return "piecewise_constant.learning_rate_boundaries", message


def _schedules(optimizer: OptimizerConfig) -> list[tuple[str, LearningRate]]:
    if optimizer.single_task_learning_rate is not None:
        return [("optimizer.single_task_learning_rate", optimizer.single_task_learning_rate)]
    rates = optimizer.multi_task_learning_rates
    assert rates is not None  # the config requires exactly one of the two
    where = "optimizer.multi_task_learning_rates"
    out = [(f"{where}.backbone_learning_rate", rates.backbone_learning_rate)]
    out += [(f"{where}.tower_learning_rates.{task}", lr) for task, lr in rates.tower_learning_rates.items()]
    return [(path, schedule) for path, schedule in out if schedule is not None]


def _label_problems(where: str, data: DataConfig, specs: dict[str, FeatureSpec]) -> list[Problem]:
    problems = []
    for task in data.tasks:
        if task not in specs:
            problems.append(
                (
                    f"{where}.tasks.{task}",
                    f"no label feature of that name in {data.seg_dense_schema.schema_path}",
                )
            )
        elif specs[task].length != 1:
            problems.append(
                (
                    f"{where}.tasks.{task}",
                    f"the schema gives it {specs[task].length} values; a label is one value per example",
                )
            )
    return problems


def _mantissa_problems(where: str, data: DataConfig, specs: dict[str, FeatureSpec]) -> list[Problem]:
    schema = data.seg_dense_schema
    features = {**schema.renamed_features, **{name: name for name in schema.features}}  # name -> in schema
    problems = []
    for name in schema.mask_mantissa_features:
        field = f"{where}.seg_dense_schema.mask_mantissa_features.{name}"
        if name not in features:
            problems.append((field, f"not a feature read by this config (features: {', '.join(features)})"))
        elif features[name] in specs and specs[features[name]].dtype != "float_list":
            problems.append((field, "only float features have a mantissa"))
    return problems


def _timestamp_problems(where: str, data: DataConfig, specs: dict[str, FeatureSpec]) -> list[Problem]:
    """rectify_labels reads each timestamp as a renamed feature or, by its schema name, from the schema."""
    rectify = data.preprocess and data.preprocess.rectify_labels
    if not rectify:
        return []
    fields = {
        "served_timestamp_field": rectify.served_timestamp_field,
        "impressed_timestamp_field": rectify.impressed_timestamp_field,
        **{
            f"label_to_engaged_timestamp_field.{task}": name
            for task, name in rectify.label_to_engaged_timestamp_field.items()
        },
    }
    schema = data.seg_dense_schema
    return [
        (
            f"{where}.preprocess.rectify_labels.{field}",
            f"the timestamp {name} is neither a renamed feature nor in the schema {schema.schema_path}",
        )
        for field, name in fields.items()
        if name not in schema.renamed_features and name not in specs
    ]
