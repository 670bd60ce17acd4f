"""Checkpoints that survive a kill: written with atomic_write (a temporary name, fsynced, renamed into place).

A checkpoint is one file `step_<N>.pt` in a run folder's checkpoints/ (run_folder.py: where they are, which
are kept, which is the best). A file of that name is complete by construction (os.replace is atomic), so the
newest one is always safe to resume from. Loading uses `torch.load(weights_only=True)`: a checkpoint holds
tensors and plain containers, never code."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_write, refuse_link
from .errors import UserError
from .run_folder import RunFolder


def save_checkpoint(folder: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Write `state` as folder/step_<step>.pt. A write that fails (a full disk) raises UserError naming the
    file and the OS error; the file is left as it was. A symbolic link at the file's name is refused."""
    final = refuse_link(RunFolder.of_checkpoints(folder).checkpoint(step))
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(final) as f:
            torch.save(state, f)
    except Exception as e:
        cause = _os_error(e)
        if cause is None:
            raise
        raise UserError(f"{final}: cannot write the checkpoint: {cause.strerror or cause}") from None
    return final


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError that `error` is, or that it was raised while handling: torch.save raises a RuntimeError of
    its own when it closes an archive after a failed write."""
    while error is not None and not isinstance(error, OSError):
        error = error.__context__
    return error


def load_checkpoint(path: str | Path, *, mapped: bool = False) -> dict[str, Any]:
    """The checkpoint's state. `mapped`: its tensors are mapped from the file (private pages), not read, so
    that what the caller never touches (the optimizer's state, for a command that needs the weights only) is
    never read into memory. Only for a caller that drops the state once it copied what it needs: a mapped
    file removed on a network file system by another host can fault (SIGBUS) when a page is read. A file
    torch cannot map (a legacy, non-zip torch.save; an empty or damaged one) is read whole, as it always was:
    it loads, or fails with its own message, not torch's advice to save it again."""
    try:
        state = _mapped(path) if mapped else torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except Exception as e:  # a truncated or foreign file: say which one
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):  # torch.save of a bare tensor or list: a file of another program
        raise UserError(
            f"{path}: not a heavyranker checkpoint (it holds a {type(state).__name__}, not a dict)"
        )
    return state


# Where an open file can be opened again by its descriptor: the same file, whatever its name points to now.
OPEN_FILES = Path("/proc/self/fd")


def _mapped(path: str | Path) -> Any:
    """torch.load with mmap opens the file by name twice (its zip directory, then the mapping): through the
    descriptor of one open both are the same file, where an atomic save replacing the name in between would
    pair one file's directory with the other's bytes (the weights of another checkpoint, silently)."""
    with open(path, "rb") as file:
        if not zipfile.is_zipfile(file):
            file.seek(0)  # is_zipfile read its end
            return torch.load(file, map_location="cpu", weights_only=True)
        pinned = OPEN_FILES / str(file.fileno()) if OPEN_FILES.is_dir() else path
        return torch.load(pinned, map_location="cpu", weights_only=True, mmap=True)


# What a resume reads of a checkpoint besides the model weights (train/loop.py's Trainer.save writes them).
_RESUME_STATE = {"optimizer": dict, "scheduler": dict, "step": int, "rng": torch.Tensor}


def check_resumable(state: dict[str, Any], path: str | Path) -> None:
    """UserError naming `path` where `state` lacks what a resume reads (a checkpoint trimmed to its weights,
    or written by another program): a training run resumes from it or says why not, in one line."""
    for key, kind in _RESUME_STATE.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            found = "nothing" if key not in state else f"a {type(state[key]).__name__}"
            raise UserError(
                f"{path}: cannot resume from this checkpoint: its {key!r} is {found}, not of type "
                f"{kind.__name__}; move it out of the checkpoints folder to resume from an earlier one"
            )


def resolve_checkpoint(path: str | Path, best: bool = False) -> Path:
    """A checkpoint file, or of a run folder / checkpoints folder the one best.json marks (with `best`, where
    there is a marker), else the newest."""
    path = Path(path)
    if path.is_file():
        return path
    for run in (RunFolder(path), RunFolder.of_checkpoints(path)):
        found = (run.best_checkpoint() if best else None) or run.newest_checkpoint()
        if found is not None:
            return found
    raise UserError(f"no checkpoint at {path} (expected a step_<N>.pt file or a folder holding one)")


def load_model_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy weights whose names and shapes must all match; a mismatch names the first few offending
    parameters of each kind (missing, unexpected, of another shape) and counts the rest."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: shape {tuple(state_dict[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = [f"missing {_first(missing, ', ')}"] if missing else []
    problems += [f"unexpected {_first(unexpected, ', ')}"] if unexpected else []
    problems += [_first(shapes, "; ")] if shapes else []
    if problems:
        raise UserError(f"{source} does not fit this model: " + "; ".join(problems))
    model.load_state_dict(state_dict)


# A checkpoint of another model misfits in hundreds of names; the first few of each kind say what, and the
# line stays short.
SHOWN_PER_KIND = 3


def _first(items: list[str], separator: str) -> str:
    more = len(items) - SHOWN_PER_KIND
    shown = separator.join(items[:SHOWN_PER_KIND])
    return shown if more <= 0 else f"{shown} (and {more} more)"
