"""Does the data pipeline hide behind the model? Training examples/s of configs/local_prod.yaml at batch 128
reading generated TFRecord files, against the same trainer's step rate on batches already in memory,
measured in the same run, plus peak RSS.

    .venv/bin/python bench/train_throughput.py [--steps 10] [--rounds 8] [--examples 4000] [--same-priority]

Each round measures in memory, then streamed, back to back; the printed ratio is the median over rounds of
streamed / in-memory examples/s (the machine's speed drifts between rounds far more than within one).
The aim is >= 0.95. --same-priority runs the data threads at the model's priority instead of nice 19, to
see what that choice buys. The summary goes to bench/results/train_throughput.json (--results).
"""

from __future__ import annotations

import argparse
import itertools
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from results import add_results_option, write_results

from heavyranker.config import load_config
from heavyranker.data import dataset as dataset_module
from heavyranker.data.dataset import RecapDataset
from heavyranker.data.synthetic import generate_for_config
from heavyranker.memory import keep_freed_memory
from heavyranker.train.loop import Trainer

REPO = Path(__file__).resolve().parents[1]


def examples_per_second(trainer: Trainer, batches, steps: int) -> float:
    start = time.perf_counter()
    examples = sum(trainer.train_step(batches)[2] for _ in range(steps))
    return examples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "configs/local_prod.yaml"))
    parser.add_argument("--steps", type=int, default=10, help="steps per measurement")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--examples", type=int, default=4000, help="generated training rows")
    parser.add_argument("--set", action="append", default=[], help="a config override, as on the CLI")
    parser.add_argument(
        "--same-priority", action="store_true", help="data threads at the model's priority (not nice 19)"
    )
    add_results_option(parser, "train_throughput")
    args = parser.parse_args()
    keep_freed_memory()  # as `heavyranker train` does
    if args.same_priority:
        dataset_module._yield_to_the_model = lambda: None
    with tempfile.TemporaryDirectory() as tmp:
        base = load_config(args.config)
        generate_for_config(base, out=f"{tmp}/data", examples=args.examples, files=4, seed=0)
        config = load_config(
            args.config,
            [
                f"train_data.inputs={tmp}/data/train/*.gz",
                f"training.save_dir={tmp}/run",
                "train_data.global_batch_size=128",
                "validation_data={}",
                *args.set,
            ],
        )
        trainer = Trainer(config)
        trainer.model.train()
        dataset = RecapDataset(config.train_data, seed=0, training=True)
        streamed = iter(dataset)
        in_memory = itertools.cycle([next(streamed) for _ in range(8)])
        examples_per_second(trainer, streamed, 3)  # warm-up: buffers filled, kernels chosen
        rates: dict[str, list[float]] = {"streamed": [], "in memory": []}
        for _ in range(args.rounds):
            rates["in memory"].append(examples_per_second(trainer, in_memory, args.steps))
            rates["streamed"].append(examples_per_second(trainer, streamed, args.steps))
        dataset.close()
    median = {k: statistics.median(v) for k, v in rates.items()}
    ratios = [s / m for s, m in zip(rates["streamed"], rates["in memory"], strict=True)]
    ratio = statistics.median(ratios)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 128, {args.steps} steps x "
        f"{args.rounds} rounds, data threads at {'the same priority' if args.same_priority else 'nice 19'}"
    )
    for name, value in median.items():
        print(f"{name:>10}: {value:8.1f} examples/s (rounds: {', '.join(f'{r:.1f}' for r in rates[name])})")
    print(f"peak RSS: {peak_rss_mib:.0f} MiB")
    print(f"streamed / in-memory: {ratio:.3f} (aim >= 0.95; rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
    figures = {
        "threads": torch.get_num_threads(),
        "examples_per_s": median,
        "examples_per_s_rounds": rates,
        "peak_rss_mib": peak_rss_mib,
        "streamed_over_in_memory": ratio,
        "streamed_over_in_memory_rounds": ratios,
    }
    write_results("train_throughput", figures, args)


if __name__ == "__main__":
    main()
