"""The whole YAML file, and the checks that span its sections."""

from __future__ import annotations

import os

from pydantic import Field

from ..schema import SchemaError, load_schema
from .base import StrictModel
from .data import DataConfig
from .model import ModelConfig
from .optimizer import OptimizerConfig
from .serving import ServingConfig, default_engagement_weights
from .training import TrainingConfig


class Config(StrictModel):
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

    for task in config.serving.engagement_weights or {}:
        if task not in config.model.tasks:
            problems.append((f"serving.engagement_weights.{task}", "not a task of model.tasks"))

    problems += _schema_problems("train_data", config.train_data)
    for split, data in config.validation_data.items():
        problems += _schema_problems(f"validation_data.{split}", data)
    return problems


def _schema_problems(where: str, data: DataConfig) -> list[Problem]:
    """Every feature and label the config reads must exist in the schema file."""
    path = data.seg_dense_schema.schema_path
    try:
        names = load_schema(path)
    except SchemaError as e:
        return [(f"{where}.seg_dense_schema.schema_path", str(e))]
    problems = []
    schema = data.seg_dense_schema
    for new_name, old_name in schema.renamed_features.items():
        if old_name not in names:
            problems.append(
                (f"{where}.seg_dense_schema.renamed_features.{new_name}", f"{old_name} is not in {path}")
            )
    for name in schema.features:
        if name not in names:
            problems.append((f"{where}.seg_dense_schema.features", f"{name} is not in {path}"))
    for task in data.tasks:
        if task not in names:
            problems.append((f"{where}.tasks.{task}", f"no label feature of that name in {path}"))
    return problems
