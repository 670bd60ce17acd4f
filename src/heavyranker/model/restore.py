"""A model's weights from a checkpoint: the one way every command (train's resume and warm start, evaluate,
compare, export) puts a checkpoint's weights into the model it built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoint import load_checkpoint, load_model_weights
from ..errors import DataError, UserError
from .id_managed import ManagedMapping
from .managed_state import complete_first_layout


def restore_weights(model: nn.Module, checkpoint: str | Path, *, misfit_hint: str = "") -> dict[str, Any]:
    """Loads `checkpoint` (a step_<N>.pt file, as resolve_checkpoint finds it) and copies its model weights
    into `model`, every name and shape checked; returns the checkpoint's whole state (its step, and the
    optimizer's for a resume). Each problem is a UserError naming the file: unreadable, no model weights,
    weights that do not fit the model (followed by `misfit_hint`, where given: what to do about it), or a
    damaged buffer (a DataError)."""
    state = load_checkpoint(checkpoint)
    if "model" not in state:
        raise UserError(f"{checkpoint}: no 'model' weights in this checkpoint")
    for name, module in model.named_modules():  # the name check below would refuse what they lack
        if isinstance(module, ManagedMapping):
            complete_first_layout(module, state["model"], f"{name}." if name else "")
    try:
        load_model_weights(model, state["model"], str(checkpoint))
    except DataError as e:  # a damaged buffer, found by the module's own checks as it loads
        raise DataError(f"{checkpoint}: {e}") from None
    except UserError as e:
        if not misfit_hint:
            raise
        raise UserError(f"{e} ({misfit_hint})") from None
    return state
