"""`export --table-precision fp32 | int8`: the id embedding tables' rows stored in 8 bits in the exported
program, dequantized at lookup.

int8 is FBGEMM's row-wise 8-bit layout (torchrec's quantized embedding tables use it): each row x of D values
becomes D codes q in 0..255 and a scale s and a bias b in fp16, x ~ s q + b. b is min(x) rounded down to
fp16 and s is (max(x) - b) / 255 rounded up to fp16, so the codes span the row and every value is within
s / 2 of its dequantized value (a bias, not only a scale: a row's values are not centred on 0). A row takes
D + 4 bytes instead of 4 D: 0.31 of fp32 at D = 16, 0.27 at D = 64. The program gathers the codes, scale
and bias of the rows it looks up and dequantizes only those, so a served table stays 8-bit in memory.

Which tables: those of model.large_embeddings and model.small_embeddings (the id tables, whatever their
id_mapping); the position embedding (a few rows) stays fp32. Independent of --precision, which is the dense
layers'. The quality it costs is measured in docs/id-embeddings.md.
"""

from __future__ import annotations

from copy import deepcopy

import torch
from torch import nn

from ..config.export import TABLE_PRECISIONS
from ..errors import SettingError, UserError
from ..model import Ranker

CODES = 255  # the largest code: 8 bits
FP16_MAX = float(torch.finfo(torch.float16).max)


def check_table_precision(table_precision: str) -> None:
    if table_precision not in TABLE_PRECISIONS:
        raise SettingError("table_precision", f"{table_precision}: not one of {', '.join(TABLE_PRECISIONS)}")


def quantize_rows(weight: torch.Tensor, table: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, D] fp32 -> codes [N, D] uint8 and scale_bias [N, 2] fp16 (the layout above). `table` names the
    table in the error for a row fp16 cannot hold."""
    rows = weight.detach().float()
    if not bool(torch.isfinite(rows).all()) or float(rows.abs().max()) >= FP16_MAX / 2:
        raise UserError(
            f"table {table}: a row holds a value that is not finite or beyond {FP16_MAX / 2:g}, which the "
            "int8 tables' fp16 scale and bias cannot hold: export with --table-precision fp32"
        )
    low, high = rows.min(dim=1).values, rows.max(dim=1).values
    bias = _fp16_at_most(low)
    scale = _fp16_at_least((high - bias.float()) / CODES)
    step = torch.where(scale > 0, scale.float(), 1.0)  # a constant row: every code 0, the bias is the row
    codes = torch.round((rows - bias.float()[:, None]) / step[:, None]).clamp(0, CODES).to(torch.uint8)
    return codes, torch.stack([scale, bias], dim=1)


def _fp16_at_most(x: torch.Tensor) -> torch.Tensor:
    rounded = x.half()
    return torch.where(
        rounded.float() > x, torch.nextafter(rounded, torch.tensor(-torch.inf).half()), rounded
    )


def _fp16_at_least(x: torch.Tensor) -> torch.Tensor:
    rounded = x.half()
    return torch.where(rounded.float() < x, torch.nextafter(rounded, torch.tensor(torch.inf).half()), rounded)


class Int8Rows(nn.Module):
    """A table of 8-bit rows: forward(rows [...]) -> the dequantized vectors [..., D] in fp32, as
    nn.Embedding would give them. Two gathers, a cast and a multiply-add: torch.export and ONNX trace them."""

    def __init__(self, weight: torch.Tensor, table: str):
        super().__init__()
        codes, scale_bias = quantize_rows(weight, table)
        self.register_buffer("codes", codes)
        self.register_buffer("scale_bias", scale_bias)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        scale_bias = self.scale_bias[rows].float()
        return self.codes[rows].float() * scale_bias[..., :1] + scale_bias[..., 1:]

    def dequantized(self) -> torch.Tensor:
        """[N, D]: every row as the program sees it."""
        return self(torch.arange(self.codes.shape[0]))


def with_int8_tables(model: Ranker) -> Ranker:
    """A copy of `model` whose id tables (large and small) are Int8Rows."""
    copy = deepcopy(model)
    tables = {**copy.large_embeddings, **copy.small_embeddings}
    for name, table in tables.items():
        table.embedding = Int8Rows(table.embedding.weight, name)
    return copy


def table_bytes(model: Ranker) -> int:
    """Bytes of the id tables' rows (with the int8 tables' scales and biases)."""
    tables = [*model.large_embeddings.values(), *model.small_embeddings.values()]
    return sum(t.nbytes for table in tables for t in table.embedding.state_dict().values())
