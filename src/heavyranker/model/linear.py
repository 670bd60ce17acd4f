"""nn.Linear whose products run on oneDNN on CPU.

Why: torch sends an fp32 matmul to MKL. On the AMD EPYC (Zen 4) machines this project is measured on,
oneDNN, which torch ships for its CPU kernels, is the faster of the two on the 128-row products of a
training step: one product at a time, MKL ran them at 0.65-1.05 of its own large-matmul rate and oneDNN at
0.91-1.18 of it, and the local_prod training step took 249-261 ms on oneDNN against 285-325 ms on MKL,
measured side by side (bench/model_step.py). The arithmetic is the same: fp32 products accumulated in
fp32, in another order.

Parameters, their names and initialisation are nn.Linear's, so checkpoints do not change. Small layers
(see MIN_WEIGHTS), what oneDNN's linear kernel does not take (another device or dtype, other than 2-D
input, an empty batch, CPU autocast), and tracing by torch.export or torch.compile go through F.linear:
an exported program holds plain aten.linear nodes. A layer built with matmul="aten" always does: for
comparison, or where oneDNN misbehaves.
"""

from __future__ import annotations

from typing import Final, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable

Matmul = Literal["onednn", "aten"]
# The kernel is an internal torch op: a torch without it builds every layer on aten.
HAS_ONEDNN: Final = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
DEFAULT_MATMUL: Final[Matmul] = "onednn" if HAS_ONEDNN else "aten"
# Below this many weights a layer stays on F.linear: a oneDNN call costs about 15 us more than an aten one,
# and a training step makes three per layer. Measured (forward + backward at batch 128): 256x128 379 us on
# oneDNN against 268 us, 512x256 break-even, 2048x256 3.1 ms against 4.0 ms.
MIN_WEIGHTS = 1 << 17


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias on oneDNN; x and weight may be strided views (transposes included)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return onednn_linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_linear(grad, weight.t(), None)  # grad @ weight
        if ctx.needs_input_grad[1]:
            grad_weight = onednn_linear(grad.t(), x.t(), None)  # grad.T @ x, laid out as weight
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias


def _on_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        weight.numel() >= MIN_WEIGHTS
        and x.dim() == 2
        and x.shape[0] > 0  # oneDNN has no primitive for an empty batch
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()  # also true while torch.export traces
    )


class Linear(nn.Linear):
    """nn.Linear, with the product on oneDNN where it applies if `matmul` is "onednn" (see the module's
    docstring); on aten's F.linear always if "aten"."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, matmul: Matmul = DEFAULT_MATMUL
    ):
        if matmul not in ("onednn", "aten"):
            raise ValueError(f'matmul must be "onednn" or "aten", not {matmul!r}')
        if matmul == "onednn" and not HAS_ONEDNN:
            # Asked for by name, not by default: falling back would run (or time) another kernel than asked.
            raise ValueError(
                f'matmul="onednn": torch {torch.__version__} has no oneDNN linear kernel '
                '(torch.ops.mkldnn._linear_pointwise); use matmul="aten"'
            )
        super().__init__(in_features, out_features, bias)
        self.matmul = matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matmul == "aten" or not _on_onednn(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled():
            return _OneDnnLinear.apply(x, self.weight, self.bias)
        return onednn_linear(x, self.weight, self.bias)
