"""MaskNet (Wang et al. 2021, arXiv:2102.07619): blocks that gate their input with an instance-guided mask."""

from __future__ import annotations

import torch
from torch import nn

from ..config.model import MaskNetConfig
from ..errors import UserError
from .linear import DEFAULT_MATMUL, Linear, Matmul
from .mlp import Mlp, build_mlp, init_linear


class MaskBlock(nn.Module):
    """LayerNorm(hidden_layer(x * mask_layer(mask_input))), mask_layer = Linear -> ReLU -> Linear,
    with an optional LayerNorm on x first."""

    def __init__(
        self,
        in_features: int,
        mask_in_features: int,
        output_size: int,
        aggregation_size: int,
        input_layer_norm: bool,
        *,
        matmul: Matmul = DEFAULT_MATMUL,
    ):
        super().__init__()
        self.input_layer_norm = nn.LayerNorm(in_features) if input_layer_norm else None
        self.mask_layer = nn.Sequential(
            init_linear(Linear(mask_in_features, aggregation_size, matmul=matmul)),
            nn.ReLU(),
            init_linear(Linear(aggregation_size, in_features, matmul=matmul)),
        )
        self.hidden_layer = init_linear(Linear(in_features, output_size, matmul=matmul))
        self.layer_norm = nn.LayerNorm(output_size)
        self.out_features = output_size

    def forward(self, x: torch.Tensor, mask_input: torch.Tensor) -> torch.Tensor:
        if self.input_layer_norm is not None:
            x = self.input_layer_norm(x)
        mask = self.mask_layer(mask_input)
        if mask.dtype != x.dtype:
            # bf16 autocast (training.precision: bf16): the mask comes out of its product in bf16 while x is
            # fp32 (a LayerNorm's or the input's). Gating in bf16 hands the hidden layer the bf16 input it
            # casts to anyway; an fp32 x would make a mixed-dtype product (3-4x slower than bf16's, forward
            # and backward) and then that cast (bench/model_step.py --precision bf16).
            x = x.to(mask.dtype)
        return self.layer_norm(self.hidden_layer(x * mask))


class MaskNet(nn.Module):
    """Parallel: every block reads the input as x and mask input; their outputs are concatenated.
    Stacked: block k reads block k-1's output as x and always the original input as mask input.
    An optional MLP reads the result."""

    def __init__(self, blocks: list[MaskBlock], use_parallel: bool, mlp: Mlp | None = None):
        super().__init__()
        self.mask_blocks = nn.ModuleList(blocks)
        self.use_parallel = use_parallel
        self.mlp = mlp
        blocks_out = sum(b.out_features for b in blocks) if use_parallel else blocks[-1].out_features
        self.out_features = mlp.out_features if mlp is not None else blocks_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_parallel:
            net = torch.cat([block(x, x) for block in self.mask_blocks], dim=1)
        else:
            net = x
            for block in self.mask_blocks:
                net = block(net, x)
        return self.mlp(net) if self.mlp is not None else net


def build_mask_net(
    in_features: int, config: MaskNetConfig, where: str, *, matmul: Matmul = DEFAULT_MATMUL
) -> MaskNet:
    """`where` is the config path of `config`, for errors."""
    blocks = []
    width = in_features
    for i, block in enumerate(config.mask_blocks):
        aggregation = block.aggregation_size or int(in_features * block.reduction_factor)
        if aggregation < 1:
            raise UserError(
                f"{where}.mask_blocks[{i}].reduction_factor: {block.reduction_factor} x {in_features} inputs "
                "leaves no aggregation units; raise it or set aggregation_size"
            )
        blocks.append(
            MaskBlock(
                width, in_features, block.output_size, aggregation, block.input_layer_norm, matmul=matmul
            )
        )
        if not config.use_parallel:
            width = block.output_size
    blocks_out = sum(b.out_features for b in blocks) if config.use_parallel else width
    mlp = build_mlp(blocks_out, config.mlp, matmul=matmul) if config.mlp else None
    return MaskNet(blocks, config.use_parallel, mlp)
