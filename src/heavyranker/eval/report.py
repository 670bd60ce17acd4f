"""The training report: per-task loss curves and a reliability (calibration) plot per task, one PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


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
    task_names: list[str],
    probs: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
) -> Path:
    """probs/labels/weights: [N, T] on a validation split, columns in task_names order."""
    lines = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    steps = [line["step"] for line in lines]
    cols = 5
    rows = 2 * math.ceil(len(task_names) / cols)
    # A Figure on its own Agg canvas, not pyplot: pyplot keeps global figures and a process-wide backend,
    # which importing this module or writing a report must not choose for the program that calls it.
    fig = Figure(figsize=(4 * cols, 3.2 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for j, task in enumerate(task_names):
        short = task.removeprefix("recap.engagement.is_")
        loss_ax = axes[2 * (j // cols)][j % cols]
        loss_ax.plot(steps, [line[f"loss/{task}"] for line in lines])
        loss_ax.set_title(f"{short}: training loss", fontsize=9)
        loss_ax.set_xlabel("step", fontsize=8)
        cal_ax = axes[2 * (j // cols) + 1][j % cols]
        predicted, observed = reliability_curve(probs[:, j], labels[:, j], weights[:, j])
        top = max(predicted.max(initial=0), observed.max(initial=0)) * 1.05 or 1.0
        cal_ax.plot([0, top], [0, top], color="grey", linewidth=0.8)
        cal_ax.plot(predicted, observed, marker="o")
        cal_ax.set_title(f"{short}: reliability", fontsize=9)
        cal_ax.set_xlabel("mean predicted", fontsize=8)
        cal_ax.set_ylabel("observed rate", fontsize=8)
    for k in range(len(task_names), rows // 2 * cols):
        axes[2 * (k // cols)][k % cols].axis("off")
        axes[2 * (k // cols) + 1][k % cols].axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path
