"""Mixtures of experts between the input and the towers: MMoE (Ma et al., KDD 2018) and PLE (Tang et al.,
RecSys 2020). Each task's tower reads its own softmax-weighted sum of expert outputs, so tasks that pull the
shared layers apart can lean on different experts.

Both are stacks of extraction levels. A level has `k` experts per task and `s` shared experts; task t's gate
(on task t's input to the level) weighs task t's experts and the shared ones; a shared gate (on the shared
input, every level but the last) weighs all experts and feeds the next level's shared experts. At the first
level every input is the model's input. MMoE is one level with no task experts: every task's gate weighs the
same `num_experts` shared experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..config.model import ArchitectureConfig, ExpertsConfig, MultiTaskType
from .dlrm import Slice
from .linear import DEFAULT_MATMUL, Linear, Matmul
from .mlp import build_mlp, init_linear

WHERE = "model.experts.expert"  # the config path of every expert, for errors
# Builds one architecture: (config, in_features, embedding vector slices of its input, config path).
BuildArchitecture = Callable[[ArchitectureConfig, int, list[Slice], str], nn.Module]


class Gate(nn.Module):
    """softmax(Linear(hidden(x))): [B, experts] weights, each row summing to 1."""

    def __init__(self, hidden: nn.Module | None, in_features: int, num_experts: int, matmul: Matmul):
        super().__init__()
        self.hidden = hidden
        self.linear = init_linear(Linear(in_features, num_experts, matmul=matmul))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hidden is not None:
            x = self.hidden(x)
        return torch.softmax(self.linear(x), dim=-1)


def mix(weights: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
    """sum_i weights[:, i] * outputs[i]: [B, n] weights over n [B, d] outputs -> [B, d]."""
    return (weights.unsqueeze(-1) * torch.stack(outputs, dim=1)).sum(dim=1)


class ExtractionLevel(nn.Module):
    """One level: per-task experts, shared experts, a gate per task and optionally the shared gate. Tasks
    are keyed by their towers' module names, in task order."""

    def __init__(
        self,
        task_experts: dict[str, list[nn.Module]],
        shared_experts: list[nn.Module],
        task_gates: dict[str, Gate],
        shared_gate: Gate | None,
    ):
        super().__init__()
        self.task_experts = nn.ModuleDict({task: nn.ModuleList(e) for task, e in task_experts.items()})
        self.shared_experts = nn.ModuleList(shared_experts)
        self.task_gates = nn.ModuleDict(task_gates)
        self.shared_gate = shared_gate

    def forward(
        self, task_inputs: list[torch.Tensor], shared_input: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each task's mix, and the shared mix (the shared input itself at the last level)."""
        shared = [expert(shared_input) for expert in self.shared_experts]
        own = [
            [expert(x) for expert in experts]
            for experts, x in zip(self.task_experts.values(), task_inputs, strict=True)
        ]
        mixed = [
            mix(gate(x), outputs + shared)
            for gate, outputs, x in zip(self.task_gates.values(), own, task_inputs, strict=True)
        ]
        if self.shared_gate is None:
            return mixed, shared_input
        everything = [output for outputs in own for output in outputs] + shared
        return mixed, mix(self.shared_gate(shared_input), everything)


class Experts(nn.Module):
    """forward(x [B, in]) -> one [B, out_features] tower input per task, in task order."""

    def __init__(self, levels: list[ExtractionLevel], num_tasks: int, out_features: int):
        super().__init__()
        self.levels = nn.ModuleList(levels)
        self.num_tasks = num_tasks
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        task_inputs, shared = [x] * self.num_tasks, x
        for level in self.levels:
            task_inputs, shared = level(task_inputs, shared)
        return task_inputs


def build_experts(
    kind: MultiTaskType,
    config: ExpertsConfig,
    tasks: list[str],
    in_features: int,
    vectors: list[Slice],
    build: BuildArchitecture,
    *,
    matmul: Matmul = DEFAULT_MATMUL,
) -> Experts:
    """The experts of `config` for `kind` (mmoe or ple) over an input of `in_features` whose embedding
    vectors (for DLRM experts) are `vectors`, for `tasks` (the towers' module names, in order). `build` makes
    each expert from config.expert."""
    if kind == MultiTaskType.MMOE:
        per_task, shared, num_levels = 0, config.num_experts, 1
    else:
        per_task, shared, num_levels = config.num_experts, config.num_shared_experts, config.num_levels
    width = in_features
    levels = []
    for level in range(num_levels):
        task_experts = {
            task: [build(config.expert, width, vectors, WHERE) for _ in range(per_task)] for task in tasks
        }
        shared_experts = [build(config.expert, width, vectors, WHERE) for _ in range(shared)]
        task_gates = {task: _gate(config, width, per_task + shared, matmul) for task in tasks}
        last = level == num_levels - 1
        shared_gate = None if last else _gate(config, width, len(tasks) * per_task + shared, matmul)
        levels.append(ExtractionLevel(task_experts, shared_experts, task_gates, shared_gate))
        # Every expert has config.expert's architecture, so one width; a deeper level reads mixes of their
        # outputs, which hold no embedding vectors.
        width, vectors = shared_experts[0].out_features, []
    return Experts(levels, len(tasks), width)


def _gate(config: ExpertsConfig, in_features: int, num_experts: int, matmul: Matmul) -> Gate:
    hidden = build_mlp(in_features, config.gate_mlp, matmul=matmul) if config.gate_mlp else None
    return Gate(hidden, hidden.out_features if hidden else in_features, num_experts, matmul)
