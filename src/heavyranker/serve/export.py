"""`heavyranker export`: a checkpoint -> a model folder that scores without the config or the training code.

The program, with a dynamic candidate dimension, is an ONNX model (model.onnx, run by onnxruntime here and
by the servers a fleet already runs: Triton, KServe) or a torch.export program (model.pt2, `--format pt2`).
ONNX is the default because onnxruntime runs it faster: bench/onnx_forward.py on local_prod's model, the
same inputs and intra-op threads for both, rounds interleaved, median of the per-round ratios onnxruntime /
torch, two runs on the shared 2-core development machine (load average 5 to 6, so the 2-thread figures
mostly show how each copes with oversubscription):
    1 thread:   100 candidates 0.79 / 0.72 (torch 185 / 315 ms), 1,000 candidates 0.92 / 0.93 (1943 / 2563 ms)
    2 threads:  100 candidates 0.24 / 0.21,                       1,000 candidates 0.68 / 0.79
Both run the same GEMMs (torch on MKL, onnxruntime on its MLAS); onnxruntime spends less around them.
One exception: the exporter turns EmbeddingBag (model.large_embeddings) into an ONNX Loop over candidates,
about 0.07 ms per candidate and table here, which a small model with a large table feels (2.5x torch's
time at 1,000 candidates on local_small with one) and local_prod's would not.

Among torch's own formats, torch.export: measured on local_prod's model with one intra-op thread, each
format called in turn, median ms of two runs on the same machine (its load varied between them):
    1,000 candidates: eager 1470 / 2404, frozen TorchScript 1452 / 2441, torch.export 1459 / 2443,
                      TorchScript + optimize_for_inference 1568, AOTInductor 1472 (after an 88 s compile)
    10 candidates:    eager 62 / 81, frozen TorchScript 50 / 65, torch.export 60 / 79
The forward is a chain of large GEMMs that every format hands to the same kernels, so at serving size they
tie; frozen TorchScript gains a little on tiny batches only, by folding the per-forward stacking of the
towers' weights into constants. TorchScript is deprecated in this torch (trace, freeze, save and load all
warn) and AOTInductor compiles for minutes and for one machine. So: the supported format, as fast where it
matters, loaded with one call and no Python source of the model.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_path, atomic_write
from ..checkpoint import resolve_checkpoint
from ..config import Config
from ..config.serving import ServeOptions
from ..data.columns import feature_specs
from ..errors import SettingError, UserError
from ..model import Ranker, build_model, restore_weights
from .precision import CHECK_TOLERANCES, check_precision, quantize_onnx, with_bf16_layers
from .scorer import FORMAT, MANIFEST, OUTPUTS, PROGRAMS, OnnxProgram, sha256_file
from .table_precision import check_table_precision, table_bytes, with_int8_tables

log = logging.getLogger(__name__)

SCHEMA_COPY = "schema.json"  # predict decodes TFRecords with it, whatever happened to the original
EXPORT_BATCH = 4
CHECK_BATCH = 3  # != EXPORT_BATCH: the check catches a program that baked in the batch size
TRITON_CONFIG = "config.pbtxt"
TRITON_MAX_BATCH = ServeOptions.model_fields["max_candidates"].default  # candidates in one forward, as serve


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


def export_model(
    config: Config,
    *,
    checkpoint: str | None = None,
    out: str,
    format: str = "onnx",
    precision: str = "fp32",
    table_precision: str = "fp32",
) -> Path:
    """Writes out/model.onnx and out/config.pbtxt (format "onnx") or out/model.pt2 (format "pt2"), then
    out/manifest.json and out/schema.json; returns the folder.
    `checkpoint`: a step_<N>.pt file or a run folder (default: save_dir's checkpoint that best.json marks
    when training.keep_best is set, else its newest). `precision`: fp32, bf16 (pt2) or int8 (onnx); see
    precision.py. `table_precision`: of the id tables' rows, fp32 or int8 (either format; table_precision.py):
    the exported program is checked against the model with the rows it holds."""
    if format not in PROGRAMS:
        raise SettingError("format", f"{format}: not one of {', '.join(PROGRAMS)}")
    check_precision(precision, format)
    check_table_precision(table_precision)
    folder = Path(out)
    if folder.exists() and not folder.is_dir():  # known before minutes of export, not after
        raise UserError(f"{folder}: not a folder, where the exported model would go")
    best = checkpoint is None and config.training.keep_best is not None
    source = resolve_checkpoint(checkpoint or config.training.save_dir, best=best)
    specs = feature_specs(config.train_data)
    shapes = {name: spec.shape for name, spec in specs.items()}
    dtypes = {name: spec.dtype for name, spec in specs.items()}
    model = build_model(config.model, specs, config.train_data.tasks)
    state = restore_weights(model, source, mapped=True)
    model.eval()
    if table_precision == "int8":
        model = with_int8_tables(model)

    names = used_inputs(model, {name: example(shape, dtypes[name], 2) for name, shape in shapes.items()})
    # A task the config gives no weight does not count in the score.
    weights = {t: config.engagement_weights.get(t, 0.0) for t in config.task_names}
    scoring = ScoringProgram(model, names, torch.tensor(list(weights.values()))).eval()

    def examples(size: int, seed: int = 0) -> list[torch.Tensor]:
        return [example(shapes[n], dtypes[n], size, seed) for n in names]

    if format == "onnx":
        program, check, extra = _onnx_program(scoring, names, dtypes, examples(EXPORT_BATCH), precision)
    else:
        traced = with_bf16_layers(scoring) if precision == "bf16" else scoring
        program, check, extra = _pt2_program(traced, names, examples(EXPORT_BATCH))
    with torch.no_grad():
        check_inputs, total_weight = examples(CHECK_BATCH, seed=1), sum(map(abs, weights.values()))
        _check_same(scoring, check, check_inputs, total_weight, CHECK_TOLERANCES[precision])
        non_finite = {
            n: dtypes[n].is_floating_point and _tolerates_non_finite(scoring, examples(3), i)
            for i, n in enumerate(names)
        }

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{e.filename or folder}: cannot make the model folder: {e.strerror}") from None
    with atomic_write(folder / PROGRAMS[format]) as f:
        f.write(program)
    with atomic_path(folder / SCHEMA_COPY) as temporary:
        shutil.copyfile(config.train_data.seg_dense_schema.schema_path, temporary)
    inputs = [
        {
            "name": n,
            "shape": list(shapes[n]),
            "dtype": dtype_name(dtypes[n]),
            "allow_non_finite": non_finite[n],
        }
        for n in names
    ]
    if format == "onnx":
        with atomic_write(folder / TRITON_CONFIG, "w") as f:
            f.write(triton_config(inputs, len(config.task_names)))
    manifest = {
        "format": FORMAT,
        "program_format": format,
        "program": PROGRAMS[format],
        "precision": precision,
        "table_precision": table_precision,  # of the id tables' rows
        "table_bytes": table_bytes(model),
        # Of the file (weights, code and debug source ranges): the same export of the same checkpoint gives
        # the same hash, and the scorer checks it on load.
        "program_sha256": sha256_file(folder / PROGRAMS[format]),
        "tasks": config.task_names,
        "inputs": inputs,
        "outputs": {
            "probabilities": {"shape": ["batch", len(config.task_names)], "dtype": "float32"},
            "score": {"shape": ["batch"], "dtype": "float32"},
        },
        "engagement_weights": weights,
        "checkpoint": {"path": str(source.resolve()), "step": state.get("step")},
        # Seconds since the epoch of the newest data the checkpoint was trained on (data/data_time.py).
        "newest_data_time": state.get("newest_data_time"),
        "schema": SCHEMA_COPY,
        "torch_version": torch.__version__,
        **extra,
        "config": config.model_dump(mode="json"),
    }
    with atomic_write(folder / MANIFEST, "w") as f:
        f.write(json.dumps(manifest, indent=2))
    # What an export of the other format left here; removed once the manifest no longer names it.
    written = {PROGRAMS[format], *([TRITON_CONFIG] if format == "onnx" else [])}
    for stale in {*PROGRAMS.values(), TRITON_CONFIG} - written:
        (folder / stale).unlink(missing_ok=True)
    log.info(
        "exported %s (step %s) to %s in %s (tables %s): inputs %s, %d tasks",
        source,
        state.get("step"),
        folder / PROGRAMS[format],
        precision,
        table_precision,
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


def _pt2_program(
    scoring: ScoringProgram, names: list[str], inputs: list[torch.Tensor]
) -> tuple[bytes, nn.Module, dict[str, Any]]:
    """The torch.export program's file, the program to check and what the manifest adds about it."""
    candidates = torch.export.Dim("candidates", min=1)
    program = torch.export.export(
        scoring, tuple(inputs), dynamic_shapes=(tuple({0: candidates} for _ in names),)
    )
    _share_casts(program.graph_module)
    # A file object, not a path: torch.export.save names the archive's top folder after a path (here a
    # temporary's name) and warns that it does not end in .pt2; after a file object it is "archive".
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue(), program.module(), {}


def _share_casts(graph_module: torch.fx.GraphModule) -> None:
    """One cast per tensor and dtype. torch.export records a cast wherever a layer makes one, so in a bf16
    program an input that several layers read was cast once per reader: local_prod's mask blocks' input 8
    times, its towers' input 10 times, about 10% of the forward at 1,000 candidates. A cast is a pure
    function of its arguments, so its first node can stand for the others."""
    graph = graph_module.graph
    first: dict[tuple, torch.fx.Node] = {}
    for node in list(graph.nodes):
        if node.target != torch.ops.aten.to.dtype:
            continue
        key = (node.args, tuple(sorted(node.kwargs.items())))
        if key in first:
            node.replace_all_uses_with(first[key])
            graph.erase_node(node)
        else:
            first[key] = node
    graph.lint()
    graph_module.recompile()


def _onnx_program(
    scoring: ScoringProgram,
    names: list[str],
    dtypes: dict[str, torch.dtype],
    inputs: list[torch.Tensor],
    precision: str,
) -> tuple[bytes, OnnxProgram, dict[str, Any]]:
    """The ONNX model's file, the program to check (on onnxruntime) and what the manifest adds about it;
    for int8 quantized (precision.quantize_onnx).

    torch's dynamo exporter: torch.export traces the module as for .pt2 (so Linear takes F.linear, see
    model/linear.py), then onnxscript translates the aten graph into standard ONNX ops."""
    for n in names:
        if dtypes[n] == torch.bfloat16:  # numpy has no bfloat16
            raise SettingError(
                "format",
                f"onnx: input {n} is {dtype_name(dtypes[n])} (preprocess.downcast), which onnxruntime's "
                "Python API cannot take: export with format pt2, or downcast it to float16",
            )
    candidates = torch.export.Dim("candidates", min=1)
    with _quiet_exporter():
        program = torch.onnx.export(
            scoring,
            tuple(inputs),
            dynamo=True,
            input_names=names,
            output_names=list(OUTPUTS),
            dynamic_shapes=(tuple({0: candidates} for _ in names),),
            external_data=False,  # one file, as the manifest's hash and Triton's model.onnx expect
            verbose=False,
        )
    model = program.model_proto
    opset = next(o.version for o in model.opset_import if o.domain == "")
    content = model.SerializeToString()
    if precision == "int8":
        content = quantize_onnx(content)
    return content, OnnxProgram(content, torch.get_num_threads(), opset), {"onnx_opset": opset}


# The exporter's libraries log each of their passes at INFO, which the CLI shows; torch.onnx warns on each
# export that torchvision, whose ops it would translate too, is not installed.
EXPORTER_LOG_LEVELS = {
    "onnxscript": logging.WARNING,
    "onnx_ir": logging.WARNING,
    "torch.onnx._internal.exporter._registration": logging.ERROR,
}


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx.export without the messages that say nothing to someone exporting a ranker."""
    loggers = {logging.getLogger(name): level for name, level in EXPORTER_LOG_LEVELS.items()}
    before = {logger: logger.level for logger in loggers}
    with warnings.catch_warnings():
        # Every input names the same dimension: the exporter says it keeps the name once.
        warnings.filterwarnings("ignore", message="# The axis name: candidates will not be used")
        # From inside torch's own pytree code (torch 2.13).
        warnings.filterwarnings("ignore", message="`isinstance\\(treespec, LeafSpec\\)` is deprecated")
        try:
            for logger, level in loggers.items():
                logger.setLevel(level)
            yield
        finally:
            for logger, level in before.items():
                logger.setLevel(level)


# Triton's name for each dtype an ONNX program's input may have (see DownCastType): Triton checks requests
# against them.
TRITON_TYPES = {
    torch.float32: "TYPE_FP32",
    torch.float16: "TYPE_FP16",
    torch.int64: "TYPE_INT64",
    torch.uint8: "TYPE_UINT8",
    torch.bool: "TYPE_BOOL",
}


def triton_config(inputs: list[dict[str, Any]], tasks: int) -> str:
    """Triton's config.pbtxt for model.onnx on its onnxruntime backend. Triton batches along the first
    dimension, the candidates, so `dims` leave it out; Triton also wants every tensor to have dims beyond
    it, so a tensor of one value per candidate (an id, the score) is [1], reshaped to the model's []."""
    types = {dtype_name(dtype): name for dtype, name in TRITON_TYPES.items()}

    def tensor(name: str, dtype: str, shape: list[int]) -> str:
        dims = ", ".join(map(str, shape or [1]))
        reshape = "" if shape else " reshape: { shape: [ ] }"
        return f'  {{ name: "{name}" data_type: {types[dtype]} dims: [ {dims} ]{reshape} }}'

    lines = [
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {TRITON_MAX_BATCH}",
        "input [",
        ",\n".join(tensor(i["name"], i["dtype"], i["shape"]) for i in inputs),
        "]",
        "output [",
        tensor("probabilities", "float32", [tasks]) + ",",
        tensor("score", "float32", []),
        "]",
        "dynamic_batching { }",
    ]
    return "\n".join(lines) + "\n"


def _check_same(
    eager: nn.Module, program: Callable, inputs: list[torch.Tensor], total_weight: float, tolerance: float
) -> None:
    """The program's outputs are the eager model's within `tolerance`, for the score as much as the
    probabilities' error can move it (by at most the sum of the weights' magnitudes times it)."""
    tolerances = (tolerance, tolerance * total_weight)
    for name, a, b, atol in zip(OUTPUTS, eager(*inputs), program(*inputs), tolerances, strict=True):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=tolerance, atol=atol):
            raise UserError(
                f"the exported program's {name} differ from the model's on a batch of "
                f"{len(inputs[0])}: the forward depends on the batch in a way export misses"
            )
