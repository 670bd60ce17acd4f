"""MLP: Linear layers, each hidden layer followed by optional BatchNorm1d, ReLU and optional Dropout."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config.model import MlpConfig


def init_linear(layer: nn.Linear) -> nn.Linear:
    """The reference initialisation of every dense layer: Xavier-uniform weights, zero biases."""
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


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
    ):
        super().__init__()
        if len(dropout_rates) != len(layer_sizes):
            raise ValueError(f"{len(layer_sizes)} layers but {len(dropout_rates)} dropout rates")
        modules: list[nn.Module] = []
        width = in_features
        for i, (size, rate) in enumerate(zip(layer_sizes, dropout_rates, strict=True)):
            modules.append(init_linear(nn.Linear(width, size)))
            hidden = i < len(layer_sizes) - 1
            if hidden and batch_norm_momentum is not None:
                modules.append(nn.BatchNorm1d(size, affine=batch_norm_affine, momentum=batch_norm_momentum))
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


def build_mlp(in_features: int, config: MlpConfig) -> Mlp:
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
    )


@dataclass
class _Layer:
    """One Linear of an Mlp and what follows it."""

    linear: nn.Linear
    batch_norm: nn.BatchNorm1d | None
    relu: bool
    dropout: float


def _layers(mlp: Mlp) -> list[_Layer]:
    out: list[_Layer] = []
    for module in mlp.layers:
        if isinstance(module, nn.Linear):
            out.append(_Layer(module, None, False, 0.0))
        elif isinstance(module, nn.BatchNorm1d):
            out[-1].batch_norm = module
        elif isinstance(module, nn.ReLU):
            out[-1].relu = True
        else:
            out[-1].dropout = module.p
    return out


def _signature(layer: _Layer) -> tuple:
    bn = layer.batch_norm
    bn_sig = None if bn is None else (bn.affine, bn.momentum, bn.eps)
    return layer.linear.in_features, layer.linear.out_features, bn_sig, layer.relu


class StackedMlps(nn.Module):
    """Same-shaped Mlps on one input, computed as one matmul for the first layers and batched matmuls for the
    rest: the same mathematics as running each, with far fewer and larger kernels. The Mlps keep their own
    parameters and buffers (per-tower optimizer groups and checkpoint names are unchanged); each forward
    stacks them (cheap next to the matmuls). Dropout rates may differ between the Mlps."""

    def __init__(self, mlps: list[Mlp]):
        super().__init__()
        if not can_stack(mlps):
            raise ValueError("the Mlps differ in shape, batch norm or activations")
        # A plain list: the Mlps are registered where they belong (e.g. the ranker's towers), not here.
        self.stack = [_layers(m) for m in mlps]
        self.dropout_rates = [[layers[i].dropout for layers in self.stack] for i in range(len(self.stack[0]))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in] -> [B, M, out] for M Mlps."""
        count = len(self.stack)
        h = x
        for i, layer in enumerate(self.stack[0]):
            linears = [layers[i].linear for layers in self.stack]
            weight = torch.stack([m.weight for m in linears])  # [M, out, in]
            bias = torch.stack([m.bias for m in linears])  # [M, out]
            if i == 0:  # one input for all: a single matmul against the concatenated weights
                h = F.linear(h, weight.flatten(0, 1), bias.flatten()).unflatten(1, (count, -1))
            else:
                h = torch.einsum("bmi,moi->bmo", h, weight) + bias
            if layer.batch_norm is not None:
                h = self._batch_norm(h, [layers[i].batch_norm for layers in self.stack])
            if layer.relu:
                h = torch.relu(h)
            if self.training and any(self.dropout_rates[i]):
                h = _dropout(h, torch.tensor(self.dropout_rates[i], dtype=h.dtype, device=h.device))
        return h

    def _batch_norm(self, h: torch.Tensor, norms: list[nn.BatchNorm1d]) -> torch.Tensor:
        """Per-feature statistics, so one batch norm over [B, M * out] is each Mlp's own."""
        first = norms[0]
        mean = torch.cat([n.running_mean for n in norms])
        var = torch.cat([n.running_var for n in norms])
        weight = torch.cat([n.weight for n in norms]) if first.affine else None
        bias = torch.cat([n.bias for n in norms]) if first.affine else None
        out = F.batch_norm(h.flatten(1), mean, var, weight, bias, self.training, first.momentum, first.eps)
        if self.training:
            with torch.no_grad():  # batch_norm updated the concatenated copies: hand each its slice back
                width = h.shape[-1]
                for k, norm in enumerate(norms):
                    norm.running_mean.copy_(mean[k * width : (k + 1) * width])
                    norm.running_var.copy_(var[k * width : (k + 1) * width])
                    norm.num_batches_tracked.add_(1)
        return out.view_as(h)


def _dropout(h: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
    """Dropout with rate rates[m] on h[:, m]: zero with that probability, scale the rest by 1 / (1 - rate)."""
    rates = rates.unsqueeze(1)  # [M, 1]
    keep = torch.rand_like(h) >= rates
    return h * keep / (1.0 - rates)


def can_stack(mlps: Sequence[nn.Module]) -> bool:
    """Whether StackedMlps can run these: all Mlps with the same layers, batch norms and activations."""
    if len(mlps) < 2 or not all(isinstance(m, Mlp) for m in mlps):
        return False
    signatures = [[_signature(layer) for layer in _layers(m)] for m in mlps]  # type: ignore[arg-type]
    return all(s == signatures[0] for s in signatures)
