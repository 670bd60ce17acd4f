"""The id embedding tables' own optimizer (optimizer.embedding): torch's Adagrad, SGD or Adam, or a
row-wise Adagrad, at a constant rate of its own, apart from the dense parameters' Adam."""

from __future__ import annotations

import torch
from torch import nn

from ..config.optimizer import OptimizerConfig, TableOptimizerType


class RowWiseAdagrad(torch.optim.Optimizer):
    """Adagrad with one accumulator per row: sum += mean(g_row ** 2), row -= lr * g_row / (sqrt(sum) + eps).
    torchrec's fused EXACT_ROWWISE_ADAGRAD (the reference's table optimizer) as plain torch: torch has no
    row-wise Adagrad, and fbgemm's fused kernel would tie the tables to its TBE modules. Rows without a
    gradient in a step (ids not looked up) are left alone, weight decay included, as in torchrec."""

    def __init__(self, params: list[nn.Parameter], lr: float, weight_decay: float, eps: float):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "eps": eps})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            for weight in group["params"]:
                if weight.grad is None:
                    continue
                rows = (weight.grad != 0).any(dim=1).nonzero().squeeze(1)  # the rows looked up
                grad = weight.grad[rows]
                if group["weight_decay"]:
                    grad = grad + group["weight_decay"] * weight[rows]
                state = self.state[weight]
                if "sum" not in state:
                    state["sum"] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
                state["sum"][rows] += grad.square().mean(dim=1)
                step = group["lr"] * grad / (state["sum"][rows].sqrt() + group["eps"]).unsqueeze(1)
                weight.index_add_(0, rows, -step)


def build_table_optimizer(
    config: OptimizerConfig, tables: list[nn.Parameter]
) -> torch.optim.Optimizer | None:
    """The optimizer optimizer.embedding names over the tables' weights; None when it is not set (the
    tables then train in the dense Adam's backbone group, as before it existed) or there are no tables."""
    table = config.embedding
    if table is None or not tables:
        return None
    lr, decay, eps = table.learning_rate, table.weight_decay, table.epsilon
    match table.type:
        case TableOptimizerType.ROWWISE_ADAGRAD:
            return RowWiseAdagrad(tables, lr, decay, eps)
        case TableOptimizerType.ADAGRAD:
            return torch.optim.Adagrad(tables, lr=lr, weight_decay=decay, eps=eps)
        case TableOptimizerType.SGD:
            return torch.optim.SGD(tables, lr=lr, weight_decay=decay)
        case TableOptimizerType.ADAM:
            adam = config.adam
            betas = (adam.beta_1, adam.beta_2)
            return torch.optim.Adam(tables, lr=lr, betas=betas, eps=eps, weight_decay=decay)
