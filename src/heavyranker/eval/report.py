"""The training report, one PNG: per task, the training loss, the evaluated AUROC and RCE over steps, and
reliability (calibration) curves of the model and the baselines, each with its RCE."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..run_folder import list_results
from .metrics import rce

PLOTS = 4  # per task, in a column: training loss, AUROC, RCE, reliability


def reliability_curve(
    probs: np.ndarray, labels: np.ndarray, weights: np.ndarray, bins: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Mean prediction and observed rate (both weighted) per quantile bin of the prediction."""
    order = np.argsort(probs, kind="stable")
    chunks = np.array_split(order, bins)
    predicted = np.array([np.average(probs[c], weights=weights[c]) for c in chunks if len(c)])
    observed = np.array([np.average(labels[c], weights=weights[c]) for c in chunks if len(c)])
    return predicted, observed


def write_report(
    path: str | Path,
    metrics_jsonl: str | Path,
    eval_dir: str | Path,
    task_names: list[str],
    predictions: dict[str, np.ndarray],
    labels: np.ndarray,
    weights: np.ndarray,
    notes: list[str] | None = None,
) -> Path:
    """Writes build_report's figure as a PNG at path."""
    fig = build_report(metrics_jsonl, eval_dir, task_names, predictions, labels, weights, notes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path


def build_report(
    metrics_jsonl: str | Path,
    eval_dir: str | Path,
    task_names: list[str],
    predictions: dict[str, np.ndarray],
    labels: np.ndarray,
    weights: np.ndarray,
    notes: list[str] | None = None,
) -> Figure:
    """Per task, four plots in a column: training loss (from metrics_jsonl), AUROC and RCE over the evaluated
    steps (the step_N.json files of one split's eval_dir), and a reliability curve per predictor on that
    split, labelled with its RCE. predictions (name -> [N, T]), labels and weights [N, T]: columns in
    task_names order. notes: a line per task under its reliability plot's title."""
    lines = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    evaluations = _evaluations(Path(eval_dir))
    cols = 5
    rows = PLOTS * math.ceil(len(task_names) / cols)
    # A Figure on its own Agg canvas, not pyplot: pyplot keeps global figures and a process-wide backend,
    # which importing this module or writing a report must not choose for the program that calls it.
    fig = Figure(figsize=(4 * cols, 3.2 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for j, task in enumerate(task_names):
        short = task.removeprefix("recap.engagement.is_")
        loss_ax, auroc_ax, rce_ax, cal_ax = (axes[PLOTS * (j // cols) + k][j % cols] for k in range(PLOTS))
        _loss(loss_ax, short, [line["step"] for line in lines], [line[f"loss/{task}"] for line in lines])
        for ax, metric, label in ((auroc_ax, "auroc", "AUROC"), (rce_ax, "rce", "RCE")):
            steps = [step for step, metrics in evaluations if task in metrics]
            values = [_value(metrics[task][metric]) for _, metrics in evaluations if task in metrics]
            ax.plot(steps, values, marker="o")
            ax.set_title(f"{short}: {label} ({Path(eval_dir).name})", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
        _reliability(cal_ax, short, {n: p[:, j] for n, p in predictions.items()}, labels[:, j], weights[:, j])
        if notes:
            cal_ax.set_title(f"{cal_ax.get_title()}\n{notes[j]}", fontsize=9)
    for k in range(len(task_names), rows // PLOTS * cols):
        for plot in range(PLOTS):
            axes[PLOTS * (k // cols) + plot][k % cols].axis("off")
    fig.tight_layout()
    return fig


def _loss(ax, short: str, steps: list[int], losses: list[float]) -> None:
    ax.plot(steps, losses)
    ax.set_yscale("log")  # the first steps' loss is many times the rest: linear, it flattens the curve
    ax.set_title(f"{short}: training loss", fontsize=9)
    ax.set_xlabel("step", fontsize=8)


def _reliability(
    ax, short: str, predictions: dict[str, np.ndarray], labels: np.ndarray, weights: np.ndarray
) -> None:
    curves = {name: reliability_curve(probs, labels, weights) for name, probs in predictions.items()}
    top = max(max(p.max(initial=0), o.max(initial=0)) for p, o in curves.values()) * 1.05 or 1.0
    ax.plot([0, top], [0, top], color="grey", linewidth=0.8)
    for name, (predicted, observed) in curves.items():
        label = f"{name} (RCE {rce(labels, predictions[name], weights):.2f})"
        ax.plot(predicted, observed, marker="o", label=label)
    ax.legend(fontsize=7)
    ax.set_title(f"{short}: reliability", fontsize=9)
    ax.set_xlabel("mean predicted", fontsize=8)
    ax.set_ylabel("observed rate", fontsize=8)


def _evaluations(eval_dir: Path) -> list[tuple[int, dict[str, dict[str, float | None]]]]:
    """(step, metrics by task) of each step_N.json in eval_dir, by step; none when the folder is absent."""
    return [(step, json.loads(p.read_text())["metrics"]) for step, p in list_results(eval_dir)]


def _value(value: float | None) -> float:
    return math.nan if value is None else value  # the evaluator writes NaN (no positives) as null
