"""The id embedding tables' own optimizer (optimizer.embedding): torch's Adagrad, SGD or Adam, or a
row-wise Adagrad, at a constant rate of its own, apart from the dense parameters' Adam."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config.optimizer import OptimizerConfig, TableOptimizerType


@dataclass(frozen=True)
class ColumnSplit:
    """A table whose columns are split over the ranks (torchrec's column-wise plan, train/sharding.py): its
    whole size. Each rank's parameter holds all its rows and some of its columns, or nothing."""

    rows: int
    columns: int


class RowWiseAdagrad(torch.optim.Optimizer):
    """Adagrad with one accumulator per row: sum += mean(g_row ** 2), row -= lr * g_row / (sqrt(sum) + eps).
    torchrec's fused EXACT_ROWWISE_ADAGRAD (the reference's table optimizer) as plain torch: torch has no
    row-wise Adagrad, and fbgemm's fused kernel would tie the tables to its TBE modules. Rows without a
    gradient in a step (ids not looked up) are left alone, weight decay included, as in torchrec."""

    def __init__(
        self,
        params: list[nn.Parameter],
        lr: float,
        weight_decay: float,
        eps: float,
        splits: dict[nn.Parameter, ColumnSplit] | None = None,
    ):
        """`splits`: the parameters that are a rank's columns of a table (train/sharding.py); their rows'
        statistics are summed over every rank, so that a row's mean is over all its columns, as in one
        process. Every rank steps them, in the same order (collectives)."""
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "eps": eps})
        self.splits = splits or {}

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            for weight in group["params"]:
                split = self.splits.get(weight)
                if split is not None:
                    self._step_columns(weight, group, split)
                elif weight.grad is not None and weight.numel() > 0:  # none: a table of another rank
                    rows = (weight.grad != 0).any(dim=1).nonzero().squeeze(1)  # the rows looked up
                    grad = self._decayed(weight, rows, group)
                    self._update(weight, rows, grad, grad.square().mean(dim=1), group)

    def _step_columns(self, weight: nn.Parameter, group: dict, split: ColumnSplit) -> None:
        """A rank's columns of a table: the rows looked up on any rank, and each row's mean of g^2 over
        all the table's columns (sums of each rank's columns, all-reduced)."""
        held = weight.grad is not None and weight.numel() > 0
        looked = torch.zeros(split.rows, device=weight.device)
        if held:
            looked += (weight.grad != 0).any(dim=1)
        dist.all_reduce(looked)
        rows = looked.nonzero().squeeze(1)
        squares = torch.zeros(split.rows, dtype=weight.dtype, device=weight.device)
        if held:
            grad = self._decayed(weight, rows, group)
            squares[rows] = grad.square().sum(dim=1)
        dist.all_reduce(squares)
        if held:
            self._update(weight, rows, grad, squares[rows] / split.columns, group)

    @staticmethod
    def _decayed(weight: nn.Parameter, rows: torch.Tensor, group: dict) -> torch.Tensor:
        grad = weight.grad[rows]
        return grad + group["weight_decay"] * weight[rows] if group["weight_decay"] else grad

    def _update(
        self,
        weight: nn.Parameter,
        rows: torch.Tensor,
        grad: torch.Tensor,
        mean_square: torch.Tensor,
        group: dict,
    ) -> None:
        state = self.state[weight]
        if "sum" not in state:
            state["sum"] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        state["sum"][rows] += mean_square
        step = group["lr"] * grad / (state["sum"][rows].sqrt() + group["eps"]).unsqueeze(1)
        weight.index_add_(0, rows, -step)


def build_table_optimizer(
    config: OptimizerConfig,
    tables: list[nn.Parameter],
    splits: dict[nn.Parameter, ColumnSplit] | None = None,
) -> torch.optim.Optimizer | None:
    """The optimizer optimizer.embedding names over the tables' weights; None when it is not set (the
    tables then train in the dense Adam's backbone group, as before it existed) or there are no tables.
    `splits`: the tables whose columns are split over the ranks (RowWiseAdagrad's; the other optimizers'
    state is per element, the same on any split)."""
    table = config.embedding
    if table is None or not tables:
        return None
    lr, decay, eps = table.learning_rate, table.weight_decay, table.epsilon
    match table.type:
        case TableOptimizerType.ROWWISE_ADAGRAD:
            return RowWiseAdagrad(tables, lr, decay, eps, splits)
        case TableOptimizerType.ADAGRAD:
            return torch.optim.Adagrad(tables, lr=lr, weight_decay=decay, eps=eps)
        case TableOptimizerType.SGD:
            return torch.optim.SGD(tables, lr=lr, weight_decay=decay)
        case TableOptimizerType.ADAM:
            adam = config.adam
            betas = (adam.beta_1, adam.beta_2)
            return torch.optim.Adam(tables, lr=lr, betas=betas, eps=eps, weight_decay=decay)
