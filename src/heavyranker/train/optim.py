"""Adam with one parameter group per tower and one for everything else, each on its own learning-rate
schedule; a schedule is a pure function of the step, wrapped as a torch LR scheduler for checkpoints."""

from __future__ import annotations

import logging
import math
from bisect import bisect_right
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from ..config.optimizer import LearningRate, LinearRampToCosine, OptimizerConfig
from ..errors import UserError

log = logging.getLogger(__name__)

BACKBONE_RATE = "optimizer.multi_task_learning_rates.backbone_learning_rate"
# Keys of a param group that are not settings of the optimizer: its parameters, the schedule's rates.
_NOT_SETTINGS = ("params", "lr", "initial_lr")


def learning_rate_at(schedule: LearningRate, step: int) -> float:
    """The learning rate of `schedule` after `step` optimizer steps."""
    if schedule.constant is not None:
        return schedule.constant
    if (ramp := schedule.linear_ramp_to_constant) is not None:
        return min(ramp.learning_rate, ramp.learning_rate * step / ramp.num_ramp_steps)
    if (cosine := schedule.linear_ramp_to_cosine) is not None:
        return _ramp_to_cosine(cosine, step)
    piecewise = schedule.piecewise_constant
    assert piecewise is not None  # the config guarantees exactly one schedule
    return piecewise.learning_rate_values[bisect_right(piecewise.learning_rate_boundaries, step)]


def _ramp_to_cosine(cosine: LinearRampToCosine, step: int) -> float:
    if step < cosine.num_ramp_steps:
        return cosine.learning_rate * step / cosine.num_ramp_steps
    if step >= cosine.final_num_steps:
        return cosine.final_learning_rate
    progress = (step - cosine.num_ramp_steps) / (cosine.final_num_steps - cosine.num_ramp_steps)
    span = cosine.learning_rate - cosine.final_learning_rate
    return cosine.final_learning_rate + span * 0.5 * (1.0 + math.cos(math.pi * progress))


class ScheduledLearningRates(LRScheduler):
    """Sets param group k's lr to learning_rate_at(schedules[k], step), step = optimizer steps taken so far
    (0 when built, +1 per scheduler.step() after each optimizer.step())."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedules: list[LearningRate]):
        if len(schedules) != len(optimizer.param_groups):
            raise ValueError(f"{len(schedules)} schedules for {len(optimizer.param_groups)} parameter groups")
        self.schedules = list(schedules)
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [learning_rate_at(schedule, self.last_epoch) for schedule in self.schedules]

    def state_dict(self) -> dict[str, Any]:
        # The schedules come from the config; without them the state loads with weights_only=True.
        return {k: v for k, v in super().state_dict().items() if k != "schedules"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # The groups take the restored step's rates even if the optimizer's own state is not loaded.
        for group, lr in zip(self.optimizer.param_groups, self.get_last_lr(), strict=True):
            group["lr"] = lr


def build_optimizer(
    config: OptimizerConfig, model: nn.Module
) -> tuple[torch.optim.Adam, ScheduledLearningRates]:
    """Adam over `model`, which has .tower_parameters() -> {task: [Parameter]}: a group per tower
    (group["name"] = task) plus "backbone" for every other parameter, or one group "all" for
    single_task_learning_rate. Every parameter is in exactly one group."""
    groups, schedules = _param_groups(config, model)
    for group, schedule in zip(groups, schedules, strict=True):
        group["lr"] = learning_rate_at(schedule, 0)
    adam = config.adam
    # fused: one kernel per parameter instead of ~10 elementwise passes; about 10x faster on CPU for the
    # seed model (the step is memory bound) and the same update rule.
    optimizer = torch.optim.Adam(groups, betas=(adam.beta_1, adam.beta_2), eps=adam.epsilon, fused=True)
    return optimizer, ScheduledLearningRates(optimizer, schedules)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore a checkpoint's optimizer state (Adam's moments and step counts) but keep the settings that
    `optimizer` was built with from the config: load_state_dict also restores the checkpoint's betas and eps.
    Logs each setting that changed. Learning rates are the scheduler's."""
    own = [{k: v for k, v in group.items() if k not in _NOT_SETTINGS} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    changed: dict[str, tuple[Any, Any]] = {}
    for group, settings in zip(optimizer.param_groups, own, strict=True):
        for key, value in settings.items():
            if group[key] != value:
                changed[key] = (group[key], value)
                group[key] = value
    for key, (old, new) in changed.items():
        log.info("optimizer %s: %s in the checkpoint -> %s from the config", key, old, new)


def _param_groups(
    config: OptimizerConfig, model: nn.Module
) -> tuple[list[dict[str, Any]], list[LearningRate]]:
    # With optimizer.embedding, the tables have their own optimizer (table_optim.py).
    own = {id(p) for p in model.table_parameters()} if config.embedding is not None else set()
    single = config.single_task_learning_rate
    if single is not None:
        return [{"params": [p for p in model.parameters() if id(p) not in own], "name": "all"}], [single]
    rates = config.multi_task_learning_rates
    assert rates is not None  # the config guarantees exactly one of the two
    # The config's cross-checks guarantee one tower learning rate per model task and none besides.
    towers = model.tower_parameters()

    groups = [{"params": list(params), "name": task} for task, params in towers.items()]
    schedules = [rates.tower_learning_rates[task] for task in towers]
    in_towers = {id(p) for params in towers.values() for p in params} | own
    rest = [p for p in model.parameters() if id(p) not in in_towers]
    if rest:
        if rates.backbone_learning_rate is None:
            count = sum(p.numel() for p in rest)
            raise UserError(
                f"{BACKBONE_RATE} is not set, but the model has {count} parameters outside the towers "
                "(backbone, featurization, embeddings) that need one"
            )
        groups.append({"params": rest, "name": "backbone"})
        schedules.append(rates.backbone_learning_rate)
    return groups, schedules
