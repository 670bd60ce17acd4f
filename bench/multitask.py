"""Multi-task architectures and rare tasks: each variant of a config trained over several seeds, its RCE per
task against a logistic regression, and `compare` against the config as shipped, seed by seed.

    .venv/bin/python bench/multitask.py [--config configs/local_small.yaml] [--seeds 0 1 2]
                                        [--variants share_all mmoe ...] [--runs runs/multitask]
                                        [--resamples 1000] [--baseline-rows 200000] [--set PATH=VALUE ...]

The data must exist (`heavyranker data generate --config C`). A run folder that already holds its last
checkpoint is reused, so a killed bench continues. Variants (VARIANTS): the config as it is (`shipped`,
always trained), and each with one change. For each variant, seed s is compared with `shipped` at seed s on
the first validation split (paired bootstrap, 95% intervals); a difference counts when its interval excludes
0. The logistic regression is the demo's (demo/baselines.py), fit once on the first --baseline-rows training
rows.
The summary goes to bench/results/multitask.json (--results).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from results import add_results_option, write_results

from heavyranker.config import Config, load_config, short_names
from heavyranker.data.stats import write_feature_stats
from heavyranker.demo.baselines import logistic_regression, read_rows
from heavyranker.eval.compare import compare_runs, validation_split
from heavyranker.eval.metrics import rce
from heavyranker.train.loop import train as train_run

EXPERT = "expert: {mlp_config: {layer_sizes: [128, 64], final_layer_activation: true}}"
MIXTURE = ["model.backbone=null"]
# The tasks of local_small with under 200 validation positives in 60,000 rows.
RARE = (
    "recap.engagement.is_negative_feedback_v2",
    "recap.engagement.is_replied_reply_engaged_by_author",
    "recap.engagement.is_report_tweet_clicked",
)
# Every tower of local_small, for the variants that change them all.
TOWERS = (
    "recap.engagement.is_favorited",
    "recap.engagement.is_good_clicked_convo_desc_favorited_or_replied",
    "recap.engagement.is_good_clicked_convo_desc_v2",
    "recap.engagement.is_profile_clicked_and_profile_engaged",
    "recap.engagement.is_replied",
    "recap.engagement.is_retweeted",
    "recap.engagement.is_video_playback_50",
    *RARE,
)
STATS = "stats_16_bins.json"  # in --runs, written by `data stats --bins 16` when a variant needs it
VARIANTS = {
    "shipped": [],
    "share_partial": ["model.multi_task_type=share_partial"],
    "mmoe": [*MIXTURE, "model.multi_task_type=mmoe", f"model.experts={{num_experts: 4, {EXPERT}}}"],
    "ple": [
        *MIXTURE,
        "model.multi_task_type=ple",
        f"model.experts={{num_experts: 1, num_shared_experts: 2, {EXPERT}}}",
    ],
    "rare_loss_weight_3": [f"model.tasks.{task}.loss_weight=3" for task in RARE],
    "piecewise_linear": [
        "model.featurization_config={piecewise_linear_config: {analysis_path: STATS}, "
        "feature_names_to_concat: [binary]}"
    ],
    "periodic": ["model.featurization_config={periodic_config: {}, feature_names_to_concat: [binary]}"],
    "wide": [f"model.tasks.{task}.wide=true" for task in TOWERS],
}


def variant_config(args: argparse.Namespace, variant: str, seed: int) -> Config:
    overrides = [o.replace("STATS", str(args.runs / STATS)) for o in VARIANTS[variant]]
    save_dir = args.runs / f"{variant}_s{seed}"
    return load_config(
        args.config, [*args.set, f"training.save_dir={save_dir}", f"training.seed={seed}", *overrides]
    )


def train(config: Config) -> None:
    """Trains unless the run folder already holds its last checkpoint."""
    last = Path(config.training.save_dir) / "checkpoints" / f"step_{config.training.num_train_steps}.pt"
    if last.is_file():
        print(f"reusing {config.training.save_dir}")
        return
    train_run(config)  # what `heavyranker train` runs


def logistic_regression_rce(config: Config, rows: int) -> dict[str, float]:
    split, data = validation_split(config, None, "the config has no validation split")
    test = read_rows(config, data)
    probabilities = logistic_regression(config.task_names, read_rows(config, config.train_data, rows), test)
    return {t: rce(test.labels[:, j], probabilities[:, j]) for j, t in enumerate(config.task_names)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_measure_options(parser, Path("runs/multitask"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    add_results_option(parser, "multitask")
    args = parser.parse_args()
    args.runs = args.runs.resolve()  # a relative save_dir in --set would be read against the YAML's folder
    if not [v for v in args.variants if v != "shipped"]:
        parser.error("--variants: give at least one variant besides shipped, to compare it with")
    torch.set_num_threads(1)
    figures = measure(args)
    below = {v: sum(r.values()) for v, r in figures["runs_below_logistic_regression"].items()}
    print("task-runs below the logistic regression: " + ", ".join(f"{v} {n}" for v, n in below.items()))
    write_results("multitask", figures, args)


def add_measure_options(parser: argparse.ArgumentParser, runs: Path) -> None:
    """The options measure() reads, besides --variants (each bench has its own)."""
    parser.add_argument("--config", default="configs/local_small.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", type=Path, default=runs, help="a folder for the runs")
    parser.add_argument("--resamples", type=int, default=1000, help="of compare's bootstrap")
    parser.add_argument("--baseline-rows", type=int, default=200_000, help="training rows of the baseline")
    parser.add_argument("--set", action="append", default=[], help="override a value of every run")


def measure(args: argparse.Namespace) -> dict:
    """Trains `shipped` and args.variants over args.seeds in args.runs (reusing finished runs), fits the
    logistic regression, compares each variant with shipped seed by seed; the figures of the summary."""
    base = load_config(args.config, args.set)
    if "piecewise_linear" in args.variants and not (args.runs / STATS).is_file():
        write_feature_stats(base.train_data, seed=0, out=str(args.runs / STATS), batches=400, bins=16)
    others = [v for v in args.variants if v != "shipped"]
    for seed in args.seeds:
        train(variant_config(args, "shipped", seed))

    names = short_names(base.task_names)
    logreg = logistic_regression_rce(base, args.baseline_rows)
    rce_by_seed: dict[str, list[dict[str, float]]] = {"shipped": []}
    versus_shipped: dict[str, dict[str, str]] = {}
    intervals: dict[str, dict[str, str]] = {}  # variant -> task -> each seed's RCE difference and interval
    for variant in others:
        for seed in args.seeds:
            train(variant_config(args, variant, seed))
        counts = {task: [0, 0] for task in base.task_names}  # seeds better, seeds worse beyond the interval
        seen: dict[str, list[str]] = {task: [] for task in base.task_names}
        for seed in args.seeds:
            shipped, config = variant_config(args, "shipped", seed), variant_config(args, variant, seed)
            print(f"== {variant} against shipped, seed {seed}")
            rows = compare_runs(
                shipped,
                shipped.training.save_dir,
                config.training.save_dir,
                resamples=args.resamples,
                config_b=config,
            )
            by_task = dict(zip(base.task_names, (row["rce"] for row in rows), strict=True))
            rce_by_seed.setdefault(variant, []).append({t: d.b for t, d in by_task.items()})
            if variant == others[0]:
                rce_by_seed["shipped"].append({t: d.a for t, d in by_task.items()})
            for task, d in by_task.items():
                counts[task][0] += d.significant and d.b > d.a
                counts[task][1] += d.significant and d.b < d.a
                seen[task].append(f"{d.b - d.a:+.2f} [{d.low:+.2f}, {d.high:+.2f}]")
        intervals[variant] = {names[t]: "; ".join(values) for t, values in seen.items()}
        versus_shipped[variant] = {names[t]: f"+{up} -{down}" for t, (up, down) in counts.items()}

    return {
        "seeds": len(args.seeds),
        "logistic_regression_rce": {names[t]: value for t, value in logreg.items()},
        "rce_mean_over_seeds": {
            v: {names[t]: statistics.fmean(run[t] for run in runs) for t in base.task_names}
            for v, runs in rce_by_seed.items()
        },
        "rce_lowest_seed": {
            v: {names[t]: min(run[t] for run in runs) for t in base.task_names}
            for v, runs in rce_by_seed.items()
        },
        "runs_below_logistic_regression": {
            v: {names[t]: sum(run[t] < logreg[t] for run in runs) for t in base.task_names}
            for v, runs in rce_by_seed.items()
        },
        "seeds_better_worse_than_shipped": versus_shipped,
        "rce_minus_shipped_by_seed": intervals,
    }


if __name__ == "__main__":
    main()
