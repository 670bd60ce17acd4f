"""`export --precision fp32 | bf16 | int8`: which program each precision gets, per format, and why.

- int8: dynamic quantization of the dense layers' products (int8 weights per output channel, the
  activations quantized per call), by onnxruntime's quantize_dynamic on the ONNX program: its MatMulInteger
  kernels use VNNI where the CPU has it. ONNX only: torch's own dynamic quantization (torch.ao.quantization)
  is deprecated in this torch and its quantized Linear does not go through torch.export.
- bf16: the dense layers' weights stored in bf16 in the torch.export program and their products run in
  bf16, everything else (featurization, normalization, activations, each task's logit layer, calibration,
  the score) in fp32.
  pt2 only: onnxruntime's CPU provider has no bf16 MatMul (it refuses to load such a graph).
The quality each costs against fp32 is measured in docs/precision.md (bench/precision_quality.py).
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config.export import FORMATS, PRECISIONS, WHY_NOT
from ..cpu import bf16_warning, cpu_info
from ..errors import SettingError
from ..model.masknet import MaskBlock

log = logging.getLogger(__name__)

# The export's check of the program against the fp32 model (export._check_same): in fp32 the same
# arithmetic; in bf16 and int8 a bound that a broken program breaks and rounding does not (over the demo
# model's validation split their probabilities moved by at most 0.006 and 0.028; docs/precision.md).
CHECK_TOLERANCES = {"fp32": 1e-5, "bf16": 5e-2, "int8": 5e-2}


def warn_if_slow_here(precision: str) -> None:
    """Before a program of `precision` serves or predicts: one warning line per process where it is bf16 and
    this CPU's bf16 products are slower than fp32 ones (cpu.bf16_warning)."""
    if precision == "bf16":
        _warn_slow_bf16()


@functools.cache
def _warn_slow_bf16() -> None:
    if warning := bf16_warning(cpu_info(), "a bf16 model (export --precision bf16)"):
        log.warning(warning)


def check_precision(precision: str, format: str) -> None:
    if precision not in PRECISIONS:
        raise SettingError("precision", f"{precision}: not one of {', '.join(PRECISIONS)}")
    if format not in FORMATS[precision]:
        raise SettingError(
            "precision",
            f"{precision} with format {format}: {WHY_NOT[precision]}; "
            f"export {precision} with --format {FORMATS[precision][0]}",
        )


class Bf16Linear(nn.Module):
    """A dense layer with bf16 weights: its input cast to bf16, the product in bf16 (oneDNN's kernel), the
    output in fp32 so that normalization and activations stay in fp32; or left in bf16 (`keep_bf16`) where
    only a product reads it (see with_bf16_layers)."""

    def __init__(self, layer: nn.Linear, keep_bf16: bool = False):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().bfloat16(), requires_grad=False)
        bias = layer.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().bfloat16(), requires_grad=False)
        self.keep_bf16 = keep_bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x.to(torch.bfloat16), self.weight, self.bias)
        return out if self.keep_bf16 else out.float()


def with_bf16_layers(model: nn.Module) -> nn.Module:
    """A copy of `model` with each dense layer a Bf16Linear, except those of one output (each task's logit,
    the affine maps): a logit rounded to bf16 moves a rare task's probability by up to 2%.

    A MaskNet block's mask is read only by its gate, a product that the block then runs in bf16 (the mask's
    dtype) and hands to the hidden layer, which casts its input to bf16 anyway: so the mask stays bf16. On
    local_prod at 1,000 candidates, that saved a cast back to fp32, a product in fp32 and a cast to bf16 per
    block, 9% of the forward (bench/onnx_forward.py)."""
    copy = deepcopy(model)
    masks = {id(block.mask_layer[-1]) for block in copy.modules() if isinstance(block, MaskBlock)}
    for module in list(copy.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.out_features > 1:
                setattr(module, name, Bf16Linear(child, keep_bf16=id(child) in masks))
    return copy


class _PreprocessingAdvice(logging.Filter):
    """quantize_dynamic advises, on the root logger, to run onnxruntime's pre-processing first: that pass
    (shape inference, graph optimization) is for static quantization; the dynamic one gains nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextmanager
def _without_preprocessing_advice() -> Iterator[None]:
    advice = _PreprocessingAdvice()
    logging.getLogger().addFilter(advice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(advice)


def quantize_onnx(content: bytes) -> bytes:
    """The ONNX program with its dense layers' weights in int8 (per output channel) and their inputs
    quantized dynamically (uint8, per call). Only products by a 2-D weight: the score's product by the
    engagement weights (a vector) stays fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load_from_string(content)
    shapes = {init.name: len(init.dims) for init in model.graph.initializer}
    dense = {"MatMul", "Gemm"}
    exclude = [n.name for n in model.graph.node if n.op_type in dense and shapes.get(n.input[1]) != 2]
    with tempfile.TemporaryDirectory(prefix="heavyranker_int8_") as folder, _without_preprocessing_advice():
        fp32, int8 = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        fp32.write_bytes(content)
        quantize_dynamic(
            fp32,
            int8,
            op_types_to_quantize=sorted(dense),
            nodes_to_exclude=exclude,
            per_channel=True,
            weight_type=QuantType.QInt8,
        )
        return int8.read_bytes()
