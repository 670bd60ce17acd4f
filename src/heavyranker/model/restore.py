"""A model's weights from a checkpoint: the one way every command (train's resume and warm start, evaluate,
compare, export) puts a checkpoint's weights into the model it built."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import SHARDED_TABLES, TableShards, load_checkpoint, load_model_weights
from ..errors import DataError, UserError
from .id_managed import ManagedMapping
from .managed_state import complete_first_layout


def restore_weights(
    model: nn.Module,
    checkpoint: str | Path,
    *,
    misfit_hint: str = "",
    load: Callable[[dict[str, torch.Tensor], str, TableShards | None], None] | None = None,
    mapped: bool = False,
) -> dict[str, Any]:
    """Loads `checkpoint` (a step_<N>.pt file, as resolve_checkpoint finds it) and copies its model weights
    into `model`, every name and shape checked; returns the checkpoint's whole state (its step, and the
    optimizer's for a resume). Each problem is a UserError naming the file: unreadable, no model weights,
    weights that do not fit the model (followed by `misfit_hint`, where given: what to do about it), or a
    damaged buffer (a DataError). `load(weights, source, shards)` copies them (default: load_model_weights
    into `model`, a sharded checkpoint's tables assembled); the sharded path's (train/sharding.py) also puts
    the tables' weights into this rank's shards, from `weights` or, where the checkpoint's tables are
    sharded too, from their shard files (`shards`, else None).
    `mapped`: for the commands that need the weights only (checkpoint.load_checkpoint's `mapped`), whose
    memory then holds no copy of the optimizer's state: with Adam, 2 of a checkpoint's 3 copies of the
    parameters."""
    state = load_checkpoint(checkpoint, mapped=mapped, assemble=load is None)
    if "model" not in state:
        raise UserError(f"{checkpoint}: no 'model' weights in this checkpoint")
    weights = state["model"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise UserError(f"{checkpoint}: its 'model' is not a dict of tensors (damaged, or another program's)")
    for name, module in model.named_modules():  # the name check below would refuse what they lack
        if isinstance(module, ManagedMapping):
            complete_first_layout(module, weights, f"{name}." if name else "")
    try:
        _check_kinds(model, weights, str(checkpoint))
        if load is None:
            load_model_weights(model, weights, str(checkpoint))
        else:
            load(weights, str(checkpoint), state.get(SHARDED_TABLES))
    except DataError as e:  # a damaged buffer, found by the module's own checks as it loads
        raise DataError(f"{checkpoint}: {e}") from None
    except UserError as e:
        if not misfit_hint:
            raise
        raise UserError(f"{e} ({misfit_hint})") from None
    return state


def _check_kinds(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """A tensor of another kind (integer, float, bool) than the model's would be cast as it is copied: a
    float into an id buffer, silently rounded. Another float precision is cast as the fp32 model's."""
    own = model.state_dict()
    for name, tensor in weights.items():
        if name in own and _kind(tensor.dtype) != _kind(own[name].dtype):
            raise UserError(
                f"{source} does not fit this model: {name}: dtype {tensor.dtype} in the checkpoint, "
                f"{own[name].dtype} in the model"
            )


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "float" if dtype.is_floating_point else "complex" if dtype.is_complex else "integer"
