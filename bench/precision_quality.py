"""What bf16 and int8 exports cost in quality: per-task AUROC and RCE of each against the fp32 export of the
same checkpoint, on the same validation split, with the probabilities' largest and mean differences.

    .venv/bin/python bench/precision_quality.py --checkpoint runs/local_small
        [--config configs/local_small.yaml]
        [--split validation] [--set DOTTED.PATH=VALUE ...] [--threads N] [--tables] [--results PATH]

Exports fp32 (ONNX, the default format), bf16 (pt2: the only format that runs it) and int8 (ONNX), scores
every example of the split with each through the Scorer, as predict and serve do, and compares. The aim of
issue 28: |delta RCE| <= 0.1 points and |delta AUROC| <= 0.001 on every task with >= 500 positives.
tests/serve/test_precision.py holds int8 to the drift measured here. The summary goes to
bench/results/precision_quality.json; docs/benchmarks.md shows it, docs/precision.md discusses it.

With --tables, the id tables' precision instead (export --table-precision): fp32 and int8 tables, both ONNX
with fp32 dense layers, of a model with id tables (configs/local_small_ids.yaml); the summary goes to
bench/results/table_precision_quality.json, docs/id-embeddings.md discusses it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from results import add_results_option, cpu_line, write_results

from heavyranker.checkpoint import save_checkpoint
from heavyranker.config import load_config, short_names
from heavyranker.data.columns import feature_specs
from heavyranker.data.dataset import RecapDataset
from heavyranker.eval.metrics import auroc, rce
from heavyranker.model import build_model
from heavyranker.serve.export import export_model
from heavyranker.serve.scorer import Scorer

REPO = Path(__file__).resolve().parents[1]
EXPORTS = {  # what is compared -> export_model's options
    "fp32": {"format": "onnx"},
    "bf16": {"format": "pt2", "precision": "bf16"},
    "int8": {"format": "onnx", "precision": "int8"},
}
TABLE_EXPORTS = {"fp32": {"format": "onnx"}, "int8 tables": {"format": "onnx", "table_precision": "int8"}}
AIM_POSITIVES, AIM_RCE, AIM_AUROC = 500, 0.1, 0.001


def score_split(scorer: Scorer, config, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities, labels and weights [examples, tasks] of every example of the split, in file order."""
    parts: tuple[list, list, list] = ([], [], [])
    with RecapDataset(config.validation_data[split]) as dataset:
        for batch in dataset:
            columns = batch.columns(scorer.tasks)
            parts[0].append(scorer(batch.features)[0].numpy())
            parts[1].append(batch.labels[:, columns].numpy())
            parts[2].append(batch.weights[:, columns].numpy())
    return tuple(np.concatenate(p) for p in parts)  # type: ignore[return-value]


def initial_checkpoint(config, folder: Path) -> str:
    torch.manual_seed(0)
    model = build_model(config.model, feature_specs(config.train_data), config.train_data.tasks)
    return str(save_checkpoint(folder / "checkpoints", 0, {"model": model.state_dict(), "step": 0}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "local_small.yaml"))
    parser.add_argument("--checkpoint", help="a step_<N>.pt file or a run folder (default: initial weights)")
    parser.add_argument("--split", help="a validation split (default: the config's first)")
    parser.add_argument("--set", action="append", default=[], metavar="DOTTED.PATH=VALUE")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--tables", action="store_true", help="fp32 against int8 id tables (--table-precision)"
    )
    add_results_option(parser, "precision_quality")
    args = parser.parse_args()
    if args.tables and args.results == parser.get_default("results"):
        args.results = args.results.with_name("table_precision_quality.json")
    exports = TABLE_EXPORTS if args.tables else EXPORTS
    torch.set_num_threads(args.threads)
    config = load_config(args.config, args.set)
    split = args.split or next(iter(config.validation_data))
    print(cpu_line())

    scored, table_bytes = {}, {}
    with tempfile.TemporaryDirectory(prefix="precision_quality_") as tmp:
        checkpoint = args.checkpoint or initial_checkpoint(config, Path(tmp))
        for name, options in exports.items():
            folder = export_model(config, checkpoint=checkpoint, out=f"{tmp}/{name}", **options)
            scorer = Scorer(folder, threads=args.threads)
            scored[name], table_bytes[name] = (
                score_split(scorer, config, split),
                scorer.manifest["table_bytes"],
            )
    reference, labels, weights = scored["fp32"]
    short = short_names(list(config.task_names))
    tasks: dict[str, dict[str, float]] = {}
    met = {name: True for name in exports if name != "fp32"}
    print(
        f"{'task':<40} {'positives':>9} {'fp32 AUROC':>10} {'RCE':>6} "
        + " ".join(f"{p + ' dAUROC':>12} {'dRCE':>6}" for p in met)
    )
    for j, task in enumerate(config.task_names):
        y, w, p = labels[:, j], weights[:, j], reference[:, j]
        row = {"positives": int(y.sum()), "fp32 AUROC": auroc(y, p, w), "fp32 RCE": rce(y, p, w)}
        for precision in met:
            q = scored[precision][0][:, j]
            row[f"{precision} dAUROC"] = auroc(y, q, w) - row["fp32 AUROC"]
            row[f"{precision} dRCE"] = rce(y, q, w) - row["fp32 RCE"]
            if row["positives"] >= AIM_POSITIVES:
                within = (
                    abs(row[f"{precision} dAUROC"]) <= AIM_AUROC and abs(row[f"{precision} dRCE"]) <= AIM_RCE
                )
                met[precision] &= within
        tasks[short[task]] = row
        print(
            f"{short[task]:<40} {row['positives']:>9} {row['fp32 AUROC']:>10.4f} {row['fp32 RCE']:>6.2f} "
            + " ".join(f"{row[p + ' dAUROC']:>+12.5f} {row[p + ' dRCE']:>+6.3f}" for p in met)
        )
    differences = {
        precision: {
            "max_abs_probability_difference": float(np.abs(scored[precision][0] - reference).max()),
            "mean_abs_probability_difference": float(np.abs(scored[precision][0] - reference).mean()),
            "aim_met": met[precision],
            "table_bytes_of_fp32": table_bytes[precision] / table_bytes["fp32"]
            if table_bytes["fp32"]
            else 1.0,
        }
        for precision in met
    }
    for precision, d in differences.items():
        print(
            f"{precision}: max |dp| {d['max_abs_probability_difference']:.2e}, mean |dp| "
            f"{d['mean_abs_probability_difference']:.2e}, aim (tasks with >= {AIM_POSITIVES} positives: "
            f"|dRCE| <= {AIM_RCE}, |dAUROC| <= {AIM_AUROC}) {'met' if d['aim_met'] else 'NOT met'}"
        )
    figures = {"split": split, "examples": len(labels), "tasks": tasks, "against_fp32": differences}
    write_results("precision_quality", figures, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
