"""Issue 27's quality protocol, one world and one setting at a time: the ranker trained with several seeds,
a logistic regression and LightGBM (the demo's, demo/baselines.py) fit once per world, all scored on a test
split; per task RCE and AUROC (mean and per seed), the RCE gap closed, its median over tasks, and compare's
paired bootstrap (95% intervals) of each seed against each baseline and against another setting's seeds.

    .venv/bin/python bench/quality_protocol.py --world holdout --data data/holdout_small --examples 400000 \
        [--setting defaults] [--config configs/local_small.yaml | runs/tune/best.yaml] [--against defaults] \
        [--seeds 0 1 2] [--runs runs/protocol] [--baseline-rows 200000] [--resamples 1000] [--set PATH=VALUE]

The test split. `tune` selects on the `validation` split, and the config's other split (downsampled) is
evaluated on is_favorited only, so the tables are scored on a third split written here: `test`, drawn like
`validation` (60,000 rows for the demo's 600,000 training rows) from the same world (the same users, authors
and truth: --world, --data-seed and --examples must be those --data was generated with), with its own rows.
It goes to --test (default RUNS/WORLD/test) once.

Run folders are RUNS/WORLD/SETTING_s<seed>; one that holds its last checkpoint is reused (bench/protocol/
run.sh trains them all first). Each seed's test predictions are kept there (test_scores.npz) for --against,
and the baselines' in RUNS/WORLD/baselines.npz. The figures go to bench/results/quality_protocol.json
(--results) under WORLD and SETTING, beside those of other worlds and settings already there.

"RCE gap closed" is (RCE - baseline's) / (truth's - baseline's), the truth being the planted probabilities
(the best achievable), as in the demo's table: n/a where the baseline is within GAP_FLOOR points of the truth.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
from results import add_results_option, write_results

from heavyranker.config import Config, load_config, short_names
from heavyranker.data.sources.files import select_files
from heavyranker.data.synthetic.holdout import WORLDS
from heavyranker.data.synthetic.layout import layout_for
from heavyranker.data.synthetic.splits import ROWS_PER_USER, VALIDATION_FRACTION, SplitPlan, _write_split
from heavyranker.data.synthetic.truth import load_truth
from heavyranker.data.synthetic.world import World
from heavyranker.demo.baselines import gradient_boosted_trees, logistic_regression, read_rows
from heavyranker.eval.compare import Scores, loaded_model, paired_bootstrap, score
from heavyranker.eval.metrics import auroc, rce
from heavyranker.train.loop import train as train_run

SPLITS = ("validation", "validation_downsampled")  # of local_small; each DATA/<split>/*.gz
BASELINES = {"logistic_regression": "logistic regression", "lightgbm": "LightGBM"}
GAP_FLOOR = 0.5  # RCE points: the demo's (demo/run.py) n/a rule
RARE_POSITIVES = 500  # the aims: RCE >= LightGBM's on every task with at least this many test positives


def data_overrides(data: Path) -> list[str]:
    return [f"train_data.inputs={data}/train/*.gz"] + [
        f"validation_data.{s}.inputs={data}/{s}/*.gz" for s in SPLITS
    ]


def run_config(args: argparse.Namespace, seed: int, split_on_test: bool = False) -> Config:
    """The setting's config at `seed` in its run folder; with split_on_test, its `validation` split reads
    the test split instead (what the tables and compare score)."""
    test = [f"validation_data.validation.inputs={args.test}/*.gz"] if split_on_test else []
    save_dir = args.runs / args.world / f"{args.setting}_s{seed}"
    overrides = [
        *data_overrides(args.data),
        *args.set,
        f"training.save_dir={save_dir}",
        f"training.seed={seed}",
    ]
    return load_config(args.config, [*overrides, *test])


def write_test_split(config: Config, args: argparse.Namespace, name: str = "test") -> None:
    """The split `name` of the world --data was drawn from (generate_for_config's World for these
    arguments), as many rows as each validation split, into args.test. Drawn under the name "validation",
    it is that split again, byte for byte (the smoke test checks that the world is the same)."""
    layout = layout_for(config.train_data, config.validation_data)
    users = max(64, args.examples // ROWS_PER_USER)
    world = World(layout, users=users, seed=args.data_seed, truth=WORLDS[args.generator])
    plan = SplitPlan(name, config.validation_data["validation"], "test", str(args.test), [""])
    rows = max(1, round(args.examples * VALIDATION_FRACTION))
    _write_split(world, plan, rows, args.files, args.data_seed)


def trained(config: Config) -> Path:
    """The run folder, trained unless it already holds its last checkpoint."""
    run = Path(config.training.save_dir)
    if not (run / "checkpoints" / f"step_{config.training.num_train_steps}.pt").is_file():
        train_run(config)  # what `heavyranker train` runs
    return run


def test_scores(args: argparse.Namespace, seed: int) -> Scores:
    """The seed's newest checkpoint scored on the test split, kept in its run folder as test_scores.npz."""
    config = run_config(args, seed, split_on_test=True)
    run = trained(run_config(args, seed))
    data = config.validation_data["validation"]
    (scores,) = score(config, [loaded_model(config, data, config.task_names, str(run), None)], data)
    np.savez(run / "test_scores.npz", labels=scores.labels, probs=scores.probs, weights=scores.weights)
    return scores


def saved_scores(run: Path) -> Scores:
    with np.load(run / "test_scores.npz") as z:
        return Scores(run, -1, z["labels"], z["probs"], z["weights"])


def fitted_baselines(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """The logistic regression's and LightGBM's test predictions and the test labels they were scored
    with, fit once per world on the first --baseline-rows training rows (cached: RUNS/WORLD/baselines.npz)."""
    cache = args.runs / args.world / "baselines.npz"
    if not cache.is_file():
        config = run_config(args, 0, split_on_test=True)
        train = read_rows(config, config.train_data, args.baseline_rows)
        test = read_rows(config, config.validation_data["validation"])
        probs = {
            "labels": test.labels,
            "logistic_regression": logistic_regression(config.task_names, train, test),
            "lightgbm": gradient_boosted_trees(config.task_names, train, test, seed=0),
        }
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **probs)
    with np.load(cache) as z:
        return {name: z[name] for name in z.files}


def baseline_scores(args: argparse.Namespace, reference: Scores) -> dict[str, Scores]:
    """The baselines' predictions as compare's Scores, on the rows of the ranker's `reference`."""
    fitted = fitted_baselines(args)
    if not np.array_equal(fitted["labels"], reference.labels):
        raise SystemExit("the baselines' test rows differ from the ranker's (order or content)")
    return {
        name: Scores(Path(label), -1, reference.labels, fitted[name].astype(np.float32), reference.weights)
        for name, label in BASELINES.items()
    }


def gap_closed(value: float, best: float, baseline: float) -> float | None:
    """Percent of the RCE gap between the baseline and the truth closed; None (n/a) near the truth."""
    gap = best - baseline
    return round(100 * (value - baseline) / gap, 1) if gap > GAP_FLOOR else None


def versus(ours: list[Scores], other: list[Scores], resamples: int) -> list[str]:
    """Per task, "+up -down": ours' seeds whose RCE is above / below `other`'s (its seed of the same
    position, or its one run) beyond the 95% interval of compare's paired bootstrap."""
    counts = [[0, 0] for _ in range(ours[0].labels.shape[1])]
    for i, b in enumerate(ours):
        a = other[i] if len(other) > 1 else other[0]
        for j, row in enumerate(paired_bootstrap(a, b, resamples)):
            d = row["rce"]
            counts[j][0] += d.significant and d.b > d.a
            counts[j][1] += d.significant and d.b < d.a
    return [f"+{up} -{down}" for up, down in counts]


def metric(scores: Scores, j: int) -> tuple[float, float]:
    y, p, w = scores.labels[:, j], scores.probs[:, j], scores.weights[:, j]
    return rce(y, p, w), auroc(y, p, w)


def median(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return round(statistics.median(defined), 1) if defined else None


def table(
    args: argparse.Namespace,
    tasks: list[str],
    runs: list[Scores],
    baselines: dict[str, Scores],
    against: dict[str, list[Scores]],
) -> dict[str, Any]:
    """The setting's figures: per task, then the medians and the aims."""
    truth = load_truth(select_files(run_config(args, 0, split_on_test=True).validation_data["validation"]))
    best_probs, truth_labels = truth.probabilities(tasks), truth.labels(tasks)
    # The same rows in another order (the reader interleaves files): the truth is scored on its own labels.
    if not np.array_equal(truth_labels.sum(axis=0), runs[0].labels.sum(axis=0)):
        raise SystemExit("the truth sidecars' labels differ from the test split's rows")
    vs = {name: versus(runs, [b], args.resamples) for name, b in baselines.items()}
    vs |= {name: versus(runs, theirs, args.resamples) for name, theirs in against.items()}
    names, per_task = short_names(tasks), {}
    for j, task in enumerate(tasks):
        best = rce(truth_labels[:, j], best_probs[:, j])
        seeds = [metric(run, j) for run in runs]
        ranker = statistics.fmean(r for r, _ in seeds)
        base = {name: metric(b, j) for name, b in baselines.items()}
        logreg, lightgbm = base["logistic_regression"][0], base["lightgbm"][0]
        per_task[names[task]] = {
            "positives": int(runs[0].labels[:, j].sum()),
            "truth_rce": round(best, 3),
            "logistic_regression_rce": round(logreg, 3),
            "lightgbm_rce": round(lightgbm, 3),
            "rce": round(ranker, 3),
            "rce_per_seed": [round(r, 3) for r, _ in seeds],
            "auroc": round(statistics.fmean(a for _, a in seeds), 4),
            "auroc_per_seed": [round(a, 4) for _, a in seeds],
            "logistic_regression_auroc": round(base["logistic_regression"][1], 4),
            "lightgbm_auroc": round(base["lightgbm"][1], 4),
            "gap_closed_vs_logistic_regression": gap_closed(ranker, best, logreg),
            "lightgbm_gap_closed_vs_logistic_regression": gap_closed(lightgbm, best, logreg),
            "gap_closed_vs_lightgbm": gap_closed(ranker, best, lightgbm),
            **{f"seeds_above_below_{name}": counts[j] for name, counts in vs.items()},
        }
    rows = per_task.values()
    return {
        "seeds": args.seeds,
        "config": str(args.config),
        "test_rows": len(runs[0].labels),
        "resamples": args.resamples,
        "tasks": per_task,
        "median_gap_closed_vs_logistic_regression": median(
            [r["gap_closed_vs_logistic_regression"] for r in rows]
        ),
        "lightgbm_median_gap_closed_vs_logistic_regression": median(
            [r["lightgbm_gap_closed_vs_logistic_regression"] for r in rows]
        ),
        "median_gap_closed_vs_lightgbm": median([r["gap_closed_vs_lightgbm"] for r in rows]),
        "tasks_below_lightgbm_with_500_positives": [
            t
            for t, r in per_task.items()
            if r["positives"] >= RARE_POSITIVES and r["rce"] < r["lightgbm_rce"]
        ],
        "tasks_below_logistic_regression": [
            t for t, r in per_task.items() if r["rce"] < r["logistic_regression_rce"]
        ],
    }


def merged(path: Path, world: str, setting: str, figures: dict[str, Any]) -> dict[str, Any]:
    """The results file's figures with this world's setting replaced (or added)."""
    everything = json.loads(path.read_text())["figures"] if path.is_file() else {}
    everything.setdefault(world, {})[setting] = figures
    return everything


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", required=True, help="its name in the results (demo, holdout, ...)")
    parser.add_argument(
        "--data", type=Path, required=True, help="the world's data: DATA/{train,validation,...}"
    )
    parser.add_argument("--generator", choices=list(WORLDS), help="the world's generator (default: --world)")
    parser.add_argument(
        "--examples", type=int, required=True, help="the training rows --data was written with"
    )
    parser.add_argument("--data-seed", type=int, default=0, help="the --seed --data was written with")
    parser.add_argument("--files", type=int, default=8, help="of the test split")
    parser.add_argument("--test", type=Path, help="the test split's folder (default RUNS/WORLD/test)")
    parser.add_argument("--setting", default="defaults", help="its name in the results and run folders")
    parser.add_argument("--config", type=Path, default=Path("configs/local_small.yaml"))
    parser.add_argument(
        "--against", action="append", default=[], help="another setting, compared seed by seed"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", type=Path, default=Path("runs/protocol"))
    parser.add_argument("--baseline-rows", type=int, default=200_000, help="training rows of the baselines")
    parser.add_argument("--resamples", type=int, default=1000, help="of compare's bootstrap")
    parser.add_argument("--set", action="append", default=[], help="override a value of every run")
    parser.add_argument(
        "--baselines-only", action="store_true", help="write the test split, fit the baselines"
    )
    add_results_option(parser, "quality_protocol")
    args = parser.parse_args()
    args.generator = args.generator or args.world
    if args.generator not in WORLDS:
        parser.error(f"--generator: give the world's generator, one of {', '.join(WORLDS)}")
    # Relative paths in --set are read against the YAML's folder: make ours absolute.
    args.runs, args.data, args.config = args.runs.resolve(), args.data.resolve(), args.config.resolve()
    args.test = (args.test or args.runs / args.world / "test").resolve()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    base = run_config(args, args.seeds[0])
    if not any(args.test.glob("*.gz")):
        write_test_split(base, args)
    if args.baselines_only:  # fit them while the runs train
        fitted_baselines(args)
        return
    runs = [test_scores(args, seed) for seed in args.seeds]
    baselines = baseline_scores(args, runs[0])
    against = {
        name: [saved_scores(args.runs / args.world / f"{name}_s{seed}") for seed in args.seeds]
        for name in args.against
    }
    figures = table(args, base.task_names, runs, baselines, against)
    print(json.dumps(figures, indent=1))
    write_results("quality_protocol", merged(args.results, args.world, args.setting, figures), args)


if __name__ == "__main__":
    main()
