"""Training and inference speed of the ranker on CPU, against the matmul-bound limit measured in the same run.

    .venv/bin/python bench/model_step.py [--config configs/local_prod.yaml] [--batch 128] [--threads N]
                                         [--precision fp32|bf16] [--profile] [--glibc-default]
                                         [--results PATH]

limit (examples/s) = GFLOP/s of a large fp32 matmul (torch.mm: MKL) / training FLOPs per example, where
training FLOPs = 3 x forward matmul FLOPs (counted by torch.utils.flop_counter: 2 per multiply-add). The
same large matmul on oneDNN is printed too, with every ratio against it: oneDNN runs it faster here.
Each round times the large matmuls, then a step of every variant in turn; only quiet measurements count
(see `report`). Variants, on the same weights:
  plain Adam             torch.optim.Adam over the model's param groups (one per tower, one for the rest)
  build_optimizer        the project's optimizer (fused Adam, the same groups): what training runs
  ..., MKL products      the same on the model built with matmul="aten": every layer through F.linear
  matmuls alone          the products of one build_optimizer step (forward and backward), recorded with
                         their operands and replayed as the step calls them, with nothing in between
No step made of these products beats `matmuls alone`; the ceiling line adds build_optimizer's measured
update, which every Adam step makes (memory bound: 7 fp32 reads and writes per parameter). Merging
products (the four mask blocks' first layers, or the ten towers, as one matmul each) measured no faster
per FLOP here. The summary goes to bench/results/model_step.json (--results).

--precision bf16 (training.precision: bf16): the large matmuls in bf16 too, and the variants are the fp32
step (oneDNN products), the bf16 step (bf16 autocast, oneDNN products: what training runs), the same on MKL
(aten) products, and the bf16 step's products alone; each bf16 variant against the bf16 matmul rates. The
summary goes to bench/results/model_step_bf16.json by default.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from results import RESULTS, add_results_option, cpu_line, write_results
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from heavyranker.config import load_config
from heavyranker.data.columns import feature_specs
from heavyranker.memory import keep_freed_memory
from heavyranker.model import build_model, linear
from heavyranker.train.loss import build_loss
from heavyranker.train.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]
QUIET = 0.9  # a measurement counts if the process had 90% of its threads' CPU time meanwhile
T = TypeVar("T")


def random_features(
    shapes: dict[str, tuple[int, ...]], batch: int, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    features = {}
    for name, shape in shapes.items():
        size = (batch, *shape)
        if name == "continuous":
            features[name] = torch.randn(size, generator=gen).exp() * torch.randint(
                -1, 2, size, generator=gen
            )
        elif name == "binary":
            features[name] = torch.randint(0, 2, size, generator=gen).float()
        elif name == "discrete" or name.startswith("meta__"):
            features[name] = torch.randint(0, 300, size, generator=gen)
        else:
            features[name] = torch.randn(size, generator=gen)
    return features


def matmul_gflops(n: int, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """GFLOP/s of an n x n x n product on torch.mm (MKL in fp32) and on oneDNN's linear kernel (0 without
    it), in `dtype`."""
    a, b, out = (torch.randn(n, n).to(dtype) for _ in range(3))

    def rate(product: Callable[[], object]) -> float:
        product()
        start = time.perf_counter()
        product()
        return 2 * n**3 / (time.perf_counter() - start) / 1e9

    # into a warm buffer: a fresh 64 MiB output would time its page faults too
    mkl = rate(lambda: torch.mm(a, b, out=out))
    if not linear.HAS_ONEDNN:
        return mkl, 0.0
    return mkl, rate(lambda: linear.onednn_linear(a, b, None))


class MatmulRecorder(TorchDispatchMode):
    """Records each matrix product that runs under it (forward and backward), with copies of its operands
    in the same memory layout, so the same products can be timed on their own."""

    MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) + (
        (torch.ops.mkldnn._linear_pointwise.default,) if linear.HAS_ONEDNN else ()
    )

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch._ops.OpOverload, list, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.MATMULS:
            operands = [
                torch.empty_strided(a.shape, a.stride(), dtype=a.dtype).copy_(a)
                if isinstance(a, torch.Tensor)
                else a
                for a in args
            ]
            self.calls.append((func, operands, kwargs))
        return func(*args, **kwargs)


def replay_matmuls(calls: list[tuple[torch._ops.OpOverload, list, dict]]) -> Callable[[], list[float]]:
    """A step of only the recorded products, each allocating its output as in the step."""

    def step() -> list[float]:
        start = time.perf_counter()
        for func, args, kwargs in calls:
            func(*args, **kwargs)
        return [time.perf_counter() - start]

    return step


def timed(model: torch.nn.Module, features: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    model(features)
    return time.perf_counter() - start


def forward_flops(model: torch.nn.Module, features: dict[str, torch.Tensor]) -> int:
    """Of a model built with matmul="aten": the counter knows aten's matmuls, not oneDNN's kernel."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(features)
    return counter.get_total_flops()


def train_step_times(model, optimizer, loss_fn, features, labels, weights, bf16: bool = False) -> list[float]:
    """Forward, backward and optimizer seconds of one step; with bf16, the forward under bf16 autocast as
    training.precision: bf16 runs it (train/loop.py)."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(features)
    loss, _ = loss_fn(out["logits"].float(), labels, weights)
    forward = time.perf_counter()
    loss.backward()
    backward = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    end = time.perf_counter()
    return [forward - start, backward - forward, end - backward]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "configs/local_prod.yaml"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--inference-batch", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1, help="training steps per variant and round")
    parser.add_argument("--matmul-size", type=int, default=4096, help="n of the large n x n x n matmul")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="training.precision")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print torch.profiler's table of 3 steps, then each op's wall time (OpTimer)",
    )
    parser.add_argument(
        "--glibc-default",
        action="store_true",
        help="leave glibc's heap trimming on, as without `heavyranker train` (for comparison)",
    )
    add_results_option(parser, "model_step")
    args = parser.parse_args()
    bf16 = args.precision == "bf16"
    if bf16 and args.results == RESULTS / "model_step.json":
        args.results = RESULTS / "model_step_bf16.json"
    if not args.glibc_default:
        keep_freed_memory()  # as `heavyranker train` does
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    config = load_config(args.config)
    specs = feature_specs(config.train_data)
    shapes = {name: spec.shape for name, spec in specs.items()}
    # oneDNN products whatever this CPU's default (model/linear.py), so that the variants compare kernels
    model = build_model(
        config.model, specs, config.train_data.tasks, matmul="onednn" if linear.HAS_ONEDNN else "aten"
    )
    # the same weights, every product on F.linear
    on_aten = build_model(config.model, specs, config.train_data.tasks, matmul="aten")
    on_aten.load_state_dict(model.state_dict())
    loss_fn = build_loss(config.model)
    features = random_features(shapes, args.batch, gen)
    tasks = len(config.task_names)
    labels = torch.randint(0, 2, (args.batch, tasks), generator=gen).float()
    weights = torch.ones(args.batch, tasks)

    flops_per_example = 3 * forward_flops(on_aten, features) / args.batch
    groups = [{"params": p} for p in model.tower_parameters().values()]
    in_towers = {id(p) for g in groups for p in g["params"]}
    groups.append({"params": [p for p in model.parameters() if id(p) not in in_towers]})
    adam = config.optimizer.adam
    plain = torch.optim.Adam(groups, lr=1e-4, betas=(adam.beta_1, adam.beta_2), eps=adam.epsilon)
    fused = build_optimizer(config.optimizer, model)[0]
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.config}: {params:,} parameters, {flops_per_example / 1e6:.1f} training MFLOP/example, "
        f"batch {args.batch}, {torch.get_num_threads()} threads, {args.precision}"
    )
    print(cpu_line())
    if args.profile:
        profile(model, fused, loss_fn, features, labels, weights, bf16)
        return 0

    def step(
        net: torch.nn.Module, optimizer: torch.optim.Optimizer, bf16: bool = False
    ) -> Callable[[], list[float]]:
        return lambda: train_step_times(net, optimizer, loss_fn, features, labels, weights, bf16)

    model.train()
    on_aten.train()
    recorder = MatmulRecorder()
    with recorder:
        step(model, fused, bf16)()
    on_aten_optimizer = build_optimizer(config.optimizer, on_aten)[0]
    if bf16:
        variants = {"fp32": step(model, fused), "bf16": step(model, fused, True)}
        variants["bf16, MKL products"] = step(on_aten, on_aten_optimizer, True)
        variants["bf16 matmuls alone"] = replay_matmuls(recorder.calls)
    else:
        variants = {"plain Adam": step(model, plain), "build_optimizer": step(model, fused)}
        variants["build_optimizer, MKL products"] = step(on_aten, on_aten_optimizer)
        variants["matmuls alone"] = replay_matmuls(recorder.calls)
    figures = {
        "parameters": params,
        "training_mflop_per_example": flops_per_example / 1e6,
        "threads": torch.get_num_threads(),
        **report(args, flops_per_example, variants),
    }
    if bf16:
        figures["bf16_over_fp32"] = (
            figures["train"]["bf16"]["examples_per_s"] / figures["train"]["fp32"]["examples_per_s"]
        )
        print(f"bf16 / fp32 training examples/s: {figures['bf16_over_fp32']:.2f}")

    model.eval()
    batch = random_features(shapes, args.inference_batch, gen)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(batch)
        measured = [quietly(lambda: timed(model, batch)) for _ in range(args.rounds)]
    rate = args.inference_batch / statistics.median(_quiet(measured))
    print(f"inference: {rate:.0f} examples/s at batch {args.inference_batch} ({_counted(measured)})")
    figures["inference"] = {"examples_per_s": rate, **_quiet_count(measured)}
    write_results("model_step", figures, args)
    return 0


def report(
    args, flops_per_example: float, variants: dict[str, Callable[[], list[float]]]
) -> dict[str, object]:
    """Rounds of: the large matmuls, then a step of each variant in turn. Only quiet measurements count:
    those during which this process got its threads' worth of CPU time (a neighbour taking a core stalls
    every parallel region of a step, far more than it slows one big matmul). Prints, per variant, the median
    quiet step against the median quiet matmul rates (all measurements if none was quiet), then the
    ceiling: the matmuls alone plus build_optimizer's update. Returns the same figures."""
    for step in variants.values():
        step(), step()  # warm-up: allocations, optimizer state
    dtypes = [torch.float32] + ([torch.bfloat16] if args.precision == "bf16" else [])
    matmuls: list[tuple[tuple[float, ...], float]] = []
    steps: dict[str, list[tuple[list[float], float]]] = {label: [] for label in variants}
    for _ in range(args.rounds):
        matmuls.append(quietly(lambda: sum((matmul_gflops(args.matmul_size, d) for d in dtypes), ())))
        for label, step in variants.items():
            steps[label] += [quietly(step) for _ in range(args.steps)]
    rates = [statistics.median(m[i] for m in _quiet(matmuls)) for i in range(2 * len(dtypes))]
    limits = {"fp32": rates[:2], "bf16": rates[2:]}
    for name, (mkl, onednn) in ((n, r) for n, r in limits.items() if r):
        print(
            f"large matmul, {name}: {mkl:.0f} GFLOP/s (torch.mm), {onednn:.0f} GFLOP/s (oneDNN) "
            f"({_counted(matmuls)})"
        )

    def against_limits(seconds: float, label: str) -> dict[str, float | None]:
        mkl, onednn = limits["bf16" if label.startswith("bf16") else "fp32"]
        rate = args.batch / seconds
        gflops = rate * flops_per_example / 1e9
        return {
            "examples_per_s": rate,
            "of_matmul_limit": gflops / mkl,
            "of_onednn_matmul_limit": gflops / onednn if onednn else None,
        }

    def line(f: dict[str, float | None]) -> str:
        text = f"{f['examples_per_s']:.0f} examples/s, {f['of_matmul_limit']:.2f} of the matmul-bound limit"
        if f["of_onednn_matmul_limit"] is not None:
            text += f" [{f['of_onednn_matmul_limit']:.2f} against oneDNN's]"
        return text

    phases: dict[str, list[float]] = {}
    train: dict[str, dict[str, object]] = {}
    for label, measured in steps.items():
        times = _quiet(measured)
        phases[label] = [statistics.median(t[i] for t in times) for i in range(len(times[0]))]
        train[label] = against_limits(statistics.median(sum(t) for t in times), label) | _quiet_count(
            measured
        )
        detail = ""
        if len(phases[label]) == 3:
            fwd, bwd, opt = (1e3 * t for t in phases[label])
            train[label] |= {"forward_ms": fwd, "backward_ms": bwd, "optimizer_ms": opt}
            detail = f"forward {fwd:.0f} ms, backward {bwd:.0f} ms, optimizer {opt:.0f} ms per step; "
        print(f"train ({label}): {line(train[label])} ({detail}{_counted(measured)})")
    alone, stepped = (
        ("bf16 matmuls alone", "bf16") if "bf16" in variants else ("matmuls alone", "build_optimizer")
    )
    ceiling = against_limits(phases[alone][0] + phases[stepped][2], stepped)
    print(f"ceiling ({alone} + {stepped}'s update): {line(ceiling)}")
    gflops = {
        f"{name} {kernel}": rate or None
        for name, pair in limits.items()
        for kernel, rate in zip(("torch.mm", "onednn"), pair, strict=False)
    }
    return {
        "large_matmul_gflops": {**gflops, **_quiet_count(matmuls)},
        "train": train,
        "ceiling": ceiling,
    }


def quietly(measure: Callable[[], T]) -> tuple[T, float]:
    """measure()'s result and the share of this process's threads' CPU time it got meanwhile."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = measure()
    share = (time.process_time() - cpu) / (time.perf_counter() - wall) / torch.get_num_threads()
    return result, share


def _quiet(measured: list[tuple[T, float]]) -> list[T]:
    return [m for m, share in measured if share >= QUIET] or [m for m, _ in measured]


def _counted(measured: list[tuple[T, float]]) -> str:
    return "{quiet} of {measured} quiet".format(**_quiet_count(measured))


def _quiet_count(measured: list[tuple[T, float]]) -> dict[str, int]:
    return {"quiet": sum(share >= QUIET for _, share in measured), "measured": len(measured)}


class OpTimer(TorchDispatchMode):
    """Wall time of each aten op that runs under it, by op and by op with its first two operands' shapes and
    dtypes. Why beside torch.profiler: under the profiler a bf16 step of local_prod took 2.7x as long on an
    AMX CPU (its casts 5x), so its shares were not the step's; this adds a few microseconds per op."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: Counter[tuple[str, str]] = Counter()
        self.calls: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        operands = [f"{tuple(a.shape)} {str(a.dtype)[6:]}" for a in args if isinstance(a, torch.Tensor)][:2]
        key = (str(func), ", ".join(operands))
        self.seconds[key] += time.perf_counter() - start
        self.calls[key] += 1
        return out

    def print_table(self, steps: int, rows: int = 25) -> None:
        by_op: Counter[str] = Counter()
        for (op, _), seconds in self.seconds.items():
            by_op[op] += seconds
        print(f"per step: {1e3 * sum(by_op.values()) / steps:.1f} ms in aten ops; by op (ms):")
        for op, seconds in by_op.most_common(rows // 2):
            print(f"  {1e3 * seconds / steps:8.1f}  {op}")
        print("by op and operands (ms, calls per step):")
        for key, seconds in self.seconds.most_common(rows):
            print(f"  {1e3 * seconds / steps:8.1f} {self.calls[key] // steps:4d}  {key[0]} {key[1]}")


def profile(model, optimizer, loss_fn, features, labels, weights, bf16: bool) -> None:
    model.train()
    for _ in range(2):
        train_step_times(model, optimizer, loss_fn, features, labels, weights, bf16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            train_step_times(model, optimizer, loss_fn, features, labels, weights, bf16)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    timer = OpTimer()
    with timer:
        for _ in range(3):
            train_step_times(model, optimizer, loss_fn, features, labels, weights, bf16)
    timer.print_table(steps=3)


if __name__ == "__main__":
    sys.exit(main())
