"""Load and run an exported model folder (written by export.py) with torch, and onnxruntime for ONNX.

The folder holds a scoring program: featurization -> model -> calibration -> score, taking one tensor per
input in manifest order and returning (calibrated probabilities [B, T], score [B]); and `manifest.json`,
which says what those inputs and outputs are and which program the folder holds: `model.pt2` (a
torch.export program, run by torch) or `model.onnx` (run by onnxruntime). This module needs torch alone,
and onnxruntime for an ONNX program (it uses heavyranker.errors when it is there), so a service can copy it
next to them and score without the training code: `Scorer(folder)(features)`.
"""

from __future__ import annotations

import hashlib
import json
import linecache
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

try:  # inside the heavyranker package: a broken artifact is a UserError, which the CLI prints plainly
    from ..errors import UserError as _Base
except ImportError:  # this file loaded on its own
    _Base = Exception

MANIFEST = "manifest.json"
FORMAT = "heavyranker-scorer/2"  # /2: the manifest names its program's format (program_format)
# program_format -> the program's file name in the folder
PROGRAMS = {"onnx": "model.onnx", "pt2": "model.pt2"}
OUTPUTS = ("probabilities", "score")
# What loading and serving read of a manifest: one without them (edited by hand, cut short by a copy that
# still parses) is an ArtifactError naming the key, not a KeyError at the start or in a request.
REQUIRED = (
    "program",
    "program_format",
    "program_sha256",
    "tasks",
    "inputs",
    "outputs",
    "checkpoint",
    "engagement_weights",
)


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


Program = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class Scorer:
    """`scorer(features)` -> (calibrated probabilities [B, T] in `tasks` order, score [B]), whichever program
    the folder holds. `threads`: onnxruntime's intra-op threads for an ONNX program, by default torch's
    (torch.get_num_threads(), which OMP_NUM_THREADS sets), so that one setting governs either program; a
    torch program runs on torch's own, process-wide setting.

    Calls may come from many threads: they run one at a time, each with all the intra-op threads. Two
    concurrent forwards would share the same cores anyway, and each would finish later."""

    def __init__(self, model_dir: str | Path, *, threads: int | None = None):
        folder = Path(model_dir)
        self.manifest = _read_manifest(folder)
        path = folder / self.manifest["program"]
        digest = sha256_file(path)
        if digest != self.manifest["program_sha256"]:
            raise ArtifactError(
                f"{path}: content hash {digest} differs from the manifest's "
                f"{self.manifest['program_sha256']}: damaged, or from another export"
            )
        self.program: Program
        match self.manifest["program_format"]:
            case "pt2":
                self.program = _load_pt2(path, self.manifest["torch_version"])
            case "onnx":
                threads = torch.get_num_threads() if threads is None else threads
                self.program = OnnxProgram(path, threads, self.manifest["onnx_opset"])
            case other:
                raise ArtifactError(
                    f"{folder / MANIFEST}: program_format {other!r}, not one of {list(PROGRAMS)}"
                )
        self.tasks: list[str] = list(self.manifest["tasks"])
        # Of the dense layers' products (export --precision); a manifest written before it was recorded: fp32.
        self.precision: str = self.manifest.get("precision", "fp32")
        # Of the id tables' rows (export --table-precision); before it was recorded: fp32.
        self.table_precision: str = self.manifest.get("table_precision", "fp32")
        self.inputs = _input_specs(self.manifest["inputs"], folder / MANIFEST)
        self._lock = threading.Lock()

    def __call__(self, features: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        args = [features[spec.name].to(spec.dtype) for spec in self.inputs]
        with self._lock, torch.inference_mode():
            return self.program(*args)

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 2, 64)) -> None:
        """A loaded program's first call is slow (0.6 s for local_prod's model): make it before serving."""
        for batch in batch_sizes:
            self({s.name: torch.zeros((batch, *s.shape), dtype=s.dtype) for s in self.inputs})


class OnnxProgram:
    """An ONNX scoring program on onnxruntime's CPU provider, called as a torch one: `program(*inputs)` with
    one tensor per input in the model's order -> (probabilities, score) tensors. `model`: the file, or its
    bytes. Sequential execution: each product already runs on all the intra-op threads, and running the
    towers' branches side by side would only share the same cores."""

    def __init__(self, model: Path | bytes, threads: int, opset: int):
        import onnxruntime  # here: a folder with a torch program needs torch alone

        where = model if isinstance(model, Path) else "the exported ONNX program"
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        # onnxruntime's pool threads spin after each run, waiting for the next, on the cores that the server's
        # own threads (reading and parsing the next request), other programs in the process and other
        # processes need. Measured on 2 cores, 2 threads, local_prod: in bench/onnx_forward.py's process of
        # several programs, torch's forward of 100 candidates took 75 ms beside spinning sessions, 44 without;
        # served at concurrency 4 (bench/serve_latency.py, 2 runs each), 100 candidates a request, fp32
        # 2,455-2,472 -> 2,489-2,563 candidates/s and int8 7,576-8,017 -> 8,157-8,345; at concurrency 1 no
        # change past the noise.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = onnxruntime.InferenceSession(
                str(model) if isinstance(model, Path) else model, options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own kinds; likely an opset it does not know
            raise ArtifactError(
                f"{where}: onnxruntime {onnxruntime.__version__} cannot load it (ONNX opset {opset}): {e}"
            ) from None
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feeds = {name: x.numpy() for name, x in zip(self.input_names, inputs, strict=True)}
        probabilities, score = self.session.run(OUTPUTS, feeds)
        return torch.from_numpy(probabilities), torch.from_numpy(score)


def _load_pt2(path: Path, exported_with: str) -> Program:
    before = set(fx_sources())
    try:
        program = torch.export.load(str(path)).module()
    except Exception as e:  # torch raises several kinds; the likely cause is another torch version
        raise ArtifactError(
            f"{path}: cannot load the program (exported with torch {exported_with}, "
            f"this is {torch.__version__}): {e}"
        ) from None
    # torch.fx keeps the generated Python source of every graph module it builds in a process-wide cache
    # (for tracebacks' lines), never emptied: a server loading a version every few minutes held each one's
    # (0.3 MB a load of local_small's program). They go with the program.
    weakref.finalize(program, forget_fx_sources, set(fx_sources()) - before)
    clear_shape_env_caches()
    return program


def fx_sources() -> dict[str, str]:
    """torch.fx's cache of generated sources (file name -> source); empty where this torch has none."""
    loader = getattr(torch.fx.graph_module, "_loader", None)
    return getattr(loader, "eval_cache", {})


def forget_fx_sources(names: set[str]) -> None:
    """Drops these generated sources from torch.fx's cache and linecache's (tracebacks lose their lines)."""
    sources = fx_sources()
    for name in names:
        sources.pop(name, None)
        linecache.cache.pop(name, None)


def clear_shape_env_caches() -> None:
    """Empties the functools.lru_cache's on torch's ShapeEnv methods (ShapeEnv.get_implications,
    constrain_symbol_range, _find, ...): they sit on the class and key on the ShapeEnv itself, several
    without a bound, so each ShapeEnv that torch.export.load or torch.export makes stays, with its fake
    tensors and symbols, for the process's life: one per version loaded, for a server swapping in one every
    few minutes. They are caches: emptied, torch computes again what it asks next. A no-op where this torch
    has no such class."""
    try:
        from torch.fx.experimental.symbolic_shapes import ShapeEnv
    except ImportError:
        return
    for member in vars(ShapeEnv).values():
        cache_clear = getattr(member, "cache_clear", None)
        if callable(cache_clear):
            cache_clear()


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
        raise ArtifactError(
            f"{path}: format {found!r}, this code reads {FORMAT!r}: export the model again with this version"
        )
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise ArtifactError(f"{path}: no {missing[0]!r}: damaged, or not written by `heavyranker export`")
    return manifest


def _input_specs(inputs: object, path: Path) -> list[InputSpec]:
    """The manifest's inputs; an ArtifactError naming the first that is not one as export writes it."""
    specs = []
    for i, spec in enumerate(inputs if isinstance(inputs, list) else [inputs]):
        try:
            dtype = getattr(torch, spec["dtype"])
            if not isinstance(dtype, torch.dtype) or type(spec["name"]) is not str:
                raise TypeError
            shape = tuple(spec["shape"])
            if not all(type(n) is int and n >= 0 for n in shape):
                raise TypeError
            specs.append(InputSpec(spec["name"], shape, dtype, bool(spec["allow_non_finite"])))
        except (KeyError, TypeError, AttributeError):
            raise ArtifactError(
                f"{path}: inputs[{i}]: {str(spec)[:100]} is not an input as `heavyranker export` writes one"
            ) from None
    return specs
