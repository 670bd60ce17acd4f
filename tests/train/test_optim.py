import io
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from heavyranker.config import load_config
from heavyranker.config.optimizer import LearningRate
from heavyranker.errors import UserError
from heavyranker.train.optim import build_optimizer, learning_rate_at

SMALL = Path(__file__).resolve().parents[2] / "configs" / "local_small.yaml"
RATES = "optimizer.multi_task_learning_rates"
FAR = 10**9


def schedule(**spec) -> LearningRate:
    return LearningRate.model_validate(spec)


class FakeRanker(nn.Module):
    """The shape of the real model as far as the optimizer cares: shared layers and one tower per task."""

    def __init__(self, task_names: list[str]):
        super().__init__()
        self.task_names = list(task_names)
        self.featurize = nn.LayerNorm(4)
        self.backbone = nn.Linear(4, 3)
        self.towers = nn.ModuleDict({t.replace(".", "__"): nn.Linear(3, 1) for t in task_names})

    def tower_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {t: list(self.towers[t.replace(".", "__")].parameters()) for t in self.task_names}


def test_constant():
    lr = schedule(constant=0.25)
    assert [learning_rate_at(lr, s) for s in (0, 7, FAR)] == [0.25, 0.25, 0.25]


def test_linear_ramp_to_constant():
    lr = schedule(linear_ramp_to_constant={"learning_rate": 0.1, "num_ramp_steps": 10})
    assert learning_rate_at(lr, 0) == 0.0
    assert learning_rate_at(lr, 5) == pytest.approx(0.05)
    assert learning_rate_at(lr, 10) == pytest.approx(0.1)
    assert learning_rate_at(lr, 11) == 0.1  # capped
    assert learning_rate_at(lr, FAR) == 0.1


def test_linear_ramp_to_cosine():
    spec = {"learning_rate": 1.0, "final_learning_rate": 0.1, "num_ramp_steps": 10, "final_num_steps": 110}
    lr = schedule(linear_ramp_to_cosine=spec)
    assert learning_rate_at(lr, 0) == 0.0
    assert learning_rate_at(lr, 5) == pytest.approx(0.5)  # mid-ramp
    assert learning_rate_at(lr, 10) == pytest.approx(1.0)  # end of ramp: top of the cosine
    assert learning_rate_at(lr, 60) == pytest.approx(0.55)  # cosine midpoint: halfway between the rates
    assert learning_rate_at(lr, 35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert learning_rate_at(lr, 110) == pytest.approx(0.1)
    assert learning_rate_at(lr, FAR) == 0.1


def test_piecewise_constant_boundaries_belong_to_the_next_piece():
    lr = schedule(
        piecewise_constant={"learning_rate_boundaries": [10, 20], "learning_rate_values": [1.0, 2.0, 3.0]}
    )
    steps = (0, 9, 10, 19, 20, FAR)
    assert [learning_rate_at(lr, s) for s in steps] == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]


def test_piecewise_lists_that_do_not_fit_are_a_clear_error():
    with pytest.raises(ValidationError, match="one more entry than learning_rate_boundaries"):
        schedule(
            piecewise_constant={"learning_rate_boundaries": [10, 20], "learning_rate_values": [1.0, 2.0]}
        )


def test_groups_partition_the_parameters_one_per_tower_plus_backbone():
    config = load_config(SMALL)
    model = FakeRanker(config.task_names)
    optimizer, _ = build_optimizer(config.optimizer, model)

    assert [g["name"] for g in optimizer.param_groups] == [*config.task_names, "backbone"]
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    for group in optimizer.param_groups[:-1]:
        tower = model.towers[group["name"].replace(".", "__")]
        assert [id(p) for p in group["params"]] == [id(p) for p in tower.parameters()]
    shared = [*model.featurize.parameters(), *model.backbone.parameters()]
    assert [id(p) for p in optimizer.param_groups[-1]["params"]] == [id(p) for p in shared]
    adam = config.optimizer.adam
    assert optimizer.defaults["betas"] == (adam.beta_1, adam.beta_2)
    assert optimizer.defaults["eps"] == adam.epsilon


def test_single_task_learning_rate_is_one_group():
    config = load_config(SMALL, [f"{RATES}=null", "optimizer.single_task_learning_rate={constant: 0.01}"])
    model = FakeRanker(config.task_names)
    optimizer, _ = build_optimizer(config.optimizer, model)
    assert [g["name"] for g in optimizer.param_groups] == ["all"]
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in model.parameters()]
    assert optimizer.param_groups[0]["lr"] == 0.01


def test_shared_parameters_need_a_backbone_learning_rate():
    config = load_config(SMALL, [f"{RATES}.backbone_learning_rate=null"])
    with pytest.raises(
        UserError, match=rf"{RATES}.backbone_learning_rate is not set.* 23 parameters outside"
    ):
        build_optimizer(config.optimizer, FakeRanker(config.task_names))  # LayerNorm(4): 8, Linear(4, 3): 15


def test_without_shared_parameters_no_backbone_group_is_needed():
    config = load_config(SMALL, [f"{RATES}.backbone_learning_rate=null"])
    model = FakeRanker(config.task_names)
    del model.featurize, model.backbone
    optimizer, _ = build_optimizer(config.optimizer, model)
    assert [g["name"] for g in optimizer.param_groups] == config.task_names


def tiered_config():
    """Each group on a different schedule, so a mix-up between groups shows."""
    tasks = load_config(SMALL).task_names
    overrides = [f"{RATES}.backbone_learning_rate={{constant: 0.5}}"]
    for i, task in enumerate(tasks):
        ramp = f"{{linear_ramp_to_constant: {{learning_rate: {0.1 * (i + 1)}, num_ramp_steps: {i + 2}}}}}"
        overrides.append(f"{RATES}.tower_learning_rates.{task}={ramp}")
    return load_config(SMALL, overrides)


def take_steps(optimizer, scheduler, n: int) -> None:
    for _ in range(n):
        optimizer.step()
        scheduler.step()


def expected_rates(config, step: int) -> list[float]:
    rates = config.optimizer.multi_task_learning_rates
    towers = [learning_rate_at(rates.tower_learning_rates[t], step) for t in config.task_names]
    return [*towers, learning_rate_at(rates.backbone_learning_rate, step)]


def test_scheduler_sets_each_group_from_its_schedule_at_every_step():
    config = tiered_config()
    model = FakeRanker(config.task_names)
    optimizer, scheduler = build_optimizer(config.optimizer, model)
    for step in range(6):
        assert [g["lr"] for g in optimizer.param_groups] == expected_rates(config, step)
        take_steps(optimizer, scheduler, 1)


def test_scheduler_state_round_trips_through_a_weights_only_checkpoint():
    config = tiered_config()
    model = FakeRanker(config.task_names)
    optimizer, scheduler = build_optimizer(config.optimizer, model)
    take_steps(optimizer, scheduler, 3)
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    fresh_model = FakeRanker(config.task_names)
    fresh_optimizer, fresh_scheduler = build_optimizer(config.optimizer, fresh_model)
    fresh_scheduler.load_state_dict(state)
    assert [g["lr"] for g in fresh_optimizer.param_groups] == expected_rates(config, 3)
    take_steps(fresh_optimizer, fresh_scheduler, 2)
    assert [g["lr"] for g in fresh_optimizer.param_groups] == expected_rates(config, 5)
    assert fresh_scheduler.last_epoch == 5


def test_a_ramp_from_zero_leaves_the_first_step_without_effect():
    config = load_config(SMALL)  # every group ramps linearly from 0
    model = FakeRanker(config.task_names)
    optimizer, scheduler = build_optimizer(config.optimizer, model)
    before = [p.detach().clone() for p in model.parameters()]

    def step() -> None:
        model.backbone(torch.randn(5, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    step()
    assert not torch.equal(before[2], model.backbone.weight)
