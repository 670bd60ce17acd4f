"""An exported model folder where eval's code takes a model (compare.score): features -> calibrated
probabilities, as the folder's program computes them. `promote` scores the served version so, and a lowered
candidate; `compare` scores an exported folder given for a run so."""

from __future__ import annotations

from pathlib import Path

import torch

from .scorer import MANIFEST, Scorer


class ServedProgram:
    """A folder's program as compare.score takes a model: features -> calibrated probabilities."""

    def __init__(self, scorer: Scorer):
        self.scorer = scorer
        self.task_names = scorer.tasks
        self.input_shapes = {spec.name: spec.shape for spec in scorer.inputs}  # of one candidate

    def eval(self) -> ServedProgram:
        return self

    def __call__(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"calibrated_probabilities": self.scorer(features)[0]}


def exported_program(folder: str) -> tuple[ServedProgram, Path, int] | None:
    """The program of `folder`, the folder, and the step of its checkpoint, if `folder` is an exported model
    folder (it has a manifest); else None (a run folder)."""
    path = Path(folder)
    if not (path / MANIFEST).is_file():
        return None
    return served_program(path)


def served_program(folder: Path) -> tuple[ServedProgram, Path, int]:
    """The program of an exported model folder, the folder, and the step of its checkpoint (0 where the
    manifest has none; `.scorer.manifest` keeps what it says). Scorer's errors if it is not one."""
    scorer = Scorer(folder)
    return ServedProgram(scorer), folder, int(scorer.manifest["checkpoint"]["step"] or 0)
