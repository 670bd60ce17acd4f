"""Training and inference speed of the ranker on CPU, against the matmul-bound limit measured in the same run.

    .venv/bin/python bench/model_step.py [--config configs/local_prod.yaml] [--batch 128] [--profile]

limit (examples/s) = GFLOP/s of a large fp32 matmul / training FLOPs per example, where training FLOPs =
3 x forward matmul FLOPs (counted by torch.utils.flop_counter: 2 per multiply-add). Each round times the
matmul, then a few steps of every variant in turn, then the matmul again (see `report`).
Variants, on the same model: plain torch.optim.Adam over the model's param groups or the project's
build_optimizer (fused Adam); the ten towers one by one or stacked (model.tower_stack, the default); and,
measured last, glibc keeping freed memory (see keep_freed_memory), which a training process can do too.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from heavyranker.config import load_config
from heavyranker.data.shapes import feature_shapes
from heavyranker.model import build_model
from heavyranker.train.loss import build_loss
from heavyranker.train.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]
QUIET = 0.85


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


def matmul_gflops(n: int = 4096) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    a @ b
    return 2 * n**3 / (time.perf_counter() - start) / 1e9


def forward_flops(model: torch.nn.Module, features: dict[str, torch.Tensor]) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(features)
    return counter.get_total_flops()


def train_step_times(model, optimizer, loss_fn, features, labels, weights) -> list[float]:
    start = time.perf_counter()
    out = model(features)
    loss, _ = loss_fn(out["logits"], labels, weights)
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
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="training steps per variant and round")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of a few steps")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    config = load_config(args.config)
    shapes = feature_shapes(config.train_data)
    model = build_model(config, shapes)
    loss_fn = build_loss(config)
    features = random_features(shapes, args.batch, gen)
    tasks = len(config.task_names)
    labels = torch.randint(0, 2, (args.batch, tasks), generator=gen).float()
    weights = torch.ones(args.batch, tasks)

    flops_per_example = 3 * forward_flops(model, features) / args.batch
    groups = [{"params": p} for p in model.tower_parameters().values()]
    in_towers = {id(p) for g in groups for p in g["params"]}
    groups.append({"params": [p for p in model.parameters() if id(p) not in in_towers]})
    adam = config.optimizer.adam
    plain = torch.optim.Adam(groups, lr=1e-4, betas=(adam.beta_1, adam.beta_2), eps=adam.epsilon)
    fused = build_optimizer(config, model)[0]
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.config}: {params:,} parameters, {flops_per_example / 1e6:.1f} training MFLOP/example, "
        f"batch {args.batch}, {torch.get_num_threads()} threads"
    )
    if args.profile:
        profile(model, fused, loss_fn, features, labels, weights)
        return 0

    def variant(optimizer: torch.optim.Optimizer, stacked: bool) -> Callable[[], list[float]]:
        stack = model.tower_stack

        def step() -> list[float]:
            model.tower_stack = stack if stacked else None
            times = train_step_times(model, optimizer, loss_fn, features, labels, weights)
            model.tower_stack = stack
            return times

        return step

    model.train()
    report(
        args,
        flops_per_example,
        {
            "plain Adam, towers one by one": variant(plain, stacked=False),
            "plain Adam": variant(plain, stacked=True),
            "build_optimizer, towers one by one": variant(fused, stacked=False),
            "build_optimizer": variant(fused, stacked=True),
        },
    )
    keep_freed_memory()  # for the rest of the process: measured last
    report(args, flops_per_example, {"build_optimizer, freed memory kept": variant(fused, stacked=True)})

    model.eval()
    batch = random_features(shapes, args.inference_batch, gen)
    with torch.inference_mode():
        model(batch)
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            model(batch)
            times.append(time.perf_counter() - start)
    rate = args.inference_batch / statistics.median(times)
    print(f"inference: {rate:.0f} examples/s at batch {args.inference_batch}")
    return 0


def report(args, flops_per_example: float, variants: dict[str, Callable[[], list[float]]]) -> None:
    """Rounds of: a matmul, a few steps of each variant in turn, a matmul. Only quiet rounds count (both
    matmuls within QUIET of the best seen; all rounds if none is): the machine is shared, and a round in
    which a neighbour took a core says nothing about the model. Prints medians over the rounds counted."""
    for step in variants.values():
        step(), step()  # warm-up: allocations, optimizer state
    gflops, times = [], {label: [] for label in variants}
    for _ in range(args.rounds):
        before = matmul_gflops()
        for label, step in variants.items():
            times[label].append([step() for _ in range(args.steps)])
        gflops.append((before, matmul_gflops()))
    best = max(max(g) for g in gflops)
    rounds = [r for r, g in enumerate(gflops) if min(g) >= QUIET * best] or list(range(args.rounds))
    print(f"matmul: best {best:.0f} GFLOP/s; {len(rounds)} of {args.rounds} rounds counted")
    for label, per_round in times.items():
        steps = [per_round[r] for r in rounds]
        rates = [args.batch / statistics.median(sum(t) for t in s) for s in steps]
        ratios = [
            rate * flops_per_example / (max(gflops[r]) * 1e9) for rate, r in zip(rates, rounds, strict=True)
        ]
        fwd, bwd, opt = (1e3 * statistics.median(t[i] for s in steps for t in s) for i in range(3))
        rate, ratio = statistics.median(rates), statistics.median(ratios)
        print(
            f"train ({label}): {rate:.0f} examples/s, {ratio:.2f} of the matmul-bound limit "
            f"(forward {fwd:.0f} ms, backward {bwd:.0f} ms, optimizer {opt:.0f} ms per step)"
        )


def keep_freed_memory() -> None:
    """glibc returns big freed blocks (> 32 MiB, e.g. the 4096 x 2048 weight's gradient) to the OS, so every
    step faults them in again (about 12k page faults, 20-30 ms of kernel time per step). Serve every
    allocation from the heap and never trim it: the memory of one step is reused by the next."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)  # a C int: 2 GiB


def profile(model, optimizer, loss_fn, features, labels, weights) -> None:
    model.train()
    for _ in range(2):
        train_step_times(model, optimizer, loss_fn, features, labels, weights)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            train_step_times(model, optimizer, loss_fn, features, labels, weights)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    sys.exit(main())
