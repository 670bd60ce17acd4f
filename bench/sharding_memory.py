"""The whole life of a training run with two large id tables on 2 gloo processes, replicated against sharded
(training.embedding_sharding: torchrec), in one run: the larger rank's peak resident memory.

    .venv/bin/python bench/sharding_memory.py [--config configs/local_small.yaml] [--rows 4000000]
                                              [--dim 32] [--batch 256] [--threads 1] [--results PATH]
                                              [--table-optimizer rowwise_adagrad|adagrad|sgd|adam]

Per mode, `heavyranker train --nproc 2` runs as a user runs it: the model built, 4 steps with an evaluation
and a checkpoint every 2, then a second `train` resumes from the newest checkpoint for 2 more; then
`heavyranker evaluate` reads the last checkpoint on one process. Each command's peak is the largest resident
memory of its processes (the kernel's accounting of the waited command and its descendants: wait4's
ru_maxrss), so a rank's build, steps, evaluations, checkpoints and resume are all in it. The tables' training
state (weights, gradients and their optimizer's state: Adam's two moments, or --table-optimizer's, which sets
optimizer.embedding in both modes; both tables) is given beside it: what a rank of a replicated run holds,
and what the ranks of a sharded run hold together. The config's data is generated
(local_small's synthetic data); the tables are over meta__user_id and meta__author_id. The summary goes to
bench/results/sharding_memory.json (--results).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from results import add_results_option, cpu_line, write_results

from heavyranker.config import load_config
from heavyranker.config.optimizer import TableOptimizerType
from heavyranker.data.synthetic import generate_for_config
from heavyranker.train.memory_fit import ADAM_MOMENTS, TABLE_OPTIMIZER_COPIES

REPO = Path(__file__).resolve().parents[1]
MODES = ("replicated", "torchrec")
SPLITS = ("validation", "validation_downsampled")
STEPS, MORE_STEPS = 4, 2  # evaluations and checkpoints at 2 and 4; the resume runs to 6


def overrides(data: Path, run: Path, mode: str, rows: int, steps: int, args: argparse.Namespace) -> list[str]:
    tables = ", ".join(
        f"{{name: {name}, num_embeddings: {rows}, embedding_dim: {args.dim}, feature_name: meta__{name}_id}}"
        for name in ("user", "author")
    )
    sets = [f"model.large_embeddings={{tables: [{tables}]}}", f"training.embedding_sharding={mode}"]
    sets += [f"train_data.inputs={data}/train/*.gz", f"train_data.global_batch_size={args.batch}"]
    sets += [f"validation_data.{s}.inputs={data}/{s}/*.gz" for s in SPLITS]
    sets += [f"training.save_dir={run}", f"training.num_train_steps={steps}", "training.num_eval_steps=4"]
    if args.table_optimizer is not None:
        sets.append(f"optimizer.embedding={{type: {args.table_optimizer}, learning_rate: 0.01}}")
    return sets + ["training.checkpoint_every_n=2", "training.eval_log_every_n=2"]


def peak_mib(command: list[str], threads: int) -> float:
    """The command's largest resident memory of any of its processes (MiB); fails with its output."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO / "src")}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed:\n{output[-3000:]}")
    return usage.ru_maxrss / 2**10


def one_mode(mode: str, data: Path, folder: Path, args: argparse.Namespace) -> dict[str, float]:
    heavyranker = [sys.executable, "-m", "heavyranker"]
    run = folder / mode
    figures = {}
    for name, steps in (("train", STEPS), ("resume", STEPS + MORE_STEPS)):
        sets = overrides(data, run, mode, args.rows, steps, args)
        command = [*heavyranker, "train", "--config", args.config, "--nproc", "2"]
        figures[f"{name}_peak_rss_mib"] = peak_mib(
            command + [a for s in sets for a in ("--set", s)], args.threads
        )
        print(f"{mode}: {name} to step {steps}: peak {figures[f'{name}_peak_rss_mib']:.0f} MiB", flush=True)
    sets = overrides(data, run, mode, args.rows, STEPS + MORE_STEPS, args)
    command = [*heavyranker, "evaluate", "--config", args.config, "--split", "validation"]
    figures["evaluate_peak_rss_mib"] = peak_mib(
        command + [a for s in sets for a in ("--set", s)], args.threads
    )
    print(f"{mode}: evaluate on one process: peak {figures['evaluate_peak_rss_mib']:.0f} MiB", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "configs" / "local_small.yaml"))
    parser.add_argument("--rows", type=int, default=4_000_000, help="rows of each of the two tables")
    parser.add_argument("--dim", type=int, default=32, help="a multiple of 4 (fbgemm's kernels)")
    parser.add_argument("--batch", type=int, default=256, help="global batch (both ranks)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument(
        "--table-optimizer",
        choices=[t.value for t in TableOptimizerType],
        help="optimizer.embedding's type in both modes (learning rate 0.01); default: none, the run's Adam",
    )
    add_results_option(parser, "sharding_memory")
    args = parser.parse_args()
    print(cpu_line())
    table_state = 2 * _table_state_bytes(args) / 2**20
    figures: dict = {"rows": args.rows, "dim": args.dim, "ranks": 2, "tables_training_state_mib": table_state}
    with tempfile.TemporaryDirectory(prefix="sharding_memory_") as folder:
        data = Path(folder) / "data"
        examples = max(4 * args.batch, 2048)  # fewer: a downsampled split may keep no row
        generate_for_config(load_config(args.config), out=str(data), examples=examples, files=2, seed=0)
        for mode in MODES:
            figures[mode] = one_mode(mode, data, Path(folder), args)
    figures["torchrec_over_replicated"] = {
        key: figures["torchrec"][key] / figures["replicated"][key] for key in figures["torchrec"]
    }
    write_results("sharding_memory", figures, args)


def _table_state_bytes(args: argparse.Namespace) -> int:
    """One table's weights, gradients and optimizer state (row-wise Adagrad: a float32 a row besides)."""
    kind = args.table_optimizer
    copies = 2 + (ADAM_MOMENTS if kind is None else TABLE_OPTIMIZER_COPIES[TableOptimizerType(kind)])
    per_row = args.rows * 4 if kind == TableOptimizerType.ROWWISE_ADAGRAD.value else 0
    return args.rows * args.dim * 4 * copies + per_row


if __name__ == "__main__":
    main()
