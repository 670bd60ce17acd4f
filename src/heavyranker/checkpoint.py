"""Checkpoints that survive a kill: written with atomic_write (a temporary name, fsynced, renamed into place).

A checkpoint is one file `save_dir/checkpoints/step_<N>.pt`. A file of that name is complete by
construction (os.replace is atomic), so the newest one is always safe to resume from. With
training.keep_best, `best.json` beside them names the best one's step (and the state early stopping
resumes from); pruning keeps that checkpoint. Loading uses
`torch.load(weights_only=True)`: a checkpoint holds tensors and plain containers, never code."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_write
from .errors import UserError

_NAME = re.compile(r"^step_(\d+)\.pt$")
BEST = "best.json"


def checkpoint_dir(save_dir: str) -> Path:
    return Path(save_dir) / "checkpoints"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `folder`, oldest first (temporary files are not listed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / m.group(0)) for m in map(_NAME.match, os.listdir(folder)) if m]
    return sorted(found)


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def save_checkpoint(
    folder: str | Path,
    step: int,
    state: dict[str, Any],
    max_to_keep: int | None = None,
    keep: int | None = None,
) -> Path:
    """Write `state` as folder/step_<step>.pt, then remove all but the newest `max_to_keep` checkpoints and
    the one of step `keep`. A write that fails (a full disk) raises UserError naming the file and the OS
    error; the file is left as it was and the older checkpoints are kept."""
    final = Path(folder) / f"step_{step}.pt"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(final) as f:
            torch.save(state, f)
    except Exception as e:
        cause = _os_error(e)
        if cause is None:
            raise
        raise UserError(f"{final}: cannot write the checkpoint: {cause.strerror or cause}") from None
    prune_checkpoints(folder, max_to_keep, keep)
    return final


def prune_checkpoints(folder: str | Path, max_to_keep: int | None, keep: int | None = None) -> None:
    """Remove all but the newest `max_to_keep` checkpoints (None keeps all) and the one of step `keep`."""
    if max_to_keep is not None:
        for step, old in list_checkpoints(folder)[:-max_to_keep]:
            if step != keep:
                old.unlink(missing_ok=True)


def read_best(folder: str | Path) -> dict[str, Any] | None:
    """The best-checkpoint marker of a checkpoints folder, or None where there is none."""
    path = Path(folder) / BEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise UserError(f"{path}: not a best-checkpoint marker ({e}); remove it to start afresh") from None


def write_best(folder: str | Path, marker: dict[str, Any]) -> None:
    with atomic_write(Path(folder) / BEST, "w") as f:  # a resumed run trusts what it reads back
        f.write(json.dumps(marker, indent=1))


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError that `error` is, or that it was raised while handling: torch.save raises a RuntimeError of
    its own when it closes an archive after a failed write."""
    while error is not None and not isinstance(error, OSError):
        error = error.__context__
    return error


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except Exception as e:  # a truncated or foreign file: say which one
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None


def resolve_checkpoint(path: str | Path, best: bool = False) -> Path:
    """A checkpoint file, or of a run folder / checkpoints folder the one best.json marks (with `best`, where
    there is a marker), else the newest."""
    path = Path(path)
    if path.is_file():
        return path
    for folder in (path / "checkpoints", path):
        marker = read_best(folder) if best else None
        if marker is not None:
            return _existing(folder / f"step_{marker['step']}.pt", folder / BEST)
        newest = latest_checkpoint(folder)
        if newest is not None:
            return newest
    raise UserError(f"no checkpoint at {path} (expected a step_<N>.pt file or a folder holding one)")


def _existing(path: Path, marker: Path) -> Path:
    if not path.is_file():
        raise UserError(f"{marker} marks {path.name} as the best checkpoint, but there is no such file")
    return path


def load_model_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy weights whose names and shapes must all match; a mismatch names every offending parameter."""
    own = model.state_dict()
    problems = [f"missing {k}" for k in own if k not in state_dict]
    problems += [f"unexpected {k}" for k in state_dict if k not in own]
    problems += [
        f"{k}: shape {tuple(state_dict[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if problems:
        raise UserError(f"{source} does not fit this model: " + "; ".join(problems))
    model.load_state_dict(state_dict)
