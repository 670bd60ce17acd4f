"""DCN v2 (Wang et al. 2021, arXiv:2008.13535): cross layers x_{l+1} = x0 * (W x_l + b) + x_l."""

from __future__ import annotations

import torch
from torch import nn

from ..config.model import DcnConfig
from .linear import DEFAULT_MATMUL, Linear, Matmul
from .mlp import Mlp, build_mlp, init_linear


class CrossLayer(nn.Module):
    """W is a full matrix, or U V through projection_dim (V without bias: one bias, as in W x + b)."""

    def __init__(
        self, in_features: int, projection_dim: int | None = None, *, matmul: Matmul = DEFAULT_MATMUL
    ):
        super().__init__()
        if projection_dim is None:
            self.linear = init_linear(Linear(in_features, in_features, matmul=matmul))
        else:
            self.linear = nn.Sequential(
                init_linear(Linear(in_features, projection_dim, bias=False, matmul=matmul)),
                init_linear(Linear(projection_dim, in_features, matmul=matmul)),
            )

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class Dcn(nn.Module):
    """Cross layers and an optional MLP, side by side on the input (parallel: outputs concatenated) or the MLP
    on the cross layers' output (stacked); then an optional output MLP."""

    def __init__(
        self,
        in_features: int,
        cross_layers: list[CrossLayer],
        parallel_mlp: Mlp | None = None,
        use_parallel: bool = True,
        output_mlp: Mlp | None = None,
    ):
        super().__init__()
        self.cross_layers = nn.ModuleList(cross_layers)
        self.parallel_mlp = parallel_mlp
        self.use_parallel = use_parallel
        self.output_mlp = output_mlp
        self.out_features = (
            output_mlp.out_features
            if output_mlp is not None
            else dcn_width(in_features, parallel_mlp, use_parallel)
        )

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.cross_layers:
            x = layer(x0, x)
        if self.parallel_mlp is not None:
            x = torch.cat([x, self.parallel_mlp(x0)], dim=1) if self.use_parallel else self.parallel_mlp(x)
        return self.output_mlp(x) if self.output_mlp is not None else x


def dcn_width(in_features: int, parallel_mlp: Mlp | None, use_parallel: bool) -> int:
    """Width after the cross layers and the parallel MLP, before the output MLP."""
    if parallel_mlp is None:
        return in_features
    return in_features + parallel_mlp.out_features if use_parallel else parallel_mlp.out_features


def build_dcn(in_features: int, config: DcnConfig, *, matmul: Matmul = DEFAULT_MATMUL) -> Dcn:
    cross = [CrossLayer(in_features, config.projection_dim, matmul=matmul) for _ in range(config.poly_degree)]
    mlp = build_mlp(in_features, config.parallel_mlp, matmul=matmul) if config.parallel_mlp else None
    width = dcn_width(in_features, mlp, config.use_parallel)
    output_mlp = build_mlp(width, config.output_mlp, matmul=matmul) if config.output_mlp else None
    return Dcn(in_features, cross, mlp, config.use_parallel, output_mlp)
