"""The search space of `heavyranker tune`: a small YAML of what to maximize and which dotted config paths to
vary, read, checked against the config (each value applied, then the config's own validation), and turned
into Optuna distributions.

    objective: {split: validation, metric: rce, tasks: mean}   # tasks: mean | weighted | [task, ...]
    params:
      training.num_train_steps: {low: 1000, high: 4000, step: 1000}
      model.multi_task_type: {choices: [share_all, share_partial]}
      model.backbone.mask_net_config.mlp.layer_sizes: {choices: [[128], [256, 128]]}
      model: {choices: [{multi_task_type: share_all}, {multi_task_type: mmoe, backbone: null, experts: ...}]}

A choice that is a mapping sets the fields it names below the parameter's path (tune/settings.py).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
)

from ..config import Config, ConfigError, load_config
from ..config.loader import read_yaml
from ..data.sources.files import select_files
from ..errors import UserError
from .settings import check_mapping, flow_yaml, refuse_conflicts, settings

METRICS = ("rce", "auroc", "nrce")  # higher is better, as the study's direction says
TASK_RULES = ("mean", "weighted")
PRIMITIVE = (str, int, float, bool, type(None))  # what Optuna stores as a categorical choice


@dataclass(frozen=True)
class Objective:
    """What a trial scores: `metric` on `split`, averaged over `tasks` (a list), or `mean` (the split's
    evaluated tasks), or `weighted` (by |serving.engagement_weights|: a negative weight still asks for a
    good prediction of that engagement)."""

    split: str
    metric: str
    tasks: str | tuple[str, ...]

    def value(self, metrics: dict[str, dict[str, float | None]], weights: dict[str, float]) -> float:
        """The objective of one evaluation of the split (task -> metric -> value; None or NaN where a task
        has one class only: it is left out, as keep_best's mean does). NaN where no task is defined."""
        if self.tasks == "mean" or self.tasks == "weighted":
            tasks = [task for task in metrics if "/" not in task]  # not the stratified rows
        else:
            tasks = list(self.tasks)
        shares = {task: abs(weights.get(task, 0.0)) if self.tasks == "weighted" else 1.0 for task in tasks}
        defined = {
            task: value
            for task in tasks
            if (value := metrics[task][self.metric]) is not None and not math.isnan(value) and shares[task]
        }
        total = sum(shares[task] for task in defined)
        return sum(shares[task] * v for task, v in defined.items()) / total if total else math.nan


@dataclass(frozen=True)
class Param:
    """One dotted config path and its distribution; `values` maps a categorical label back to its value
    (a choice Optuna cannot store, such as a list of layer sizes, is stored as its YAML). A `*` in the path
    stands for every key at its level (`...tower_learning_rates.*.constant`: one value for every tower);
    `targets` are the paths it names in the config. A mapping choice sets the fields it names below them."""

    path: str
    distribution: BaseDistribution
    values: dict[str, Any]
    targets: tuple[str, ...] = ()

    def config_value(self, drawn: Any) -> Any:
        return self.values.get(drawn, drawn) if isinstance(drawn, str) else drawn

    def samples(self) -> list[Any]:
        """Each choice's value, or a range's two ends."""
        distribution = self.distribution
        if isinstance(distribution, CategoricalDistribution):
            return [self.config_value(c) for c in distribution.choices]
        return [distribution.low, distribution.high]

    def settings(self, drawn: Any) -> dict[str, Any]:
        """Dotted config path -> value, for a drawn value (Optuna's label of a choice)."""
        return settings(self.targets, self.config_value(drawn))


@dataclass(frozen=True)
class SearchSpace:
    objective: Objective
    params: tuple[Param, ...]

    def config_values(self, drawn: dict[str, Any]) -> dict[str, Any]:
        """Dotted path -> config value of a trial's parameters (Optuna's names are the dotted paths)."""
        return {
            path: value
            for p in self.params
            if p.path in drawn
            for path, value in p.settings(drawn[p.path]).items()
        }

    def fingerprint(self) -> dict[str, Any]:
        """What makes two spaces' trials comparable: the objective, and each parameter's distribution (as
        Optuna writes it to JSON: kind, range or choices' labels)."""
        split, metric, tasks = self.objective.split, self.objective.metric, self.objective.tasks
        return {
            "objective": [split, metric, tasks if isinstance(tasks, str) else list(tasks)],
            "params": {p.path: json.loads(distribution_to_json(p.distribution)) for p in self.params},
        }


def read_space(
    space_path: str | os.PathLike, config_path: str | os.PathLike, overrides: list[str]
) -> SearchSpace:
    """The search space at `space_path`, checked against the config: UserError naming the space file and the
    entry where anything is wrong."""
    where = str(space_path)
    # As a config is read: a key given twice is refused (safe_load kept the last silently), and so are an
    # alias bomb and bytes that are not UTF-8.
    data = read_yaml(Path(space_path), "the search space")
    if not isinstance(data, dict):
        raise UserError(f"{where}: the search space is a mapping with `objective:` and `params:`")
    unknown = set(data) - {"objective", "params"}
    if unknown:
        raise UserError(
            f"{where}: {', '.join(sorted(unknown))}: unknown (the space holds objective and params)"
        )
    params = data.get("params")
    if not params:
        raise UserError(
            f"{where}: params: empty; name at least one dotted config path and its range or choices"
        )
    if not isinstance(params, dict):
        raise UserError(f"{where}: params: a mapping of dotted config paths to ranges or choices")
    config = load_config(config_path, overrides)
    objective = _objective(where, data.get("objective"), config)
    tree = config.model_dump(mode="json")
    space = SearchSpace(
        objective,
        tuple(_param(where, path, spec, tuple(expand(path, tree))) for path, spec in params.items()),
    )
    for param in space.params:
        _check_applies(where, param, config_path, overrides)
    refuse_conflicts(where, {p.path: _fields(p) for p in space.params})
    return space


def _objective(where: str, spec: Any, config: Config) -> Objective:
    spec = {} if spec is None else spec
    if not isinstance(spec, dict) or set(spec) - {"split", "metric", "tasks"}:
        raise UserError(f"{where}: objective: a mapping of split, metric and tasks")
    split = spec.get("split")
    if split is None or split not in config.validation_data:
        splits = ", ".join(config.validation_data) or "none"
        raise UserError(
            f"{where}: objective.split: {split!r} is not a validation split (there are: {splits})"
        )
    _refuse_training_files(where, split, config)
    metric = spec.get("metric", "rce")
    if metric not in METRICS:
        raise UserError(f"{where}: objective.metric: {metric!r} is not one of {', '.join(METRICS)}")
    tasks = spec.get("tasks", "mean")
    evaluated = list(config.validation_data[split].evaluation_tasks) or config.task_names
    if isinstance(tasks, list) and tasks:
        unknown = [t for t in tasks if t not in evaluated]
        if unknown:
            raise UserError(
                f"{where}: objective.tasks: {', '.join(map(str, unknown))} not evaluated on {split}"
            )
        return Objective(split, metric, tuple(tasks))
    if tasks not in TASK_RULES:
        raise UserError(f"{where}: objective.tasks: {tasks!r}: give mean, weighted or a list of tasks")
    return Objective(split, metric, tasks)


def _refuse_training_files(where: str, split: str, config: Config) -> None:
    """The objective must come from data the trials do not train on: refuse a split sharing files with
    train_data (a Kafka source has no files to compare)."""
    data = config.validation_data[split]
    if data.kafka is not None or config.train_data.kafka is not None:
        return
    shared = set(select_files(data)) & set(select_files(config.train_data))
    if shared:
        raise UserError(
            f"{where}: objective.split: {split} reads {len(shared)} file(s) train_data trains on "
            f"(such as {min(shared)}); score trials on a split they do not train on"
        )


def expand(path: str, tree: Any) -> list[str]:
    """The dotted paths `path` names in the config `tree` (a `*` matches every key at its level; keys may
    hold dots, as task names do: the longest run of segments naming a key wins). A path that does not lead
    anywhere is returned as it is, for the config's validation to name."""
    segments = path.split(".")
    if "*" not in segments:
        return [path]
    found: list[str] = []

    def walk(node: Any, rest: list[str], done: list[str]) -> None:
        if not rest:
            found.append(".".join(done))
        elif rest[0] == "*" and isinstance(node, dict):
            for key in node:
                walk(node[key], rest[1:], [*done, key])
        elif isinstance(node, dict):
            for n in range(len(rest), 0, -1):
                key = ".".join(rest[:n])
                if key in node:
                    walk(node[key], rest[n:], [*done, key])
                    return
            found.append(".".join([*done, *rest]))
        else:
            found.append(".".join([*done, *rest]))

    walk(tree, segments, [])
    return found


def _param(where: str, path: str, spec: Any, targets: tuple[str, ...]) -> Param:
    at = f"{where}: params.{path}"
    if not isinstance(spec, dict):
        raise UserError(f"{at}: give {{low, high}} (with log or step) or {{choices: [...]}}")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"} or not isinstance(choices, list) or not choices:
            raise UserError(f"{at}: choices is a non-empty list, alone")
        for n, choice in enumerate(choices):
            if isinstance(choice, dict):
                check_mapping(f"{at}.choices[{n}]", choice)
        labels = [c if isinstance(c, PRIMITIVE) else flow_yaml(c) for c in choices]
        if len(set(map(repr, labels))) < len(labels):
            raise UserError(f"{at}: a choice is given twice")
        values = {label: c for label, c in zip(labels, choices, strict=True) if not isinstance(c, PRIMITIVE)}
        return Param(path, CategoricalDistribution(labels), values, targets)
    return Param(path, _range(at, spec), {}, targets)


def _range(at: str, spec: dict[str, Any]) -> BaseDistribution:
    unknown = set(spec) - {"low", "high", "log", "step"}
    if unknown or "low" not in spec or "high" not in spec:
        raise UserError(f"{at}: a range is {{low, high}} with log: true or a step (got {', '.join(spec)})")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    numbers = [v for v in (low, high, step) if v is not None]
    not_numbers = any(isinstance(v, bool) or not isinstance(v, int | float) for v in numbers)
    if not_numbers or not isinstance(log, bool):
        raise UserError(f"{at}: low, high and step are numbers, log true or false")
    if not low < high:
        raise UserError(f"{at}: low ({low}) must be below high ({high})")
    if log and (step is not None or low <= 0):
        raise UserError(f"{at}: log: true needs low above 0 and no step")
    if step is not None and step <= 0:
        raise UserError(f"{at}: step must be above 0")
    if all(isinstance(v, int) for v in numbers):
        return IntDistribution(low, high, log=log, step=step or 1)
    return FloatDistribution(float(low), float(high), log=log, step=None if step is None else float(step))


def _check_applies(where: str, param: Param, config_path: str | os.PathLike, overrides: list[str]) -> None:
    """Each end of a range, each choice, applied to the config alone and validated as the config is: an
    unknown path or a value of the wrong type is an error naming the path (a mapping choice: its index)
    before any trial runs."""
    for n, value in enumerate(param.samples()):
        try:
            load_config(config_path, overrides, values=settings(param.targets, value))
        except ConfigError as e:
            path, problem = e.problems[0]
            what = f".choices[{n}]: it" if isinstance(value, dict) else f": {value!r}"
            raise UserError(
                f"{where}: params.{param.path}{what} does not fit the config: {path}: {problem}"
            ) from None


def _fields(param: Param) -> tuple[bool, set[str]]:
    """Whether a choice of `param` is a mapping, and the dotted paths its values set."""
    samples = param.samples()
    return any(isinstance(v, dict) for v in samples), {
        path for v in samples for path in settings(param.targets, v)
    }
