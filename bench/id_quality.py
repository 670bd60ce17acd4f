"""Id tables' quality (issue 26): RCE against memory, and which defaults make id tables a gain over none.

    .venv/bin/python bench/id_quality.py --data DATA [--study memory | defaults]
        [--config configs/local_small_ids.yaml] [--steps N] [--seeds 0 1 2] [--workers 2]
        [--resamples 200] [--runs FOLDER] [--variants NAME ...] [--results PATH]

DATA is what `heavyranker data generate --config CONFIG --id-effects S --out DATA` wrote (a folder per split).
The bench counts the distinct user and author ids of DATA's train split, trains one run per variant and
seed (`heavyranker train`, one torch thread each, `--workers` at once), scores each run's last checkpoint on
the first validation split once, and compares pairs of runs of the same seed with `heavyranker compare`'s
paired bootstrap (eval/compare.py): per task, the RCE and AUROC of B - A and their 95% intervals.

- `--study memory` (bench/results/id_quality.json): no id tables; hash with 1 and with 2 hash functions and
  managed (lru, the config's min_count) with a tenth and a hundredth as many rows as distinct ids, each run
  against none, and managed against each hash at the same rows.
- `--study defaults` (bench/results/id_quality_defaults.json): the config's tables and table optimizer as
  they are, then one setting changed at a time (the tables in the dense Adam, min_count 1 and 5, tables as
  large as the distinct ids, the row-wise Adagrad's rate x4), each against none.

Runs already trained to the step (in --runs) are scored, not retrained. docs/id-embeddings.md discusses the
figures; docs/benchmarks.md shows them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from results import add_results_option, cpu_line, write_results

from heavyranker.checkpoint import resolve_checkpoint
from heavyranker.config import Config, load_config, short_names
from heavyranker.data.dataset import RecapDataset
from heavyranker.eval.compare import Scores, loaded_model, paired_bootstrap, score
from heavyranker.eval.evaluator import evaluation_tasks

REPO = Path(__file__).resolve().parents[1]
ID_FEATURES = {"users": "meta__user_id", "authors": "meta__author_id"}
NO_TABLES = ["model.large_embeddings=null", "optimizer.embedding=null"]
FRACTIONS = {"1/10": 0.1, "1/100": 0.01}
TRUSTED_POSITIVES = 200  # tasks with fewer validation positives are listed, not summarized


def data_overrides(config: Config, data: str) -> list[str]:
    """Every split of the config read from DATA/<split name>, as `data generate --out DATA` wrote them."""
    splits = ["train_data.inputs=" + os.path.join(data, "train", "*.gz")]
    return splits + [f"validation_data.{name}.inputs={data}/{name}/*.gz" for name in config.validation_data]


def step_overrides(config: Config, steps: int) -> list[str]:
    """`steps` training steps, a checkpoint at the last, no evaluation during training, and every cosine
    schedule ending at the last step (a ramp at most a tenth of the steps)."""
    sets = [
        f"training.num_train_steps={steps}",
        f"training.checkpoint_every_n={steps}",
        f"training.eval_log_every_n={10 * steps}",
        f"training.train_log_every_n={min(50, steps)}",
    ]
    rates = config.optimizer.multi_task_learning_rates
    schedules = {"backbone_learning_rate": rates.backbone_learning_rate}
    schedules |= {f"tower_learning_rates.{task}": rate for task, rate in rates.tower_learning_rates.items()}
    for path, schedule in schedules.items():
        if schedule.linear_ramp_to_cosine is not None:
            at = f"optimizer.multi_task_learning_rates.{path}.linear_ramp_to_cosine"
            ramp = min(schedule.linear_ramp_to_cosine.num_ramp_steps, max(1, steps // 10))
            sets += [f"{at}.final_num_steps={steps}", f"{at}.num_ramp_steps={ramp}"]
    return sets


def distinct_ids(config: Config) -> dict[str, int]:
    """Distinct values of each id feature in the train split (read as a validation split: once, in order)."""
    split = next(iter(config.validation_data))
    reading = config.validation_data[split].model_copy(update={"inputs": config.train_data.inputs})
    seen: dict[str, set[int]] = {table: set() for table in ID_FEATURES}
    with RecapDataset(reading) as dataset:
        for batch in dataset:
            for table, feature in ID_FEATURES.items():
                seen[table].update(batch.features[feature].reshape(-1).tolist())
    return {table: len(ids - {-1}) for table, ids in seen.items()}  # -1: the padding id


def tables(rows: dict[str, int], **mapping: object) -> str:
    """`model.large_embeddings` with a table per id feature of `rows` rows, each with `mapping`'s keys."""
    keys = "".join(f", {key}: {value}" for key, value in mapping.items())
    entries = [
        f"{{name: {table}, feature_name: {ID_FEATURES[table]}, num_embeddings: {n}, embedding_dim: 16{keys}}}"
        for table, n in rows.items()
    ]
    return "model.large_embeddings={tables: [" + ", ".join(entries) + "]}"


def shipped_tables(config: Config, **changes: object) -> str:
    """The config's `model.large_embeddings` with `changes` to every table (--set cannot reach into lists)."""
    entries = [
        "{"
        + ", ".join(
            f"{k}: {v}" for k, v in {**table.model_dump(mode="json"), **changes}.items() if v is not None
        )
        + "}"
        for table in config.model.large_embeddings.tables
    ]
    return "model.large_embeddings={tables: [" + ", ".join(entries) + "]}"


def memory_study(config: Config, distinct: dict[str, int]) -> tuple[dict, list[tuple[str, str]]]:
    """Variants (name -> overrides) and the pairs (A, B) compared."""
    managed = config.model.large_embeddings.tables[0]
    variants: dict[str, list[str]] = {"none": NO_TABLES}
    pairs = []
    for label, fraction in FRACTIONS.items():
        rows = {table: max(2, round(n * fraction)) for table, n in distinct.items()}
        variants[f"hash1 {label}"] = [tables(rows, id_mapping="hash", num_hashes=1)]
        variants[f"hash2 {label}"] = [tables(rows, id_mapping="hash", num_hashes=2)]
        variants[f"managed {label}"] = [
            tables(rows, id_mapping="managed", min_count=managed.min_count, eviction="lru")
        ]
        pairs += [("none", f"{kind} {label}") for kind in ("hash1", "hash2", "managed")]
        pairs += [(f"hash{k} {label}", f"managed {label}") for k in (1, 2)]
    return variants, pairs


def defaults_study(config: Config, distinct: dict[str, int]) -> tuple[dict, list[tuple[str, str]]]:
    shipped = config.model.large_embeddings.tables
    rate = config.optimizer.embedding.learning_rate
    variants = {
        "none": NO_TABLES,
        "shipped": [],
        "dense adam": ["optimizer.embedding=null"],
        "min_count 1": [shipped_tables(config, min_count=1)],
        "min_count 5": [shipped_tables(config, min_count=5)],
        # A row per distinct id, and row 0 (the default row) besides.
        "full size": [
            tables({t.name: distinct[t.name] + 1 for t in shipped}, id_mapping="managed", min_count=2)
        ],
        f"rate {rate * 4:g}": [f"optimizer.embedding.learning_rate={rate * 4}"],
    }
    return variants, [("none", name) for name in variants if name != "none"]


STUDIES = {"memory": memory_study, "defaults": defaults_study}


def train(config_path: str, sets: list[str], folder: Path, steps: int) -> None:
    """`heavyranker train` in its own process with one torch thread (two threads on a loaded machine ran
    thirty times slower), unless the folder already holds the last step's checkpoint."""
    done = folder / "checkpoints" / f"step_{steps}.pt"
    if done.exists():
        return
    command = [sys.executable, "-m", "heavyranker", "train", "--config", config_path]
    command += [arg for s in [*sets, f"training.save_dir={folder}"] for arg in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = folder.parent / f"{folder.name}.log"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)


def scored(config_path: str, sets: list[str], folder: Path) -> Scores:
    config = load_config(config_path, sets)
    split = next(iter(config.validation_data))
    data = config.validation_data[split]
    tasks = evaluation_tasks(config, data)
    (scores,) = score(config, [loaded_model(config, data, tasks, str(folder), None)], data)
    return scores


def comparison(a: Scores, b: Scores, tasks: list[str], resamples: int, seed: int) -> dict[str, dict]:
    rows = paired_bootstrap(a, b, resamples, seed)
    out = {}
    for j, (task, row) in enumerate(zip(tasks, rows, strict=True)):
        rce, auroc = row["rce"], row["auroc"]
        out[task] = {
            "positives": int(a.labels[:, j].sum()),
            "rce_a": rce.a,
            "rce_b": rce.b,
            "rce_delta": rce.b - rce.a,
            "rce_low": rce.low,
            "rce_high": rce.high,
            "auroc_delta": auroc.b - auroc.a,
            "auroc_low": auroc.low,
            "auroc_high": auroc.high,
        }
    return out


def summarize(per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    """Per task: the mean RCE difference over seeds, and on how many seeds its interval was above, below 0."""
    summary = {}
    for task in per_seed[0]:
        rows = [seed[task] for seed in per_seed]
        summary[task] = {
            "positives": rows[0]["positives"],
            "rce_delta_mean": float(np.mean([r["rce_delta"] for r in rows])),
            "rce_delta_min": float(min(r["rce_delta"] for r in rows)),
            "rce_delta_max": float(max(r["rce_delta"] for r in rows)),
            "seeds_above_0": sum(r["rce_low"] > 0 for r in rows),
            "seeds_below_0": sum(r["rce_high"] < 0 for r in rows),
        }
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="what `data generate --id-effects S --out DATA` wrote")
    parser.add_argument("--study", choices=list(STUDIES), default="memory")
    parser.add_argument("--config", default=str(REPO / "configs" / "local_small_ids.yaml"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2, help="trainings at once")
    parser.add_argument("--resamples", type=int, default=200, help="of each paired bootstrap")
    parser.add_argument("--runs", help="where the runs go (default: a temporary folder, removed)")
    parser.add_argument("--variants", nargs="+", help="only these of the study's variants (default: all)")
    add_results_option(parser, "id_quality")
    args = parser.parse_args()
    if args.study == "defaults" and args.results == parser.get_default("results"):
        args.results = args.results.with_name("id_quality_defaults.json")
    torch.set_num_threads(1)
    print(cpu_line())
    base = data_overrides(load_config(args.config), os.path.abspath(args.data))
    config = load_config(args.config, base)
    distinct = distinct_ids(config)
    print("distinct ids in the train split:", distinct)
    variants, pairs = STUDIES[args.study](config, distinct)
    if args.variants:
        variants = {name: sets for name, sets in variants.items() if name in args.variants}
        pairs = [(a, b) for a, b in pairs if a in variants and b in variants]
    common = base + step_overrides(config, args.steps)
    with tempfile.TemporaryDirectory(prefix="id_quality_") as tmp:
        runs = Path(args.runs or tmp)

        def folder(name: str, seed: int) -> Path:
            return runs / f"{name.replace(' ', '_').replace('/', 'of').replace('.', '_')}-s{seed}"

        jobs = [(name, seed) for seed in args.seeds for name in variants]
        with ThreadPoolExecutor(args.workers) as pool:
            for job in [
                pool.submit(
                    train,
                    args.config,
                    [*common, *variants[n], f"training.seed={s}"],
                    folder(n, s),
                    args.steps,
                )
                for n, s in jobs
            ]:
                job.result()
        scores = {(n, s): scored(args.config, [*common, *variants[n]], folder(n, s)) for n, s in jobs}
        for n, s in jobs:
            resolve_checkpoint(folder(n, s))  # every run reached its checkpoint
    tasks = short_names(evaluation_tasks(config, config.validation_data[next(iter(config.validation_data))]))
    task_names = [tasks[t] for t in tasks]
    comparisons = {}
    for a, b in pairs:
        per_seed = [comparison(scores[a, s], scores[b, s], task_names, args.resamples, s) for s in args.seeds]
        comparisons[f"{b} - {a}"] = summarize(per_seed)
        print(
            f"\n{b} - {a}: RCE points, mean over seeds {args.seeds} [min, max]; seeds with interval > 0 / < 0"
        )
        for task, row in comparisons[f"{b} - {a}"].items():
            print(
                f"  {task:<48} {row['positives']:>6} {row['rce_delta_mean']:+7.2f} "
                f"[{row['rce_delta_min']:+.2f}, {row['rce_delta_max']:+.2f}] "
                f"{row['seeds_above_0']}/{row['seeds_below_0']}"
            )
    figures = {
        "study": args.study,
        "distinct_ids": distinct,
        "train_steps": args.steps,
        "variants": {name: " ".join(sets) or "(the config as it is)" for name, sets in variants.items()},
        # The tasks with enough positives for the bootstrap to be trusted; the others are printed.
        "rce_difference": {
            pair: {task: row for task, row in rows.items() if row["positives"] >= TRUSTED_POSITIVES}
            for pair, rows in comparisons.items()
        },
    }
    write_results("id_quality", figures, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
