"""Training speed of configs/local_prod.yaml on one CUDA GPU: fp32 (TF32 matmuls) against bfloat16 autocast
(`heavyranker train --amp`), each against the matmul-bound limit measured in the same run.

    .venv/bin/python bench/gpu_train.py [--config configs/local_prod.yaml] [--batch 128 2048] [--steps 300]

Each step is the Trainer's own (forward, multi-task loss, backward, fused Adam, learning-rate schedules, the
non-finite check) on one batch already on the GPU: random features of the config's shapes, so the figure is
the model's; whether the data pipeline keeps up is bench/train_throughput.py's question.

limit (examples/s) = GFLOP/s of a large matmul in the same precision / training FLOPs per example, where
training FLOPs are those of one forward and backward, counted by torch.utils.flop_counter (2 per
multiply-add). ratio = examples/s / limit: how close the step comes to a GPU that only did matmuls.
The summary goes to bench/results/gpu_train.json (--results). Without a CUDA GPU it says so, writes nothing
and exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_step import random_features  # noqa: E402
from results import add_results_option, write_results  # noqa: E402

from heavyranker.config import load_config  # noqa: E402
from heavyranker.data.batch import Batch  # noqa: E402
from heavyranker.data.shapes import feature_shapes  # noqa: E402
from heavyranker.runtime import Runtime  # noqa: E402
from heavyranker.train.loop import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def random_batch(config, batch: int, device: torch.device) -> Batch:
    gen = torch.Generator().manual_seed(0)
    features = random_features(feature_shapes(config.train_data), batch, gen)
    tasks = tuple(config.train_data.tasks)
    labels = (torch.rand(batch, len(tasks), generator=gen) < 0.1).float()
    return Batch(features, labels, torch.ones_like(labels), tasks).to(device)


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int = 8192, reps: int = 20) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def training_flops_per_example(trainer: Trainer, batch: Batch) -> float:
    """Forward and backward of one batch; the optimizer's elementwise work is not counted."""
    columns = batch.columns(trainer.model.task_names)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(batch.labels.device.type, dtype=torch.bfloat16, enabled=trainer.amp):
            logits = trainer.model(batch.features)["logits"]
        total, _ = trainer.loss_fn(logits.float(), batch.labels[:, columns], batch.weights[:, columns])
        total.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(batch)


def measure(config, batch_size: int, amp: bool, steps: int, device: torch.device) -> dict[str, float]:
    config.training.precision = "bf16" if amp else "fp32"
    trainer = Trainer(config, runtime=Runtime(0, 1, device))
    batch = random_batch(config, batch_size, device)
    flops = training_flops_per_example(trainer, batch)
    batches = itertools.repeat(batch)
    for _ in range(max(steps // 10, 2)):  # warm-up: kernels picked, allocator and optimizer state settled
        trainer._train_step(batches)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer._train_step(batches)  # the loop's own step (it syncs once per step on the non-finite check)
    _synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del trainer, batch, batches
    gflops = matmul_gflops(torch.bfloat16 if amp else torch.float32, device)
    rate = batch_size / seconds
    return {
        "examples_per_s": rate,
        "ms_per_step": 1e3 * seconds,
        "gflops": gflops,
        "peak_gib": peak,
        "mflop_per_example": flops / 1e6,
        "ratio": rate / (gflops * 1e9 / flops),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "configs/local_prod.yaml"))
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 2048], help="global batch sizes")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per measurement")
    add_results_option(parser, "gpu_train")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_train: no CUDA GPU here; this benchmark needs one (nothing measured)")
        return 0

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True  # as the trainer's runtime sets it
    torch.backends.cudnn.allow_tf32 = True
    config = load_config(args.config)
    print(f"{args.config} on {torch.cuda.get_device_name(device)}, {args.steps} steps per line")
    figures: dict[str, object] = {"gpu": torch.cuda.get_device_name(device)}
    for batch_size in args.batch:
        results = {}
        for amp in (False, True):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            r = results[amp] = measure(config, batch_size, amp, args.steps, device)
            print(
                f"batch {batch_size:>6} {'bf16 autocast' if amp else 'fp32 (TF32)  '}: "
                f"{r['examples_per_s']:>10.0f} examples/s, {r['ms_per_step']:.2f} ms/step, "
                f"{r['ratio']:.3f} of the matmul-bound limit ({r['mflop_per_example']:.1f} training "
                f"MFLOP/example, matmul {r['gflops'] / 1e3:.0f} TFLOP/s), peak memory "
                f"{r['peak_gib']:.2f} GiB"
            )
        speedup = results[True]["examples_per_s"] / results[False]["examples_per_s"]
        print(f"batch {batch_size:>6}: bf16 autocast / fp32 = {speedup:.2f}x examples/s")
        figures[f"batch {batch_size}"] = {
            "fp32 (TF32)": results[False],
            "bf16 autocast": results[True],
            "bf16_over_fp32": speedup,
        }
    write_results("gpu_train", figures, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
