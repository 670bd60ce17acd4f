"""The exported forward on torch (model.pt2) against onnxruntime (model.onnx): same model, inputs and threads.

    .venv/bin/python bench/onnx_forward.py [--config configs/local_prod.yaml] [--checkpoint CKPT]
                                           [--candidates 100 1000] [--threads 1 2] [--rounds 12]
                                           [--precisions fp32 bf16 int8]

Exports the config's model (initial weights unless --checkpoint) in both formats and loads each folder with
the Scorer, as serve and predict do. For each thread count (torch.set_num_threads for torch, the session's
intra-op threads for onnxruntime) and batch of candidates, each round calls one program then the other on
the same inputs, first one then the other in turn, so that both see the same machine load. Prints the median
ms of each and the median over rounds of onnxruntime's time / torch's in the round (below 1: onnxruntime is
faster), after checking that their outputs agree.

Then every precision of `export --precision` in the same run (serve/precision.py): fp32 in both formats,
bf16 as pt2, int8 as ONNX, called in turn on the same inputs, the order rotating from round to round. Per
program: p50 and p99 ms, candidates/s at the p50, the p50 of fp32 in the same format over its own, and the
largest probability difference from fp32's ONNX program. The summary goes to bench/results/onnx_forward.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from results import add_results_option, cpu_line, write_results

from heavyranker.checkpoint import save_checkpoint
from heavyranker.config import load_config
from heavyranker.data.columns import feature_specs
from heavyranker.model import build_model
from heavyranker.serve.export import example, export_model
from heavyranker.serve.scorer import Scorer

REPO = Path(__file__).resolve().parents[1]
Features = dict[str, torch.Tensor]


# precision -> the formats it is exported in (serve/precision.py: the formats that run it)
FORMATS = {"fp32": ("pt2", "onnx"), "bf16": ("pt2",), "int8": ("onnx",)}


def export_all(
    config_path: str, checkpoint: str | None, folder: Path, precisions: list[str]
) -> tuple[dict[str, Path], int]:
    """Folders of one checkpoint by "precision format" (fp32 in both formats always), and the model's
    parameter count."""
    config = load_config(config_path)
    torch.manual_seed(0)
    model = build_model(config.model, feature_specs(config.train_data), config.train_data.tasks)
    if checkpoint is None:
        checkpoint = str(save_checkpoint(folder / "checkpoints", 0, {"model": model.state_dict(), "step": 0}))
    folders = {
        f"{precision} {format}": export_model(
            config,
            checkpoint=checkpoint,
            out=str(folder / f"{precision}_{format}"),
            format=format,
            precision=precision,
        )
        for precision in dict.fromkeys(["fp32", *precisions])
        for format in FORMATS[precision]
    }
    return folders, sum(p.numel() for p in model.parameters())


def timed(scorer: Scorer, features: Features) -> float:
    start = time.perf_counter()
    scorer(features)
    return time.perf_counter() - start


def compare(on_torch: Scorer, on_onnx: Scorer, features: Features, rounds: int) -> dict[str, float]:
    """Median ms of each, the median of the per-round ratios, and the largest difference in probability."""
    (p_torch, _), (p_onnx, _) = on_torch(features), on_onnx(features)  # also the first call at this size
    torch_s, onnx_s = [], []
    for i in range(rounds):
        if i % 2:
            onnx_s.append(timed(on_onnx, features))
            torch_s.append(timed(on_torch, features))
        else:
            torch_s.append(timed(on_torch, features))
            onnx_s.append(timed(on_onnx, features))
    return {
        "torch_ms": statistics.median(torch_s) * 1e3,
        "onnxruntime_ms": statistics.median(onnx_s) * 1e3,
        "onnxruntime_over_torch": statistics.median(o / t for o, t in zip(onnx_s, torch_s, strict=True)),
        "max_probability_difference": float((p_torch - p_onnx).abs().max()),
    }


def race(scorers: dict[str, Scorer], features: Features, rounds: int) -> dict[str, dict[str, float]]:
    """Each program in turn, the order rotating each round: p50, p99, candidates/s, against fp32."""
    outputs = {name: scorer(features)[0] for name, scorer in scorers.items()}  # the first call at this size
    seconds: dict[str, list[float]] = {name: [] for name in scorers}
    names = list(scorers)
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            seconds[name].append(timed(scorers[name], features))
    candidates = len(next(iter(features.values())))
    figures = {}
    for name, times in seconds.items():
        p50 = statistics.median(times)
        fp32 = statistics.median(seconds["fp32 " + name.split()[1]])
        figures[name] = {
            "p50_ms": p50 * 1e3,
            "p99_ms": statistics.quantiles(times, n=100, method="inclusive")[98] * 1e3,
            "candidates_per_s": candidates / p50,
            "speedup_over_fp32": fp32 / p50,
            "max_probability_difference": float((outputs[name] - outputs["fp32 onnx"]).abs().max()),
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "local_prod.yaml"))
    parser.add_argument("--checkpoint", help="default: the model's initial weights")
    parser.add_argument("--candidates", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op threads, each run")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--precisions", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    add_results_option(parser, "onnx_forward")
    args = parser.parse_args()

    forward, precision = {}, {}
    with tempfile.TemporaryDirectory(prefix="onnx_forward_") as tmp:
        folders, parameters = export_all(args.config, args.checkpoint, Path(tmp), args.precisions)
        on_torch = Scorer(folders["fp32 pt2"])
        print(cpu_line())
        print(f"{args.config}: {parameters:,} parameters, median of {args.rounds} rounds")
        print("threads  candidates  torch (pt2) ms  onnxruntime ms  onnxruntime / torch  max |p difference|")
        for threads in args.threads:
            torch.set_num_threads(threads)
            scorers = {name: Scorer(folder, threads=threads) for name, folder in folders.items()}
            on_onnx = scorers["fp32 onnx"]
            for n in args.candidates:
                features = {s.name: example(s.shape, s.dtype, n) for s in on_torch.inputs}
                figures = compare(on_torch, on_onnx, features, args.rounds)
                forward[f"{threads} threads, {n} candidates"] = figures
                for name, f in race(scorers, features, args.rounds).items():
                    precision[f"{threads} threads, {n} candidates, {name}"] = f
                print(
                    f"{threads:7d}  {n:10d}  {figures['torch_ms']:14.1f}  {figures['onnxruntime_ms']:14.1f}  "
                    f"{figures['onnxruntime_over_torch']:19.2f}  "
                    f"{figures['max_probability_difference']:18.1e}"
                )
    print(
        "precision: threads, candidates, program: p50 ms, p99 ms, candidates/s, speed-up over fp32, max |dp|"
    )
    for key, f in precision.items():
        print(
            f"  {key}: {f['p50_ms']:.1f}, {f['p99_ms']:.1f}, {f['candidates_per_s']:.0f}, "
            f"{f['speedup_over_fp32']:.2f}x, {f['max_probability_difference']:.1e}"
        )
    ratios = ", ".join(f"{k}: {f['onnxruntime_over_torch']:.2f}" for k, f in forward.items())
    print(f"onnx_forward: onnxruntime / torch = {ratios}")
    write_results(
        "onnx_forward", {"parameters": parameters, "forward": forward, "precision": precision}, args
    )


if __name__ == "__main__":
    main()
