"""Load and run an exported model folder (written by export.py) with torch alone.

The folder holds `model.pt2`, a torch.export program: featurization -> model -> calibration -> score,
taking one tensor per input in manifest order and returning (calibrated probabilities [B, T], score [B]);
and `manifest.json`, which says what those inputs and outputs are. This module needs torch alone (it uses
heavyranker.errors when it is there), so a service can copy it next to torch and score without the
training code: `Scorer(folder)(features)`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

try:  # inside the heavyranker package: a broken artifact is a UserError, which the CLI prints plainly
    from ..errors import UserError as _Base
except ImportError:  # this file loaded on its own
    _Base = Exception

MANIFEST = "manifest.json"
PROGRAM = "model.pt2"
FORMAT = "heavyranker-scorer/1"


class ArtifactError(_Base):
    """The model folder is missing, damaged or of another format; the message names the file."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]  # of one candidate; () for a single value
    dtype: torch.dtype
    allow_non_finite: bool  # the program turns NaN/inf of this input into finite outputs (else reject them)

    @property
    def width(self) -> int:
        return self.shape[0] if self.shape else 1


class Scorer:
    """`scorer(features)` -> (calibrated probabilities [B, T] in `tasks` order, score [B]).

    Calls may come from many threads: they run one at a time, each with all of torch's intra-op threads.
    Two concurrent forwards would share the same cores anyway, and each would finish later."""

    def __init__(self, model_dir: str | Path):
        folder = Path(model_dir)
        self.manifest = _read_manifest(folder)
        program = folder / self.manifest["program"]
        digest = sha256_file(program)
        if digest != self.manifest["program_sha256"]:
            raise ArtifactError(
                f"{program}: content hash {digest} differs from the manifest's "
                f"{self.manifest['program_sha256']}: damaged, or from another export"
            )
        try:
            self.program = torch.export.load(str(program)).module()
        except Exception as e:  # torch raises several kinds; the likely cause is another torch version
            exported_with = self.manifest.get("torch_version")
            raise ArtifactError(
                f"{program}: cannot load the program (exported with torch {exported_with}, "
                f"this is {torch.__version__}): {e}"
            ) from None
        self.tasks: list[str] = list(self.manifest["tasks"])
        self.inputs = [
            InputSpec(i["name"], tuple(i["shape"]), getattr(torch, i["dtype"]), i["allow_non_finite"])
            for i in self.manifest["inputs"]
        ]
        self._lock = threading.Lock()

    def __call__(self, features: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        args = [features[spec.name].to(spec.dtype) for spec in self.inputs]
        with self._lock, torch.inference_mode():
            return self.program(*args)

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 2, 64)) -> None:
        """A loaded program's first call is slow (0.6 s for local_prod's model): make it before serving."""
        for batch in batch_sizes:
            self({s.name: torch.zeros((batch, *s.shape), dtype=s.dtype) for s in self.inputs})


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read the exported program: {e.strerror}") from None
    return digest.hexdigest()


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except OSError as e:
        raise ArtifactError(
            f"{path}: cannot read the manifest ({e.strerror}); is {folder} a folder "
            "written by `heavyranker export`?"
        ) from None
    except ValueError as e:
        raise ArtifactError(f"{path}: not a JSON manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ArtifactError(f"{path}: format {found!r}, this code reads {FORMAT!r}")
    return manifest
