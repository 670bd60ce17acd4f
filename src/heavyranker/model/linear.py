"""nn.Linear whose products run on oneDNN on CPU.

Why: torch sends an fp32 matmul to MKL. On the AMD EPYC (Zen 4) machines this project is measured on,
oneDNN, which torch ships for its CPU kernels, is the faster of the two on the 128-row products of a
training step: one product at a time, MKL ran them at 0.65-1.05 of its own large-matmul rate and oneDNN at
0.91-1.18 of it, and the local_prod training step took 249-261 ms on oneDNN against 285-325 ms on MKL,
measured side by side (bench/model_step.py). On Intel CPUs MKL is the faster by 5-7%, so the default
kernel follows the CPU (cpu.preferred_matmul; DEFAULT_MATMUL). The arithmetic is the same: fp32 products
accumulated in fp32, in another order.

Parameters, their names and initialisation are nn.Linear's, so checkpoints do not change. Small layers
(see MIN_WEIGHTS), what oneDNN's linear kernel does not take (another device or dtype, other than 2-D
input, an empty batch), and tracing by torch.export or torch.compile go through F.linear: an exported
program holds plain aten.linear nodes. A layer built with matmul="aten" always does: for comparison, or
where oneDNN misbehaves.

Under CPU autocast to bfloat16 (training.precision: bf16) the product runs on oneDNN's bf16 kernel too:
input, weight and bias cast to bf16 inside the layer, the output left in bf16 for the next layer (whose cast
of it is then a no-op), the weight's gradient returned in fp32. Autocast's own path (aten.linear) makes the
same casts, through extra autograd nodes, and sends the product to the same oneDNN kernel through addmm.
"""

from __future__ import annotations

from typing import Final

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable

from ..config.base import MAX_WIDTH
from ..cpu import Matmul, cpu_info, preferred_matmul
from ..errors import UserError

# The kernel is an internal torch op: a torch without it builds every layer on aten.
HAS_ONEDNN: Final = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def matmul_for(precision: str) -> Matmul:
    """The kernel this CPU runs `precision` ("fp32" or "bf16") products faster on (cpu.preferred_matmul)."""
    return preferred_matmul(cpu_info(), precision) if HAS_ONEDNN else "aten"


DEFAULT_MATMUL: Final[Matmul] = matmul_for("fp32")
# Below this many weights a layer stays on F.linear: a oneDNN call costs about 15 us more than an aten one,
# and a training step makes three per layer. Measured (forward + backward at batch 128): 256x128 379 us on
# oneDNN against 268 us, 512x256 break-even, 2048x256 3.1 ms against 4.0 ms.
MIN_WEIGHTS = 1 << 17
# The most weights a dense layer holds: one between two of the widest layers a config may name (2**30, 4 GiB
# of float32). Widths that come from elsewhere (the input's, from the schema and piecewise_linear's bins; a
# MaskNet's aggregation, from reduction_factor) are held to it too: a build never allocates without bound.
MAX_LAYER_WEIGHTS = MAX_WIDTH**2


class LayerTooLarge(UserError):
    """A dense layer over MAX_LAYER_WEIGHTS; the builder that knows its config path adds it."""


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias on oneDNN; x and weight may be strided views (transposes included)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """The product in `dtype` (fp32, or bf16 under autocast); gradients in the dtypes of x and weight."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        ctx.x_dtype = x.dtype
        x, weight = x.to(dtype), weight.to(dtype)  # no-ops in fp32
        ctx.save_for_backward(x, weight)
        return onednn_linear(x, weight, None if bias is None else bias.to(dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_linear(grad, weight.t(), None).to(ctx.x_dtype)  # grad @ weight
        if ctx.needs_input_grad[1]:
            # grad.T @ x, laid out as weight; the fp32 weight takes an fp32 gradient
            grad_weight = onednn_linear(grad.t(), x.t(), None).float()
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0, dtype=torch.float32)
        return grad_x, grad_weight, grad_bias, None


def _product_dtype() -> torch.dtype:
    """bf16 under CPU autocast to bf16 (what autocast would make of F.linear), else fp32."""
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


def _on_onednn(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> bool:
    return (
        weight.numel() >= MIN_WEIGHTS
        and x.dim() == 2
        and x.shape[0] > 0  # oneDNN has no primitive for an empty batch
        and x.device.type == "cpu"
        and weight.dtype == torch.float32
        and x.dtype in (torch.float32, dtype)  # a bf16 x only under autocast, as F.linear takes it
        and not torch.compiler.is_compiling()  # also true while torch.export traces
    )


class Linear(nn.Linear):
    """nn.Linear, with the product on oneDNN where it applies if `matmul` is "onednn" (see the module's
    docstring); on aten's F.linear always if "aten"."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, matmul: Matmul = DEFAULT_MATMUL
    ):
        if in_features * out_features > MAX_LAYER_WEIGHTS:
            raise LayerTooLarge(
                f"a dense layer of {in_features:,} inputs x {out_features:,} units would hold "
                f"{in_features * out_features:,} weights, over 2**30 (4 GiB of float32): narrow one of them"
            )
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
        dtype = _product_dtype()
        if self.matmul == "aten" or not _on_onednn(x, self.weight, dtype):
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled():
            return _OneDnnLinear.apply(x, self.weight, self.bias, dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return onednn_linear(x.to(dtype), self.weight.to(dtype), bias)
