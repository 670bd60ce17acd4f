"""`heavyranker export`: a checkpoint -> a model folder that scores without the config or the training code.

The program is a torch.export ExportedProgram (.pt2) with a dynamic candidate dimension. Why: measured on
local_prod's model with one intra-op thread, each format called in turn, median ms of two runs on the
shared 2-core development machine (its load varied between them):
    1,000 candidates: eager 1470 / 2404, frozen TorchScript 1452 / 2441, torch.export 1459 / 2443,
                      TorchScript + optimize_for_inference 1568, AOTInductor 1472 (after an 88 s compile)
    10 candidates:    eager 62 / 81, frozen TorchScript 50 / 65, torch.export 60 / 79
The forward is a chain of large GEMMs that every format hands to the same kernels, so at serving size they
tie; frozen TorchScript gains a little on tiny batches only, by folding the per-forward stacking of the
towers' weights into constants. TorchScript is deprecated in this torch (trace, freeze, save and load all
warn), AOTInductor compiles for minutes and for one machine, ONNX Runtime is not installed here. So: the
supported format, as fast where it matters, loaded with one call and no Python source of the model.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path, atomic_write
from ..checkpoint import load_checkpoint, load_model_weights, resolve_checkpoint
from ..config import Config
from ..data.shapes import feature_dtypes, feature_shapes
from ..errors import UserError
from ..model import Ranker, build_model
from .scorer import FORMAT, MANIFEST, PROGRAM, sha256_file

log = logging.getLogger(__name__)

SCHEMA_COPY = "schema.json"  # predict decodes TFRecords with it, whatever happened to the original
EXPORT_BATCH = 4
CHECK_BATCH = 3  # != EXPORT_BATCH: the check catches a program that baked in the batch size
CHECK_TOLERANCE = 1e-5


class ScoringProgram(nn.Module):
    """The ranker with positional inputs (in `input_names` order) and the weighted score appended."""

    def __init__(self, ranker: Ranker, input_names: list[str], weights: torch.Tensor):
        super().__init__()
        self.ranker = ranker
        self.input_names = list(input_names)
        self.register_buffer("weights", weights)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = dict(zip(self.input_names, inputs, strict=True))
        probabilities = self.ranker(features)["calibrated_probabilities"]
        return probabilities, probabilities @ self.weights


def export_model(config: Config, *, checkpoint: str | None = None, out: str) -> Path:
    """Writes out/model.pt2, out/manifest.json and out/schema.json; returns the folder.
    `checkpoint`: a step_<N>.pt file or a run folder (default: the newest checkpoint in save_dir)."""
    source = resolve_checkpoint(checkpoint or config.training.save_dir)
    state = load_checkpoint(source)
    if "model" not in state:
        raise UserError(f"{source}: no 'model' weights in this checkpoint")
    shapes = feature_shapes(config.train_data)
    model = build_model(config, shapes)
    load_model_weights(model, state["model"], str(source))
    model.eval()

    dtypes = feature_dtypes(config.train_data, list(shapes))
    names = used_inputs(model, {name: example(shape, dtypes[name], 2) for name, shape in shapes.items()})
    # A task the config gives no weight does not count in the score.
    weights = {t: config.engagement_weights.get(t, 0.0) for t in config.task_names}
    scoring = ScoringProgram(model, names, torch.tensor(list(weights.values()))).eval()

    def examples(size: int, seed: int = 0) -> list[torch.Tensor]:
        return [example(shapes[n], dtypes[n], size, seed) for n in names]

    candidates = torch.export.Dim("candidates", min=1)
    program = torch.export.export(
        scoring, tuple(examples(EXPORT_BATCH)), dynamic_shapes=(tuple({0: candidates} for _ in names),)
    )
    with torch.no_grad():
        _check_same(scoring, program.module(), examples(CHECK_BATCH, seed=1))
        non_finite = {
            n: dtypes[n].is_floating_point and _tolerates_non_finite(scoring, examples(3), i)
            for i, n in enumerate(names)
        }

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    # A file object, not a path: torch.export.save names the archive's top folder after a path (here the
    # temporary's name) and warns that it does not end in .pt2; after a file object it is "archive".
    with atomic_write(folder / PROGRAM) as f:
        torch.export.save(program, f)
    with atomic_path(folder / SCHEMA_COPY) as temporary:
        shutil.copyfile(config.train_data.seg_dense_schema.schema_path, temporary)
    manifest = {
        "format": FORMAT,
        "program": PROGRAM,
        # Of the file (weights, code and debug source ranges): the same export of the same checkpoint gives
        # the same hash, and the scorer checks it on load.
        "program_sha256": sha256_file(folder / PROGRAM),
        "tasks": config.task_names,
        "inputs": [
            {
                "name": n,
                "shape": list(shapes[n]),
                "dtype": dtype_name(dtypes[n]),
                "allow_non_finite": non_finite[n],
            }
            for n in names
        ],
        "outputs": {
            "probabilities": {"shape": ["batch", len(config.task_names)], "dtype": "float32"},
            "score": {"shape": ["batch"], "dtype": "float32"},
        },
        "engagement_weights": weights,
        "checkpoint": {"path": str(source.resolve()), "step": state.get("step")},
        "schema": SCHEMA_COPY,
        "torch_version": torch.__version__,
        "config": config.model_dump(mode="json"),
    }
    with atomic_write(folder / MANIFEST, "w") as f:
        f.write(json.dumps(manifest, indent=2))
    log.info(
        "exported %s (step %s) to %s: inputs %s, %d tasks",
        source,
        state.get("step"),
        folder,
        ", ".join(names),
        len(config.task_names),
    )
    return folder


def used_inputs(model: Ranker, features: dict[str, torch.Tensor]) -> list[str]:
    """The features a forward reads, in the order it first reads them: the artifact takes only those."""
    read: list[str] = []

    class Recording(dict):
        def __getitem__(self, name: str) -> torch.Tensor:
            if name not in read:
                read.append(name)
            return super().__getitem__(name)

    with torch.no_grad():
        model(Recording(features))
    return read


def example(shape: tuple[int, ...], dtype: torch.dtype, batch: int, seed: int = 0) -> torch.Tensor:
    """A batch of plausible values: signed floats with a heavy tail, small non-negative integers."""
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn((batch, *shape), generator=gen) * 3).to(dtype)
    return torch.randint(0, 2 if dtype == torch.bool else 8, (batch, *shape), generator=gen).to(dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tolerates_non_finite(scoring: ScoringProgram, inputs: list[torch.Tensor], column: int) -> bool:
    """Whether NaN, inf and -inf in input `column` still give finite outputs (the double_norm_log
    featurization zeroes them): asked of the model itself, so the answer follows its featurization."""
    for row, value in enumerate((float("nan"), float("inf"), float("-inf"))):
        inputs[column][row] = value
    return all(bool(torch.isfinite(out).all()) for out in scoring(*inputs))


def _check_same(eager: nn.Module, program: nn.Module, inputs: list[torch.Tensor]) -> None:
    for name, a, b in zip(("probabilities", "score"), eager(*inputs), program(*inputs), strict=True):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=CHECK_TOLERANCE, atol=CHECK_TOLERANCE):
            raise UserError(
                f"the exported program's {name} differ from the model's on a batch of "
                f"{len(inputs[0])}: the forward depends on the batch in a way export misses"
            )
