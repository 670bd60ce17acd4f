"""MLP: Linear layers, each hidden layer followed by optional BatchNorm1d, ReLU and optional Dropout."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config.model import MlpConfig
from .linear import DEFAULT_MATMUL, Linear, Matmul


def init_linear(layer: nn.Linear) -> nn.Linear:
    """The reference initialisation of every dense layer: Xavier-uniform weights, zero biases."""
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class BatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d, but a training batch of fewer than two rows (ignore_data_errors can leave one) is
    normalised by the running statistics and leaves them as they are, as in evaluation: one row has no
    variance, and torch refuses it (a ValueError that ended the run), where the reference's TF layer makes
    each output its bias and pulls the moving variance towards 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:  # `training` first: an export traces no test of the batch size
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


class Mlp(nn.Module):
    """`layers` is a Sequential so a checkpoint names layers as the reference does (layers.0.weight,
    layers.1.running_mean, ...)."""

    def __init__(
        self,
        in_features: int,
        layer_sizes: Sequence[int],
        dropout_rates: Sequence[float | None],
        batch_norm_momentum: float | None = None,
        batch_norm_affine: bool = True,
        final_layer_activation: bool = False,
        *,
        matmul: Matmul = DEFAULT_MATMUL,
    ):
        super().__init__()
        if len(dropout_rates) != len(layer_sizes):
            raise ValueError(f"{len(layer_sizes)} layers but {len(dropout_rates)} dropout rates")
        modules: list[nn.Module] = []
        width = in_features
        for i, (size, rate) in enumerate(zip(layer_sizes, dropout_rates, strict=True)):
            modules.append(init_linear(Linear(width, size, matmul=matmul)))
            hidden = i < len(layer_sizes) - 1
            if hidden and batch_norm_momentum is not None:
                modules.append(BatchNorm1d(size, affine=batch_norm_affine, momentum=batch_norm_momentum))
            if hidden or final_layer_activation:
                modules.append(nn.ReLU())
            if rate:
                modules.append(nn.Dropout(rate))
            width = size
        self.layers = nn.Sequential(*modules)
        self.in_features = in_features
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def build_mlp(in_features: int, config: MlpConfig, *, matmul: Matmul = DEFAULT_MATMUL) -> Mlp:
    """`layer_sizes` with the MLP-wide dropout after each hidden layer, or `layers`, whose per-layer dropout
    replaces the MLP-wide one and, on the last layer, is applied after it too."""
    default = config.dropout.rate if config.dropout else None
    if config.layer_sizes is not None:
        sizes = list(config.layer_sizes)
        rates = [default] * (len(sizes) - 1) + [None]
    else:
        layers = config.layers or []
        sizes = [layer.layer_size for layer in layers]
        rates = [layer.dropout.rate if layer.dropout else default for layer in layers[:-1]]
        rates.append(layers[-1].dropout.rate if layers[-1].dropout else None)
    bn = config.batch_norm
    return Mlp(
        in_features,
        sizes,
        rates,
        batch_norm_momentum=bn.momentum if bn else None,
        batch_norm_affine=bn.affine if bn else True,
        final_layer_activation=config.final_layer_activation,
        matmul=matmul,
    )
