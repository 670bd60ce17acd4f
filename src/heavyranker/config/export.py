"""Which program format runs which precision of an export: the rule `export --precision` and
`training.promote.precision` both follow (serve/precision.py says why each precision has its formats)."""

from __future__ import annotations

PRECISIONS = ("fp32", "bf16", "int8")
TABLE_PRECISIONS = ("fp32", "int8")
FORMATS = {"fp32": ("onnx", "pt2"), "bf16": ("pt2",), "int8": ("onnx",)}
WHY_NOT = {
    "bf16": "onnxruntime's CPU provider has no bf16 MatMul",
    "int8": "torch's dynamic quantization (torch.ao) is deprecated and does not go through torch.export",
}
