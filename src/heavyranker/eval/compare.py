"""`heavyranker compare`: two runs' checkpoints re-scored on one validation split; per task both runs' AUROC
and RCE, and their difference (B - A) with a 95% interval from a paired bootstrap over the split's examples.

Paired: each resample draws example indices with replacement once, and both runs (and every task) are scored
on that same resample, so the interval reflects how the runs differ on the same examples rather than the
noise of each run's own estimate. A resample is a vector of multiplicities (how often each example was
drawn), which multiplies the split's weights: the metrics are weighted metrics, evaluated for a block of
resamples at once with numpy. AUROC sorts the predictions once; resampling changes weights, never the order.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..atomic import atomic_write, output_file
from ..checkpoint import resolve_checkpoint
from ..config import Config, short_names
from ..config.data import DataConfig
from ..data.columns import feature_specs
from ..data.dataset import RecapDataset
from ..data.shapes import feature_shapes
from ..errors import UserError
from ..memory import out_of_memory_as_user_error
from ..model import Ranker, build_model, restore_weights
from ..run_folder import RunFolder
from .evaluator import batch_setting, evaluation_tasks
from .metrics import EPS, MetricAccumulator, auroc, rce
from .report import reliability_curve

logger = logging.getLogger(__name__)

METRICS = {"auroc": auroc, "rce": rce}
BLOCK = 64  # resamples evaluated together: [BLOCK, N] float64 arrays, 30 MB each at N = 60k
# Fewest resamples: a 95% interval's ends are the 2.5% tails of the resampled differences; with 100 resamples
# each end rests on 2 or 3 of them, with fewer on the one or two most extreme (at 0 there is no interval).
MIN_RESAMPLES = 100
# Most: each resample rescores every example for every task, and its differences are kept (8 bytes per task
# and metric); 10**9 would run for days and allocate tens of GB. 100,000 puts 2,500 resamples in each tail.
MAX_RESAMPLES = 100_000


# A model to score (a Ranker, or a program called as one: serve's ServedProgram), where its weights are (a
# checkpoint, or an exported folder) and their step.
Loaded = tuple[Any, Path, int]


@dataclass
class Scores:
    """One checkpoint's calibrated predictions on a split: [N, T] arrays, columns in task order."""

    checkpoint: Path
    step: int
    labels: np.ndarray
    probs: np.ndarray
    weights: np.ndarray


@dataclass
class Difference:
    a: float
    b: float
    low: float  # of the 95% interval of b - a
    high: float

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0


def run_checkpoint(run: str | Path, step: int | None) -> Path:
    """Of a run folder: the checkpoint of `step`, else the one best.json marks, else the newest."""
    if step is None:
        return resolve_checkpoint(run, best=True)
    path = RunFolder(run).checkpoint(step)
    if not path.is_file():
        raise UserError(f"{run}: no checkpoint of step {step} ({path})")
    return path


@torch.no_grad()
def score(config: Config, loaded: Sequence[Loaded], data: DataConfig) -> list[Scores]:
    """Each model's predictions (with the weights of its checkpoint, of its step) on num_eval_steps batches
    of the split, in the split's order. The split is read once and each batch scored by every model: they
    score the same examples even where a second read would find other files (a folder still being written,
    dated folders that end at latest), and the data is decoded once."""
    for model, _, _ in loaded:
        model.eval()
    tasks = evaluation_tasks(config, data)
    columns = [[model.task_names.index(t) for t in tasks] for model, _, _ in loaded]
    accumulators = [MetricAccumulator(len(tasks)) for _ in loaded]
    limit = config.training.num_eval_steps
    with RecapDataset(data, seed=config.training.seed) as dataset:
        for i, batch in enumerate(dataset):
            if 0 <= limit <= i:
                break
            label_columns = batch.columns(tasks)
            labels, weights = batch.labels[:, label_columns], batch.weights[:, label_columns]
            for (model, _, _), model_columns, accumulator in zip(loaded, columns, accumulators, strict=True):
                probs = model(batch.features)["calibrated_probabilities"][:, model_columns].float()
                accumulator.add(labels, probs, weights)
    scores = []
    for (_, checkpoint, step), accumulator in zip(loaded, accumulators, strict=True):
        arrays = accumulator.state()
        scores.append(Scores(checkpoint, step, arrays["labels"], arrays["probs"], arrays["weights"]))
    return scores


def resample_counts(n: int, resamples: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Blocks of [b, n] multiplicities: how often each of n examples is drawn in each resample of n draws
    with replacement."""
    for start in range(0, resamples, BLOCK):
        b = min(BLOCK, resamples - start)
        draws = rng.integers(0, n, size=(b, n)) + n * np.arange(b)[:, None]
        yield np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


class ResampledAuroc:
    """metrics.auroc(labels, scores, w) for each row w of weights [B, N] (NaN for a row without positives or
    without negatives): the same weighted Mann-Whitney, sorting once for all rows. Per row, one cumulative sum
    of the negatives' weights in score order; a positive beats the negatives below its group of tied scores
    and ties with half of those in it, read off that sum at the group's first and last position."""

    def __init__(self, labels: np.ndarray, scores: np.ndarray):
        self.order = np.argsort(scores, kind="stable")
        sorted_scores, labels = scores[self.order], labels[self.order].astype(np.float64)
        new = np.concatenate(([True], sorted_scores[1:] != sorted_scores[:-1]))
        group = np.cumsum(new) - 1
        first = np.flatnonzero(new)
        last = np.append(first[1:], len(new)) - 1
        self.positive = np.flatnonzero(labels > 0)  # sorted positions holding a positive weight
        self.first, self.last = first[group[self.positive]], last[group[self.positive]]
        self.label, self.negative = labels[self.positive], 1.0 - labels

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        w = np.take(weights, self.order, axis=1)  # 3x faster than weights[:, self.order]
        negative = w * self.negative
        up_to = np.cumsum(negative, axis=1)  # negatives' weight at or below each position
        below = up_to[:, self.first] - negative[:, self.first]
        positive = w[:, self.positive] * self.label
        wins = np.sum(positive * 0.5 * (below + up_to[:, self.last]), axis=1)
        pairs = positive.sum(axis=1) * up_to[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(pairs > 0, wins / pairs, np.nan)


def rce_resampled(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """metrics.rce(labels, probs, w) for each row w of weights [B, N]."""
    p = np.clip(probs.astype(np.float64), EPS, 1.0 - EPS)
    loss = -(labels * np.log(p) + (1.0 - labels) * np.log1p(-p))
    total = weights.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ctr = weights @ labels / total
        base = np.clip(ctr, EPS, 1.0 - EPS)
        baseline = -(ctr * np.log(base) + (1.0 - ctr) * np.log1p(-base))
        value = 100.0 * (1.0 - (weights @ loss / total) / baseline)
    return np.where((ctr > 0) & (ctr < 1), value, np.nan)


def paired_bootstrap(
    a: Scores, b: Scores, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> list[dict[str, Difference]]:
    """Per task (column), per metric: both runs' values and the percentile interval of b - a over
    `resamples` paired resamples of the examples. Resamples where a metric is undefined (a rare task drawn
    without positives) are left out of its interval."""
    return differences(a, b, resampled_deltas(a, b, resamples, seed), level)


def resampled_deltas(a: Scores, b: Scores, resamples: int, seed: int) -> dict[tuple[int, str], np.ndarray]:
    """(task's column, metric) -> b - a on each of `resamples` paired resamples (NaN where undefined)."""
    if not (np.array_equal(a.labels, b.labels) and np.array_equal(a.weights, b.weights)):
        raise ValueError("the two runs were not scored on the same examples in the same order")
    n, tasks = a.labels.shape
    labels = a.labels.astype(np.float64)
    aurocs = [[ResampledAuroc(labels[:, j], run.probs[:, j]) for j in range(tasks)] for run in (a, b)]
    deltas = {(j, m): [] for j in range(tasks) for m in METRICS}
    for counts in resample_counts(n, resamples, np.random.default_rng(seed)):
        for j in range(tasks):
            weights = counts * a.weights[:, j]
            deltas[j, "auroc"].append(aurocs[1][j](weights) - aurocs[0][j](weights))
            rces = [rce_resampled(labels[:, j], run.probs[:, j], weights) for run in (a, b)]
            deltas[j, "rce"].append(rces[1] - rces[0])
    return {key: np.concatenate(blocks) for key, blocks in deltas.items()}


def differences(
    a: Scores, b: Scores, deltas: dict[tuple[int, str], np.ndarray], level: float = 0.95
) -> list[dict[str, Difference]]:
    """paired_bootstrap's rows from resampled_deltas."""
    tail = 100 * (1 - level) / 2
    out = []
    for j in range(a.labels.shape[1]):
        row = {}
        for m, metric in METRICS.items():
            low, high = interval(deltas[j, m], tail)
            values = (metric(a.labels[:, j], p[:, j], a.weights[:, j]) for p in (a.probs, b.probs))
            row[m] = Difference(*values, low, high)
        out.append(row)
    return out


def interval(deltas: np.ndarray, tail: float) -> tuple[float, float]:
    """The percentile interval of the defined (not NaN) `deltas`, `tail` percent cut off at each end."""
    defined = deltas[~np.isnan(deltas)]
    if not defined.size:  # a task without positives (or negatives): no metric, no interval
        return math.nan, math.nan
    low, high = np.percentile(defined, [tail, 100 - tail])
    return float(low), float(high)


def format_comparison(tasks: list[str], rows: list[dict[str, Difference]], a: Scores, b: Scores) -> str:
    short = short_names(tasks)
    width = max(map(len, short.values()))
    header = f"{'task':<{width}} {'positives':>9}" + "".join(
        f" {m + ' A':>9} {m + ' B':>9} {'B - A':>9} {'95% interval':>22}  " for m in METRICS
    )
    lines = [
        f"A: {a.checkpoint} (step {a.step})",
        f"B: {b.checkpoint} (step {b.step})",
        f"{len(a.labels)} examples; * where the interval of B - A (paired bootstrap) excludes 0 "
        "(with a handful of positives, the bootstrap cannot be trusted)",
        header.rstrip(),
    ]
    positives = a.labels.sum(axis=0)
    for task, row, count in zip(tasks, rows, positives, strict=True):
        cells = "".join(_cells(row[m]) for m in METRICS)
        lines.append(f"{short[task]:<{width}} {count:>9.0f}{cells}".rstrip())
    return "\n".join(lines)


def _cells(d: Difference) -> str:
    interval = f"[{d.low:.4g}, {d.high:.4g}]"
    return f" {d.a:>9.4g} {d.b:>9.4g} {d.b - d.a:>9.4g} {interval:>22} {'*' if d.significant else ' '}"


def write_html(path: str | Path, table: str, tasks: list[str], a: Scores, b: Scores) -> Path:
    """The table, and per task a reliability plot of both runs, in one self-contained file."""
    short = short_names(tasks)
    plots = "\n".join(
        f'<h2>{html.escape(short[task])}</h2>\n<img src="data:image/png;base64,{_reliability_png(j, a, b)}">'
        for j, task in enumerate(tasks)
    )
    page = (
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>heavyranker compare</title></head><body>\n"
        f"<pre>{html.escape(table)}</pre>\n{plots}\n</body></html>\n"
    )
    with atomic_write(path, "w") as f:  # a reader (a browser, a CI artifact) never sees half a page
        f.write(page)
    return Path(path)


def _reliability_png(j: int, a: Scores, b: Scores) -> str:
    # A Figure on its own Agg canvas, not pyplot: no global figures, no process-wide backend (see report.py).
    fig = Figure(figsize=(4, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    top = 0.0
    for name, scores in (("A", a), ("B", b)):
        predicted, observed = reliability_curve(scores.probs[:, j], scores.labels[:, j], scores.weights[:, j])
        ax.plot(predicted, observed, marker="o", label=f"{name} (step {scores.step})")
        top = max(top, predicted.max(initial=0), observed.max(initial=0))
    top = top * 1.05 or 1.0
    ax.plot([0, top], [0, top], color="grey", linewidth=0.8)
    ax.set_xlabel("mean predicted", fontsize=8)
    ax.set_ylabel("observed rate", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=80)
    return base64.b64encode(png.getvalue()).decode("ascii")


def validation_split(config: Config, split: str | None, when_none: str) -> tuple[str, DataConfig]:
    """The validation split named `split` (default: the first) and its data; `when_none` is the error when
    the config has no validation_data."""
    if not config.validation_data:
        raise UserError(when_none)
    split = split or next(iter(config.validation_data))
    if split not in config.validation_data:
        raise UserError(f"no validation split {split!r} (the config has {', '.join(config.validation_data)})")
    return split, config.validation_data[split]


def compare_runs(
    config: Config,
    run_a: str,
    run_b: str,
    *,
    split: str | None = None,
    step: int | None = None,
    resamples: int = 1000,
    seed: int = 0,
    html_path: str | Path | None = None,
    config_b: Config | None = None,
    exported: Callable[[str], Loaded | None] = lambda run: None,
) -> list[dict[str, Difference]]:
    """Score both runs' checkpoints (of `step`, else the best marked, else the newest) on `split` (default:
    the first validation split), print the table, and write it as HTML if asked. `config` gives the data
    and run A's model; `config_b`, when run B's model differs, gives B's (its data sections are not read).
    `exported(run)`: the program of a run given as an exported model folder, scored as it serves (serve/
    served_program.py: the CLI passes it, eval does not import serve), or None for a run folder."""
    if resamples < MIN_RESAMPLES:
        raise UserError(
            f"compare: resamples is {resamples}; a 95% interval needs at least {MIN_RESAMPLES} (default 1000)"
        )
    if resamples > MAX_RESAMPLES:
        raise UserError(f"compare: resamples is {resamples}; at most {MAX_RESAMPLES:,} (default 1000)")
    html_path = output_file(html_path, "compare: --html") if html_path else None
    split, data = validation_split(
        config, split, "compare: the config has no validation_data to score the runs on"
    )
    tasks = evaluation_tasks(config, data)
    # Both models and their weights before scoring either: a run B that does not fit fails at once.
    loaded = [
        scorable_program(exported(run), run, data, tasks) or loaded_model(c, data, tasks, run, step)
        for c, run in ((config, run_a), (config_b or config, run_b))
    ]
    with out_of_memory_as_user_error(batch_setting(split), f"scoring the runs on {split}"):
        a, b = score(config, loaded, data)
    rows = paired_bootstrap(a, b, resamples, seed)
    table = f"split {split}\n" + format_comparison(tasks, rows, a, b)
    print(table)
    if html_path:
        write_html(html_path, table, tasks, a, b)
        logger.info("wrote the table and each task's reliability plot to %s", html_path)
    return rows


def scorable_program(program: Loaded | None, run: str, data: DataConfig, tasks: list[str]) -> Loaded | None:
    """An exported folder's program, if it can score the split: every task, every input in its shape."""
    if program is None:
        return None
    if missing := [t for t in tasks if t not in program[0].task_names]:
        raise UserError(f"compare: the program of {run} scores no {', '.join(missing)}")
    has = feature_shapes(data)
    if differ := [f"{n} {list(s)}" for n, s in program[0].input_shapes.items() if has.get(n) != s]:
        raise UserError(
            f"compare: the program of {run} reads features the split does not have in that shape: "
            + ", ".join(differ)
        )
    return program


def loaded_model(
    config: Config, data: DataConfig, tasks: list[str], run: str, step: int | None
) -> tuple[Ranker, Path, int]:
    """The model `config` describes with the weights of the run's checkpoint (see run_checkpoint), if it can
    score the split: a tower for each task and, for each feature it reads, the same shape in the split's
    data. Returns the model, the checkpoint and its step."""
    needs, has = feature_specs(config.train_data), feature_shapes(data)
    model = build_model(config.model, needs, config.train_data.tasks)
    missing = [t for t in tasks if t not in model.task_names]
    if missing:
        raise UserError(f"compare: the model of {run} has no tower for {', '.join(missing)}")
    differ = [f"{name} {spec.shape}" for name, spec in needs.items() if has.get(name) != spec.shape]
    if differ:
        raise UserError(
            f"compare: the model of {run} reads features the split does not have in that shape: "
            + ", ".join(differ)
        )
    checkpoint = run_checkpoint(run, step)
    hint = "a run of another model: give its config with --config-b or --set-b"
    state = restore_weights(model, checkpoint, misfit_hint=hint, mapped=True)
    return model, checkpoint, int(state["step"])
