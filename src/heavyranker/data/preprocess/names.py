"""The features and tasks a preprocessor names, looked up with errors that name its config field. The same
lookup serves output_specs (Specs) and apply (arrays), so a bad name reads the same wherever it is met."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from ...errors import UserError

T = TypeVar("T")


def feature(features: Mapping[str, T], name: str, where: str) -> T:
    if name not in features:
        raise UserError(f"{where}: no feature {name} (features: {', '.join(features)})")
    return features[name]


def task_column(tasks: tuple[str, ...], task: str, where: str) -> int:
    if task not in tasks:
        raise UserError(f"{where}: {task} is not a task of this data config (tasks: {', '.join(tasks)})")
    return tasks.index(task)
